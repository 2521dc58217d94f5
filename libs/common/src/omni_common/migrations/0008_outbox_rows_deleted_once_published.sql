-- The relay deletes what it published (one touch per row) instead of marking it: nothing
-- looks rows up by publication time any more. Rows published before are purged as before.
DROP INDEX IF EXISTS outbox_published_at;
