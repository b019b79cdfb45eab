-- How far each stream has handed events and initial-state rows out to its consumers:
-- a consumer may acknowledge (and resume after) only what was delivered, so a client
-- cannot move a stream's cursor over events it never received. Written before the
-- events are handed out, so a crash never leaves a delivered cursor unacknowledgeable.

ALTER TABLE waltap.streams
    ADD COLUMN IF NOT EXISTS delivered_lsn bigint,       -- NULL: nothing beyond the cursor
    ADD COLUMN IF NOT EXISTS delivered_ordinal integer,
    ADD COLUMN IF NOT EXISTS snapshot_delivered bigint NOT NULL DEFAULT 0;  -- rows 1..this
