-- Notifications are sent in the order they were decided (the dispatcher takes the oldest
-- first). Several decided in one transaction (events handled together) shared now(), the
-- transaction's start, and went out in any order; clock_timestamp() rises row by row.
ALTER TABLE notifications ALTER COLUMN created_at SET DEFAULT clock_timestamp();
