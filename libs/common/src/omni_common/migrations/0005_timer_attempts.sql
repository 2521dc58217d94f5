-- A failing timer never blocks the others: each failure is counted and the timer retried
-- later (next_attempt_at, with backoff); after its last attempt it moves to dead_timers
-- with its error, for an operator to look at and re-arm.
ALTER TABLE timers ADD COLUMN IF NOT EXISTS attempts integer NOT NULL DEFAULT 0;
ALTER TABLE timers ADD COLUMN IF NOT EXISTS next_attempt_at timestamptz;
ALTER TABLE timers ADD COLUMN IF NOT EXISTS last_error text;
CREATE INDEX IF NOT EXISTS timers_next_attempt ON timers ((coalesce(next_attempt_at, due_at)));

CREATE TABLE IF NOT EXISTS dead_timers (
    kind       text        NOT NULL,
    key        text        NOT NULL,
    due_at     timestamptz NOT NULL,
    payload    jsonb       NOT NULL,
    trace      jsonb       NOT NULL,
    attempts   integer     NOT NULL,
    last_error text        NOT NULL,
    died_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, key, died_at)
);
