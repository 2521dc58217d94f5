-- Durable timers: reservation expiry, cart abandonment, pickup not collected, delivery
-- promises. They live with the state they guard, survive restarts and fire once.
CREATE TABLE IF NOT EXISTS timers (
    kind      text        NOT NULL,
    key       text        NOT NULL,
    due_at    timestamptz NOT NULL,
    payload   jsonb       NOT NULL DEFAULT '{}'::jsonb,
    trace     jsonb       NOT NULL DEFAULT '{}'::jsonb,
    PRIMARY KEY (kind, key)
);
CREATE INDEX IF NOT EXISTS timers_due ON timers (due_at);
