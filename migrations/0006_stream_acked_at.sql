-- When each stream's cursor last moved (an acknowledgement, or the cursor passing events
-- its filter skips): the console shows it, so an operator sees a consumer that stopped.

ALTER TABLE waltap.streams
    ADD COLUMN IF NOT EXISTS acked_at timestamptz;
