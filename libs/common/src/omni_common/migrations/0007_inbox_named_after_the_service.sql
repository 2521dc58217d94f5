-- The inbox has one name per service, the service's own: a ce_id is unique across topics.
-- Rows recorded under the older "<service>:<topic>" names keep deduplicating under it.
UPDATE inbox AS i SET consumer = split_part(i.consumer, ':', 1)
WHERE i.consumer LIKE '%:%'
  AND NOT EXISTS (
      SELECT 1 FROM inbox AS o WHERE o.consumer = split_part(i.consumer, ':', 1) AND o.ce_id = i.ce_id
  );
