-- Lock some SKUs for the current transaction and read their stock, in one round trip.
--
-- The advisory locks are taken one by one in ascending key order, so two transactions
-- naming the same SKUs in any order cannot deadlock. The SELECT runs after the locks are
-- held: in READ COMMITTED each statement of a PL/pgSQL function takes a fresh snapshot, so
-- it sees everything committed by whoever held a lock before us (a single SQL statement
-- would have taken its snapshot before waiting, and could read stale stock).
CREATE FUNCTION lock_and_read_stock(namespace text, skus text[], also_locations text[])
RETURNS TABLE (
    what text, sku text, location_id text, on_hand integer, reserved integer, status text,
    name text, kind text, ships_online boolean, offers_pickup boolean, safety_stock integer,
    low_stock_threshold integer
)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    lock_key bigint;
BEGIN
    FOR lock_key IN
        SELECT DISTINCT hashtextextended(namespace || s, 0) FROM unnest(skus) AS s ORDER BY 1
    LOOP
        PERFORM pg_advisory_xact_lock(lock_key);
    END LOOP;
    RETURN QUERY
        SELECT 'stock', s.sku, s.location_id, s.on_hand, s.reserved, s.status,
               NULL::text, NULL::text, NULL::boolean, NULL::boolean, NULL::integer, NULL::integer
          FROM stock AS s WHERE s.sku = ANY(skus)
        UNION ALL
        SELECT 'location', NULL, l.location_id, NULL, NULL, NULL, l.name, l.kind,
               l.ships_online, l.offers_pickup, l.safety_stock, l.low_stock_threshold
          FROM locations AS l
         WHERE l.location_id = ANY(also_locations)
            OR l.location_id IN (SELECT st.location_id FROM stock AS st WHERE st.sku = ANY(skus));
END
$$;
