// The generated catalogue says what the committed schemas say, and what encode writes is
// valid against them.
import assert from "node:assert/strict";
import { test } from "node:test";
import { EVENT_TYPES, TOPICS, encode, type StockAdjusted } from "../src/index.js";
import { readIndex, readSchema, validators } from "./support/schemas.js";

test("every topic, key and event type of docs/schemas/index.json, and no other", () => {
  const index = readIndex();
  assert.deepEqual(Object.keys(TOPICS).sort(), Object.keys(index.topics).sort());
  for (const [name, topic] of Object.entries(index.topics)) {
    const spec = TOPICS[name as keyof typeof TOPICS];
    assert.equal(spec.key, topic.key, name);
    assert.equal(spec.direction, topic.direction, name);
    assert.deepEqual([...spec.eventTypes].sort(), Object.keys(topic.events).sort(), name);
    for (const [ceType, file] of Object.entries(topic.events)) {
      const schema = readSchema(file);
      const entry = EVENT_TYPES[ceType as keyof typeof EVENT_TYPES];
      assert.deepEqual(
        [entry.topic, entry.key, entry.title, entry.schema, entry.schemaId],
        [schema["x-topic"], schema["x-key"], schema["title"], file, schema["$id"]],
      );
    }
  }
});

test("what encode writes validates against the committed schema", () => {
  const { valid, drift } = validators();
  const adjustment: StockAdjusted = {
    adjustment_id: "adj-1",
    location_id: "wh-1",
    sku: "SKU-1",
    kind: "receipt",
    delta: 5,
    occurred_at: "2026-12-01T10:00:00Z",
  };
  const record = encode("inventory.stock.adjusted", adjustment, { source: "/channels/wms" });
  const data = JSON.parse(record.message.value) as unknown;
  assert.deepEqual(valid("inventory.stock.adjusted", data), []);
  assert.deepEqual(drift("inventory.stock.adjusted", data), []);
  // A required field renamed is invalid for anyone; an optional one only the drift check sees.
  const { sku, ...noSku } = adjustment;
  assert.deepEqual(valid("inventory.stock.adjusted", { ...noSku, SKU: sku }), [
    "/ must have required property 'sku'",
  ]);
  const { delta, ...noDelta } = adjustment;
  assert.deepEqual(valid("inventory.stock.adjusted", { ...noDelta, quantity: delta }), []);
  assert.deepEqual(drift("inventory.stock.adjusted", { ...noDelta, quantity: delta }), [
    "/quantity: not in the committed schema",
  ]);
  assert.deepEqual(drift("inventory.stock.adjusted", { ...adjustment, till: "T-1" }), [
    "/till: not in the committed schema",
  ]);
  assert.ok(valid("inventory.stock.adjusted", { ...adjustment, occurred_at: "yesterday" }).length);
});
