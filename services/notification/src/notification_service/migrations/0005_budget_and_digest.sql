-- One contact budget across channels, and digests.
--
-- digest_id: the notification_id of the first message of the digest a message went out in
-- (NULL: it went alone). A digest is one contact, however many messages it holds.
-- not_before: a pending marketing message waits until then for others to join its digest
-- (NOTIFY_DIGEST_WAIT_S); NULL: due at once.
ALTER TABLE notifications ADD COLUMN digest_id text;
ALTER TABLE notifications ADD COLUMN not_before timestamptz;
-- The budget counts every purpose now, not marketing alone.
DROP INDEX IF EXISTS notifications_marketing;
CREATE INDEX notifications_contacts ON notifications (customer_id, decided_at)
    WHERE status IN ('pending', 'sending', 'sent');
CREATE INDEX notifications_deferred ON notifications (customer_id, deferred_until)
    WHERE status = 'deferred';
