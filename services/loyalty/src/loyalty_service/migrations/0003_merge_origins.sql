-- Merges that can be undone (customer.profiles.unmerged). A merge used to rename the merged
-- account ('merged:' || account_id) and forget the id; an event naming the merged id later
-- opened a fresh account under it, and nothing remembered whose points were whose. Now:
--
-- * merged_customers keeps each merged id with its own (retired) account and the account
--   its points went to: an event naming the id posts on the survivor's account, recorded
--   as the merged account's (origin_account), and an unmerge knows where to move back.
-- * ledger.origin_account: the account whose points an entry moves when that is not the
--   entry's own account (an event naming a merged id, a merged account's order, hold or
--   earning settled on the survivor, the points a merge brought in). NULL: the account's
--   own. An account id, not a customer id: the ledger is append-only and keeps no names.
-- * ledger.lifetime_delta: the entry's change of lifetime points (the other buckets had
--   theirs), so a merged account's share of every bucket is a sum over the ledger.
-- * orders, earnings, holds, spend: origin_account, so entries settling them later are
--   attributed, and an unmerge moves them back; cards.merged_from: the merged account a
--   card came from.
--
-- Rows written before this migration have NULL origins and lifetime_delta 0: they count as
-- their account's own. A merge made before it kept no id (its account was renamed), so an
-- unmerge of it finds no merged_customers row and moves nothing.

CREATE TABLE merged_customers (
    customer_id   text        PRIMARY KEY,
    account_id    bigint      NOT NULL REFERENCES accounts (account_id),
    into_account  bigint      NOT NULL REFERENCES accounts (account_id),
    merged_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX merged_customers_into ON merged_customers (into_account);

ALTER TABLE ledger ADD COLUMN origin_account bigint REFERENCES accounts (account_id);
ALTER TABLE ledger ADD COLUMN lifetime_delta bigint NOT NULL DEFAULT 0;
CREATE INDEX ledger_by_origin ON ledger (account_id, origin_account)
    WHERE origin_account IS NOT NULL;

ALTER TABLE orders ADD COLUMN origin_account bigint REFERENCES accounts (account_id);
ALTER TABLE earnings ADD COLUMN origin_account bigint REFERENCES accounts (account_id);
ALTER TABLE holds ADD COLUMN origin_account bigint REFERENCES accounts (account_id);
ALTER TABLE spend ADD COLUMN origin_account bigint REFERENCES accounts (account_id);
ALTER TABLE cards ADD COLUMN merged_from bigint REFERENCES accounts (account_id);
