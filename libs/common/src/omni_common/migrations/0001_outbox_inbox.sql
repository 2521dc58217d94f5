-- Transactional outbox: events are written here in the same transaction as the state change
-- that causes them; the relay publishes them to Kafka in id order.
CREATE TABLE IF NOT EXISTS outbox (
    id            bigserial PRIMARY KEY,
    ce_id         uuid        NOT NULL UNIQUE,
    ce_type       text        NOT NULL,
    topic         text        NOT NULL,
    key           text,
    headers       jsonb       NOT NULL,
    payload       bytea       NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    published_at  timestamptz
);
CREATE INDEX IF NOT EXISTS outbox_unpublished ON outbox (id) WHERE published_at IS NULL;
CREATE INDEX IF NOT EXISTS outbox_published_at ON outbox (published_at) WHERE published_at IS NOT NULL;

-- Inbox: one row per (consumer, ce_id) handled, written in the handler's transaction, so a
-- redelivered event has no second effect.
CREATE TABLE IF NOT EXISTS inbox (
    consumer     text        NOT NULL,
    ce_id        uuid        NOT NULL,
    ce_type      text        NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, ce_id)
);
CREATE INDEX IF NOT EXISTS inbox_received_at ON inbox (received_at);
