-- Notification: the contact projection, what triggers need to know, and every notification
-- with its outcome. Unqualified names: the service's schema comes from search_path.

-- Rebuilt from customer.profile.updated snapshots (a compacted topic).
CREATE TABLE contacts (
    customer_id         text        PRIMARY KEY,
    version             bigint,
    email               text,
    phone               text,
    push_tokens         jsonb       NOT NULL DEFAULT '[]'::jsonb,
    push_subscriptions  jsonb       NOT NULL DEFAULT '[]'::jsonb,
    preferences         jsonb       NOT NULL DEFAULT '{}'::jsonb,
    preferred_store     text,
    updated_at          timestamptz NOT NULL DEFAULT now()
);

-- Carts bought meanwhile (checked out, or an order naming the cart): never reminded.
CREATE TABLE closed_carts (
    cart_id    text        PRIMARY KEY,
    closed_at  timestamptz NOT NULL DEFAULT now(),
    why        text        NOT NULL
);

-- What each shopper bought and when (any channel, a store sale too): a cart whose items were
-- all bought after its last activity is not reminded.
CREATE TABLE purchases (
    customer_id  text        NOT NULL,
    sku          text        NOT NULL,
    bought_at    timestamptz NOT NULL,
    PRIMARY KEY (customer_id, sku)
);

-- Last known sellable stock per SKU x location (from inventory.availability.v1).
CREATE TABLE availability (
    sku               text        NOT NULL,
    location_id       text        NOT NULL,
    available         integer     NOT NULL,
    online_available  integer     NOT NULL,
    changed_at        timestamptz NOT NULL,
    PRIMARY KEY (sku, location_id)
);
CREATE INDEX availability_sku ON availability (sku, changed_at DESC);

-- Back-in-stock sign-ups; location_id NULL means online.
CREATE TABLE stock_alerts (
    alert_id     text        PRIMARY KEY,
    customer_id  text        NOT NULL,
    sku          text        NOT NULL,
    location_id  text,
    requested_at timestamptz NOT NULL DEFAULT now(),
    done_at      timestamptz
);
CREATE UNIQUE INDEX stock_alerts_open ON stock_alerts (customer_id, sku, coalesce(location_id, ''))
    WHERE done_at IS NULL;
CREATE INDEX stock_alerts_sku ON stock_alerts (sku) WHERE done_at IS NULL;

-- Personal offers from loyalty, shown in cart reminders while valid.
CREATE TABLE offers (
    offer_key    text        PRIMARY KEY,
    customer_id  text        NOT NULL,
    description  text,
    sku          text,
    reward       text,
    valid_until  timestamptz,
    issued_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX offers_customer ON offers (customer_id, issued_at DESC);

-- One row per message decided: its outcome and why. dedup_key is unique while set, so a
-- trigger seen twice never sends twice; a duplicate is recorded with dedup_key NULL.
CREATE TABLE notifications (
    notification_id      text        PRIMARY KEY,
    customer_id          text        NOT NULL,
    dedup_key            text        UNIQUE,
    kind                 text        NOT NULL,
    purpose              text        NOT NULL CHECK (purpose IN ('transactional', 'marketing')),
    status               text        NOT NULL CHECK (status IN (
                             'pending', 'sending', 'sent', 'deferred', 'suppressed', 'failed')),
    reason               text,
    channel              text,
    language             text,
    params               jsonb,
    subject              text,
    body                 text,
    provider_message_id  text,
    attempts             integer     NOT NULL DEFAULT 0,
    recovered            boolean     NOT NULL DEFAULT false,
    deferred_until       timestamptz,
    correlation_id       text,
    caused_by            text,
    created_at           timestamptz NOT NULL DEFAULT now(),
    decided_at           timestamptz NOT NULL DEFAULT now(),
    claimed_at           timestamptz,
    updated_at           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX notifications_customer ON notifications (customer_id, created_at DESC);
CREATE INDEX notifications_to_send ON notifications (created_at) WHERE status IN ('pending', 'sending');
CREATE INDEX notifications_marketing ON notifications (customer_id, decided_at)
    WHERE purpose = 'marketing' AND status IN ('pending', 'sending', 'sent');
