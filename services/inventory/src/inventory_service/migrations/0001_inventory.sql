-- Inventory: locations, stock per SKU x location, reservations, lost demand, discrepancies.
-- Unqualified names: the service's schema comes from search_path.

CREATE TABLE locations (
    location_id          text        PRIMARY KEY,
    name                 text        NOT NULL,
    kind                 text        NOT NULL CHECK (kind IN ('store', 'warehouse')),
    ships_online         boolean     NOT NULL DEFAULT false,
    offers_pickup        boolean     NOT NULL DEFAULT false,
    safety_stock         integer     NOT NULL DEFAULT 0 CHECK (safety_stock >= 0),
    low_stock_threshold  integer     NOT NULL DEFAULT 5 CHECK (low_stock_threshold >= 0),
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now()
);

-- One row per SKU x location. The CHECKs are the backstop behind the conditional updates:
-- whatever a bug or a race tries, stock is never negative and never oversold.
CREATE TABLE stock (
    sku          text        NOT NULL,
    location_id  text        NOT NULL REFERENCES locations (location_id),
    on_hand      integer     NOT NULL DEFAULT 0,
    reserved     integer     NOT NULL DEFAULT 0,
    -- The status last told to channels, so the next event carries an exact previous_status.
    status       text        NOT NULL DEFAULT 'out_of_stock'
                             CHECK (status IN ('in_stock', 'low_stock', 'out_of_stock')),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (sku, location_id),
    CONSTRAINT on_hand_not_negative CHECK (on_hand >= 0),
    CONSTRAINT reserved_not_negative CHECK (reserved >= 0),
    CONSTRAINT not_oversold CHECK (reserved <= on_hand)
);
CREATE INDEX stock_by_location ON stock (location_id, sku);

-- One answer per order: held until confirmed or expired, then fulfilled or released; or
-- rejected (nothing held). Keeps a redelivered order.placed from being answered twice.
CREATE TABLE reservations (
    order_id             text        PRIMARY KEY,
    state                text        NOT NULL
                                     CHECK (state IN ('held', 'confirmed', 'fulfilled', 'released', 'rejected')),
    fulfillment          text        NOT NULL CHECK (fulfillment IN ('delivery', 'pickup')),
    pickup_location_id   text,
    channel              text,
    customer_id          text,
    -- The customer journey of the order, for events this reservation causes later (expiry).
    correlation_id       text,
    expires_at           timestamptz,
    closed_reason        text,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE reservation_holds (
    order_id     text    NOT NULL REFERENCES reservations (order_id),
    sku          text    NOT NULL,
    location_id  text    NOT NULL,
    qty          integer NOT NULL CHECK (qty > 0),
    PRIMARY KEY (order_id, sku, location_id)
);

-- Demand we could not serve: one row per short SKU of a rejected reservation.
CREATE TABLE lost_demand (
    id            bigserial     PRIMARY KEY,
    order_id      text          NOT NULL,
    sku           text          NOT NULL,
    -- The pickup store; NULL for delivery orders (all shipping locations were short).
    location_id   text,
    fulfillment   text          NOT NULL,
    channel       text,
    requested     integer       NOT NULL CHECK (requested > 0),
    available     integer       NOT NULL CHECK (available >= 0),
    missing       integer       NOT NULL CHECK (missing > 0),
    unit_price    numeric(14, 2) NOT NULL,
    currency      text          NOT NULL,
    revenue       numeric(16, 2) NOT NULL,
    recorded_at   timestamptz   NOT NULL DEFAULT now(),
    UNIQUE (order_id, sku)
);
CREATE INDEX lost_demand_recorded_at ON lost_demand (recorded_at);

-- A till sold more than the records said was there: someone should count the shelf.
CREATE TABLE discrepancies (
    id                  bigserial   PRIMARY KEY,
    sku                 text        NOT NULL,
    location_id         text        NOT NULL,
    sale_id             text        NOT NULL,
    sold                integer     NOT NULL CHECK (sold > 0),
    recorded_available  integer     NOT NULL,
    shortfall           integer     NOT NULL CHECK (shortfall > 0),
    recorded_at         timestamptz NOT NULL DEFAULT now(),
    resolved_at         timestamptz,
    resolved_by         text
);
CREATE INDEX discrepancies_open ON discrepancies (sku, location_id) WHERE resolved_at IS NULL;

-- Returns already put back on the shelf (a return may be told more than once).
CREATE TABLE restocked_returns (
    return_id     text        PRIMARY KEY,
    order_id      text        NOT NULL,
    location_id   text        NOT NULL,
    restocked_at  timestamptz NOT NULL DEFAULT now()
);
