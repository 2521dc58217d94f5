-- Loyalty: accounts (balances derived from the ledger), the append-only ledger, earnings
-- with their lines (for returns), holds of the checkout saga, cards, tiers' spend, offers.
-- Unqualified names: the service's schema comes from search_path.

-- One account per shopper, or per loyalty card not yet linked to one (customer_id null).
-- The buckets are the running sums of the ledger, kept in the same transaction as each
-- entry; the CHECKs are the backstop behind the conditional updates: never negative.
CREATE TABLE accounts (
    account_id        bigserial   PRIMARY KEY,
    customer_id       text        UNIQUE,
    available         bigint      NOT NULL DEFAULT 0 CONSTRAINT available_not_negative CHECK (available >= 0),
    pending           bigint      NOT NULL DEFAULT 0 CONSTRAINT pending_not_negative CHECK (pending >= 0),
    held              bigint      NOT NULL DEFAULT 0 CONSTRAINT held_not_negative CHECK (held >= 0),
    lifetime          bigint      NOT NULL DEFAULT 0 CONSTRAINT lifetime_not_negative CHECK (lifetime >= 0),
    tier              text        NOT NULL DEFAULT 'base',
    tier_review_at    timestamptz,
    preferred_store   text,
    last_activity_at  timestamptz NOT NULL DEFAULT now(),
    erased_at         timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);

-- Loyalty cards: a card's account until linked; linking moves its points to the customer.
CREATE TABLE cards (
    card         text        PRIMARY KEY,
    account_id   bigint      NOT NULL REFERENCES accounts (account_id),
    linked_at    timestamptz
);

-- The ledger: every change of every bucket, with what caused it. ``cause`` is unique, so
-- a redelivered or resent event (same order, sale, return) never adds a second entry.
CREATE TABLE ledger (
    entry_id       bigserial   PRIMARY KEY,
    account_id     bigint      NOT NULL REFERENCES accounts (account_id),
    kind           text        NOT NULL CHECK (kind IN ('pending', 'earned', 'available', 'held',
                               'redeemed', 'released', 'reversed', 'expired', 'moved_out',
                               'adjusted')),
    points         bigint      NOT NULL,          -- the signed points as published
    available_delta bigint     NOT NULL DEFAULT 0,  -- change of the spendable balance
    pending_delta  bigint      NOT NULL DEFAULT 0,
    held_delta     bigint      NOT NULL DEFAULT 0,
    balance        bigint      NOT NULL CHECK (balance >= 0),  -- spendable after the entry
    reason         text        NOT NULL,
    order_id       text,
    cause          text        NOT NULL UNIQUE,
    occurred_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ledger_by_account ON ledger (account_id, entry_id DESC);

-- Append-only: entries are never changed or removed (erasure pseudonymises the account).
CREATE FUNCTION ledger_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the loyalty ledger is append-only';
END $$;
CREATE TRIGGER ledger_append_only BEFORE UPDATE OR DELETE ON ledger
    FOR EACH ROW EXECUTE FUNCTION ledger_append_only();

-- Orders as loyalty saw them placed: lines (for earning and returns), what they redeem.
CREATE TABLE orders (
    order_id         text        PRIMARY KEY,
    account_id       bigint      REFERENCES accounts (account_id),
    channel          text        NOT NULL,
    currency         text        NOT NULL,
    gross            numeric(14,2) NOT NULL,
    lines            jsonb       NOT NULL,     -- [{sku, qty, unit_price}]
    points_to_redeem integer,
    redeemed         integer     NOT NULL DEFAULT 0 CHECK (redeemed >= 0),
    given_back       integer     NOT NULL DEFAULT 0 CHECK (given_back >= 0 AND given_back <= redeemed),
    returned_value   numeric(14,2) NOT NULL DEFAULT 0,
    placed_at        timestamptz NOT NULL DEFAULT now()
);

-- Points earned on one order: pending until ``available_at``; returned units reverse them.
CREATE TABLE earnings (
    order_id       text        PRIMARY KEY REFERENCES orders (order_id),
    account_id     bigint      NOT NULL REFERENCES accounts (account_id),
    points         integer     NOT NULL CHECK (points >= 0),
    reversed       integer     NOT NULL DEFAULT 0 CHECK (reversed >= 0 AND reversed <= points),
    lines          jsonb       NOT NULL,       -- [{sku, qty, value, points}]
    returned       jsonb       NOT NULL DEFAULT '{}',  -- sku -> units returned
    status         text        NOT NULL CHECK (status IN ('pending', 'available')),
    available_at   timestamptz NOT NULL,
    earned_at      timestamptz NOT NULL DEFAULT now()
);

-- Points set aside for a checkout, until the order is confirmed, rejected or cancelled.
CREATE TABLE holds (
    order_id     text        PRIMARY KEY,
    account_id   bigint      NOT NULL REFERENCES accounts (account_id),
    points       integer     NOT NULL CHECK (points > 0),
    status       text        NOT NULL CHECK (status IN ('held', 'redeemed', 'released')),
    created_at   timestamptz NOT NULL DEFAULT now(),
    settled_at   timestamptz
);

-- Qualifying spend (negative for returns), summed over a rolling 12 months for tiers.
CREATE TABLE spend (
    account_id   bigint        NOT NULL REFERENCES accounts (account_id),
    cause        text          PRIMARY KEY,
    amount       numeric(14,2) NOT NULL,
    at           timestamptz   NOT NULL
);
CREATE INDEX spend_by_account ON spend (account_id, at);

-- What each shopper bought (offers are for what they have not), and what sells together.
CREATE TABLE purchases (
    account_id   bigint  NOT NULL REFERENCES accounts (account_id),
    sku          text    NOT NULL,
    PRIMARY KEY (account_id, sku)
);
CREATE TABLE cooccurrence (
    sku          text    NOT NULL,
    other_sku    text    NOT NULL,
    n            integer NOT NULL CHECK (n > 0),
    PRIMARY KEY (sku, other_sku)
);

-- Stock as inventory.availability.v1 tells it: online per SKU, and per store.
CREATE TABLE stock (
    sku               text    NOT NULL,
    location_id       text    NOT NULL,
    available         integer NOT NULL,
    online_available  integer NOT NULL,
    changed_at        timestamptz NOT NULL,
    PRIMARY KEY (sku, location_id)
);

-- Offers issued; at most one open offer per shopper.
CREATE TABLE offers (
    offer_id     text        PRIMARY KEY,
    account_id   bigint      NOT NULL REFERENCES accounts (account_id),
    sku          text        NOT NULL,
    reward       text        NOT NULL,
    valid_until  timestamptz NOT NULL,
    issued_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX offers_by_account ON offers (account_id, valid_until DESC);
