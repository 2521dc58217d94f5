-- Business-key dedup: a till or stock system may resend a sale or an adjustment with a fresh
-- ce_id (the inbox would let it through); its own id (sale_id, adjustment_id) applies once.
CREATE TABLE applied_facts (
    kind        text        NOT NULL CHECK (kind IN ('sale', 'adjustment')),
    fact_id     text        NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, fact_id)
);
CREATE INDEX applied_facts_applied_at ON applied_facts (applied_at);

-- The last stock count per SKU and location, as of when it was counted: a sale or movement
-- that happened before it (but is processed after it) is already in the count.
CREATE TABLE stock_counts (
    sku          text        NOT NULL,
    location_id  text        NOT NULL,
    counted_at   timestamptz NOT NULL,
    PRIMARY KEY (sku, location_id)
);
