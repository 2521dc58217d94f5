-- A row with a null payload is a tombstone: published as a keyed null value, which makes a
-- log-compacted topic forget the key (erasure of a profile, a merged-away profile).
ALTER TABLE outbox ALTER COLUMN payload DROP NOT NULL;
