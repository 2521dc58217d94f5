-- The writer wakes the relay itself (in-process, or a NOTIFY only when another instance leads):
-- a NOTIFY from a trigger on every committing insert serialised commits cluster-wide.
DROP TRIGGER IF EXISTS outbox_notify ON outbox;
DROP FUNCTION IF EXISTS outbox_notify();
