-- Erased shoppers stay erased: an erasure renames the account to its pseudonym
-- ('erased:' || account_id), so a later event naming the shopper's id found no account and
-- opened a fresh one under that id. The id is kept here, pointing at the pseudonymised
-- account, so every later look-up of the id finds that account, marked erased.
CREATE TABLE erased_customers (
    customer_id  text        PRIMARY KEY,
    account_id   bigint      NOT NULL REFERENCES accounts (account_id),
    erased_at    timestamptz NOT NULL DEFAULT now()
);
