-- waltap's own tables: the event log, the pipeline's progress, and named streams.
-- They live in the `waltap` schema, which waltap's publication never includes, and the
-- pipeline drops changes of this schema should a publication include it anyway: the log
-- must never feed itself.

CREATE SCHEMA IF NOT EXISTS waltap;

-- One row per change, written exactly once: (source, commit_lsn, ordinal) is the event's
-- position in the source, and appends skip what is at or below waltap.progress.
CREATE TABLE IF NOT EXISTS waltap.events (
    source      text        NOT NULL,          -- the slot the change came from
    commit_lsn  bigint      NOT NULL CHECK (commit_lsn > 0),
    ordinal     integer     NOT NULL CHECK (ordinal >= 0),
    schema_name text        NOT NULL,
    table_name  text        NOT NULL,
    tx_last     boolean     NOT NULL,          -- last event of its source transaction
    appended_at timestamptz NOT NULL DEFAULT now(),
    event       json        NOT NULL,          -- exactly as delivered (DESIGN.md section 2)
    PRIMARY KEY (source, commit_lsn, ordinal)
);

CREATE INDEX IF NOT EXISTS events_by_age ON waltap.events (source, appended_at);

-- How far each source is in the log. Written in the same transaction as the events, so
-- after any crash the log and this mark agree.
CREATE TABLE IF NOT EXISTS waltap.progress (
    source        text        PRIMARY KEY,
    commit_lsn    bigint      NOT NULL,        -- every source transaction committed at or below is in the log
    pruned_lsn    bigint      NOT NULL DEFAULT 0, -- retention deleted every event at or below
    pruned_ordinal integer    NOT NULL DEFAULT -1,
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- Named, persisted streams over the log.
CREATE TABLE IF NOT EXISTS waltap.streams (
    name            text        PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9_.-]{1,128}$'),
    source          text        NOT NULL,
    tables          text[]      NOT NULL,      -- schema.table
    filter          jsonb,
    cursor_lsn      bigint      NOT NULL,      -- last acknowledged position: (cursor_lsn, cursor_ordinal)
    cursor_ordinal  integer     NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    lease_holder    text,                      -- the consumer that reads it now
    lease_expires_at timestamptz
);
