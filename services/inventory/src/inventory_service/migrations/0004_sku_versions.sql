-- Per-SKU version of availability events (across locations), so consumers can drop a
-- redelivered or replayed older one.
CREATE TABLE sku_versions (
    sku      text   PRIMARY KEY,
    version  bigint NOT NULL CHECK (version >= 1)
);
