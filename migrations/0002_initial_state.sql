-- Initial state of persisted streams: a stream made or reset with an initial state gets
-- the rows of its tables copied here from one database snapshot (the first consumer
-- makes the copy), and hands them out before the changes that follow the snapshot. The
-- copy is fixed, so a consumer that stops in the middle resumes after its last
-- acknowledged row, however long it was away, while the source's snapshot was held only
-- for the time of the copy.

ALTER TABLE waltap.streams
    ADD COLUMN IF NOT EXISTS snapshot_state text
        CHECK (snapshot_state IN ('pending', 'ready')),  -- NULL: none, or all delivered
    ADD COLUMN IF NOT EXISTS snapshot_acked bigint NOT NULL DEFAULT 0,  -- rows 1..this acknowledged
    ADD COLUMN IF NOT EXISTS snapshot_total bigint NOT NULL DEFAULT 0;

CREATE TABLE IF NOT EXISTS waltap.snapshot_rows (
    stream text   NOT NULL REFERENCES waltap.streams (name) ON DELETE CASCADE,
    seq    bigint NOT NULL CHECK (seq > 0),
    row    json   NOT NULL,       -- {"action": "snapshot", "schema", "table", "row"}
    PRIMARY KEY (stream, seq)
);
