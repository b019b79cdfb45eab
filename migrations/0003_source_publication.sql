-- The publication each source (slot) is read through, recorded by the pipeline when it
-- starts: initial states read from the log's side apply that publication's column lists
-- and row filters to their rows, so that the rows look like the source's events.

ALTER TABLE waltap.progress ADD COLUMN IF NOT EXISTS publication text;
