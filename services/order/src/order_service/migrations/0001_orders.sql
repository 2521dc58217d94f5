-- Orders of every channel. One row per order; lines, returns and history in child tables.
CREATE TABLE orders (
    order_id               text          PRIMARY KEY,
    customer_id            text,
    channel                text          NOT NULL,
    status                 text          NOT NULL,
    fulfillment            jsonb         NOT NULL,
    currency               char(3)       NOT NULL,
    total                  numeric(14,2) NOT NULL CHECK (total >= 0),
    paid                   numeric(14,2) NOT NULL CHECK (paid >= 0),
    -- Backstop of the domain rule: never refund more than was paid.
    refunded               numeric(14,2) NOT NULL DEFAULT 0 CHECK (refunded >= 0 AND refunded <= paid),
    correlation_id         text          NOT NULL,
    checkout_id            text          UNIQUE,
    sale_id                text          UNIQUE,
    cart_id                text,
    payment_reference      text,
    points_to_redeem       integer,
    pending_confirmations  text[]        NOT NULL DEFAULT '{}',
    allocations            jsonb         NOT NULL DEFAULT '[]',
    shortages              jsonb         NOT NULL DEFAULT '[]',
    reason                 text,
    carrier                text,
    tracking_id            text,
    promised_by            timestamptz,
    eta                    timestamptz,
    announced_etas         timestamptz[] NOT NULL DEFAULT '{}',
    collect_by             timestamptz,
    placed_at              timestamptz   NOT NULL,
    updated_at             timestamptz   NOT NULL DEFAULT now(),
    version                integer       NOT NULL DEFAULT 0
);
-- A shopper's history, newest first, paged by (placed_at, order_id).
CREATE INDEX orders_by_customer ON orders (customer_id, placed_at DESC, order_id DESC)
    WHERE customer_id IS NOT NULL;
CREATE INDEX orders_by_status ON orders (status);

CREATE TABLE order_lines (
    order_id      text          NOT NULL REFERENCES orders ON DELETE CASCADE,
    line_no       integer       NOT NULL,
    sku           text          NOT NULL,
    qty           integer       NOT NULL CHECK (qty > 0),
    unit_price    numeric(14,2) NOT NULL CHECK (unit_price >= 0),
    returned_qty  integer       NOT NULL DEFAULT 0 CHECK (returned_qty >= 0 AND returned_qty <= qty),
    PRIMARY KEY (order_id, line_no)
);

-- Idempotency keys of order creation (checkout_id, Idempotency-Key, store sale_id) with the
-- hash of the request they came with: same key + same body -> same order, else refused.
CREATE TABLE idempotency_keys (
    key           text        PRIMARY KEY,
    request_hash  text        NOT NULL,
    order_id      text        NOT NULL REFERENCES orders ON DELETE CASCADE,
    created_at    timestamptz NOT NULL DEFAULT now()
);

-- Returns handed in, one row per return_id (a repeated return has one effect).
CREATE TABLE order_returns (
    return_id     text          PRIMARY KEY,
    order_id      text          NOT NULL REFERENCES orders ON DELETE CASCADE,
    location_id   text          NOT NULL,
    channel       text          NOT NULL,
    lines         jsonb         NOT NULL,
    not_accepted  jsonb         NOT NULL DEFAULT '[]',
    refund        numeric(14,2) NOT NULL CHECK (refund >= 0),
    fingerprint   text          NOT NULL,
    received_at   timestamptz   NOT NULL
);
CREATE INDEX order_returns_by_order ON order_returns (order_id);

-- What happened to an order, for support and for GET /orders/{id}.
CREATE TABLE order_history (
    id        bigserial   PRIMARY KEY,
    order_id  text        NOT NULL REFERENCES orders ON DELETE CASCADE,
    what      text        NOT NULL,
    status    text        NOT NULL,
    detail    jsonb       NOT NULL DEFAULT '{}',
    at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX order_history_by_order ON order_history (order_id, id);
