-- One profile per shopper, keyed by customer_id. A profile merged into another keeps only
-- its id and merged_into (signals for it are redirected to the survivor).
CREATE TABLE profiles (
    customer_id         text        PRIMARY KEY,
    created_at          timestamptz NOT NULL,
    updated_at          timestamptz NOT NULL DEFAULT now(),
    version             integer     NOT NULL DEFAULT 0,
    merged_into         text        REFERENCES profiles ON DELETE SET NULL,
    email               text,
    phone               text,
    loyalty_card        text,
    first_name          text,
    last_name           text,
    push_tokens         text[]      NOT NULL DEFAULT '{}',
    push_subscriptions  jsonb       NOT NULL DEFAULT '[]',
    preferences         jsonb       NOT NULL DEFAULT '{}',
    preferred_store     text,
    tier                text
);
CREATE INDEX profiles_merged_into ON profiles (merged_into) WHERE merged_into IS NOT NULL;

-- Every identifier known for a shopper: one owner per (kind, value).
CREATE TABLE identities (
    kind         text        NOT NULL,
    value        text        NOT NULL,
    customer_id  text        NOT NULL REFERENCES profiles ON DELETE CASCADE,
    first_seen   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, value)
);
CREATE INDEX identities_by_customer ON identities (customer_id, kind);

-- Identifiers presented but not applied (blocked value, limit, shared device), for support.
CREATE TABLE identity_skips (
    id           bigserial   PRIMARY KEY,
    kind         text        NOT NULL,
    value        text        NOT NULL,
    customer_id  text        NOT NULL,
    owner_id     text,
    reason       text        NOT NULL,
    at           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX identity_skips_by_customer ON identity_skips (customer_id);
CREATE INDEX identity_skips_by_owner ON identity_skips (owner_id) WHERE owner_id IS NOT NULL;

-- Shoppers who asked to be forgotten: only the opaque id stays, so late events about them
-- (an order shipped after the request) do not rebuild a profile.
CREATE TABLE erasures (
    customer_id  text        PRIMARY KEY,
    request_id   text,
    erased_at    timestamptz NOT NULL DEFAULT now()
);

-- One purchase history across channels. Keyed by purchase_key: the order id, or
-- 'sale:<sale_id>' for a till sale (seen both on store.sales.v1 and as its order).
CREATE TABLE purchases (
    purchase_key  text          PRIMARY KEY,
    order_id      text          UNIQUE,
    customer_id   text          NOT NULL,
    channel       text          NOT NULL,
    status        text          NOT NULL,
    lines         jsonb         NOT NULL,
    skus          text[]        NOT NULL,
    total         numeric(14,2) NOT NULL,
    currency      char(3)       NOT NULL,
    location_id   text,
    placed_at     timestamptz   NOT NULL,
    updated_at    timestamptz   NOT NULL DEFAULT now()
);
CREATE INDEX purchases_by_customer ON purchases (customer_id, placed_at DESC, purchase_key DESC);

-- Carts as channels last told them (the whole cart after every change).
CREATE TABLE carts (
    cart_id           text          PRIMARY KEY,
    customer_id       text,
    anonymous_id      text,
    channel           text          NOT NULL,
    status            text          NOT NULL,  -- open, abandoned, checked_out, emptied, purchased
    items             jsonb         NOT NULL,
    skus              text[]        NOT NULL,
    value             numeric(14,2) NOT NULL,
    currency          char(3),
    contents_hash     text          NOT NULL,
    announced_hash    text,
    last_activity_at  timestamptz   NOT NULL,
    updated_at        timestamptz   NOT NULL DEFAULT now()
);
CREATE INDEX carts_by_customer ON carts (customer_id) WHERE customer_id IS NOT NULL;
CREATE INDEX carts_by_anonymous ON carts (anonymous_id) WHERE customer_id IS NULL;
