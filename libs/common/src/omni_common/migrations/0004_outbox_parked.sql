-- A row the broker will never take (too large, invalid) is parked with its error instead of
-- wedging the relay: the rest are published, an alert counts parked rows, and an operator
-- can requeue one (UPDATE outbox SET parked_at = NULL, last_error = NULL WHERE id = ...)
-- once the cause is mended (for instance the topic's max.message.bytes raised).
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS parked_at timestamptz;
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS last_error text;
DROP INDEX IF EXISTS outbox_unpublished;
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (id)
    WHERE published_at IS NULL AND parked_at IS NULL;
CREATE INDEX IF NOT EXISTS outbox_parked ON outbox (id) WHERE parked_at IS NOT NULL;
