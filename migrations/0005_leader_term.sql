-- Leadership of a source when several waltap processes run as a group (README.md, "High
-- availability"). The member holding the source's advisory lock leads; on taking the lock
-- it bumps `term`, and every append transaction updates the progress row only where the
-- term is still its own, so a member that lost leadership (paused, partitioned, its lock
-- session gone) can never append after another took over.

ALTER TABLE waltap.progress
    ADD COLUMN IF NOT EXISTS term bigint NOT NULL DEFAULT 0,   -- bumped at each takeover
    ADD COLUMN IF NOT EXISTS leader text,                      -- host:pid of the member that took the term
    ADD COLUMN IF NOT EXISTS leader_since timestamptz;
