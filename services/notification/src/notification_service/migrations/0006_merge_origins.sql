-- Merges that can be undone (customer.profiles.unmerged). A merge re-homes a merged id's
-- back-in-stock alerts, offers, purchases and notification history to the survivor; each
-- moved row now keeps the id it was recorded under (origin_customer_id; the first, if it
-- moved more than once), so an unmerge can give back the restored shopper's rows. NULL:
-- the row is its customer's own, as every row written before this migration counts.
ALTER TABLE stock_alerts ADD COLUMN origin_customer_id text;
ALTER TABLE offers ADD COLUMN origin_customer_id text;
ALTER TABLE purchases ADD COLUMN origin_customer_id text;
ALTER TABLE notifications ADD COLUMN origin_customer_id text;
CREATE INDEX stock_alerts_origin ON stock_alerts (origin_customer_id)
    WHERE origin_customer_id IS NOT NULL;
CREATE INDEX offers_origin ON offers (origin_customer_id) WHERE origin_customer_id IS NOT NULL;
CREATE INDEX purchases_origin ON purchases (origin_customer_id)
    WHERE origin_customer_id IS NOT NULL;
CREATE INDEX notifications_origin ON notifications (origin_customer_id)
    WHERE origin_customer_id IS NOT NULL;
