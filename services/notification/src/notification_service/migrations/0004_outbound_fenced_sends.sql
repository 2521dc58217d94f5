-- A send is fenced: each claim writes a new token, and only the claim holding it may record
-- the outcome. A send taken over after its lease ran out can no longer be finished by the
-- instance that lost it (it would record a second outcome and emit a second event).
ALTER TABLE notifications ADD COLUMN claim_token uuid;
