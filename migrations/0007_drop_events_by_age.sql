-- Every append paid for an index on (source, appended_at) that no query reads: retention
-- walks the log in position order (the primary key) and looks at appended_at row by row,
-- and the console's oldest-unacknowledged lookup also goes by position.

DROP INDEX IF EXISTS waltap.events_by_age;
