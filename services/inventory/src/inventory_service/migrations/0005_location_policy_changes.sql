-- A location's policy (shipping, safety stock, threshold) changed and what it changed is
-- still being told, a bounded batch of its SKUs per transaction: one transaction locking
-- every SKU of a large location overflowed the shared lock table. One row per location
-- being told: the policy told before, and the last SKU told since (NULL: none yet).
CREATE TABLE location_policy_changes (
    location_id          text        PRIMARY KEY,
    ships_online         boolean     NOT NULL,
    safety_stock         integer     NOT NULL,
    low_stock_threshold  integer     NOT NULL,
    after_sku            text,
    changed_at           timestamptz NOT NULL DEFAULT now()
);
