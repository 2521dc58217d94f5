-- Inventory never needed to know who an order is for, and it does not hear of erasures: a
-- reservation kept the shopper's id for good. It no longer records one; forget those kept.
-- (The column stays for one release: a pod of the previous one still inserts into it.)
UPDATE reservations SET customer_id = NULL WHERE customer_id IS NOT NULL;
