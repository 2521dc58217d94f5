-- What each signal said, per origin (the customer id it named), from which the profile's
-- contact and preference columns are derived: any order of arrival gives the same profile,
-- and an unmerge rebuilds each side from its own facts (domain/facts.py).
ALTER TABLE profiles ADD COLUMN facts jsonb NOT NULL DEFAULT '{"origins": {}, "joined": {}}';

-- Whose an identifier, purchase or cart was before any merge moved it: what an unmerge
-- moves back. NULL (rows from before) reads as the row's customer_id.
ALTER TABLE identities ADD COLUMN origin_id text;
ALTER TABLE purchases ADD COLUMN origin_id text;
ALTER TABLE carts ADD COLUMN origin_id text;

-- Every merge and unmerge: what joined (or left) which profile, when, on which proof.
CREATE TABLE identity_log (
    id           bigserial   PRIMARY KEY,
    customer_id  text        NOT NULL,  -- the surviving profile
    other_id     text        NOT NULL,  -- the profile merged into it, or restored from it
    action       text        NOT NULL,  -- merged, unmerged
    proof        text        NOT NULL,  -- email, phone, loyalty_card, login, request
    detail       text,
    at           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX identity_log_by_customer ON identity_log (customer_id);
CREATE INDEX identity_log_by_other ON identity_log (other_id);
