// encode/decode: CloudEvents 1.0 in Kafka binary mode, as the platform reads and writes it.
import assert from "node:assert/strict";
import { test } from "node:test";
import {
  ContractError,
  decode,
  decodeEnvelope,
  encode,
  type CheckoutSubmitted,
  type Decoded,
  type SaleRecorded,
} from "../src/index.js";

const sale: SaleRecorded = {
  sale_id: "S-1",
  location_id: "store-001",
  lines: [{ sku: "SKU-1001", qty: 2, unit_price: { amount: "19.90", currency: "EUR" } }],
  occurred_at: "2026-12-01T10:00:00Z",
  customer_id: null,
};

/** As kafkajs delivers a consumed message: Buffers for key, value and headers. */
function consumed(record: ReturnType<typeof encode>) {
  const headers = Object.fromEntries(
    Object.entries(record.message.headers).map(([name, value]) => [name, Buffer.from(value)]),
  );
  return {
    key: Buffer.from(record.message.key),
    value: Buffer.from(record.message.value),
    headers,
  };
}

test("encode: the topic, the key, the data as JSON and the envelope in ce_* headers", () => {
  const record = encode("store.sale.recorded", sale, {
    source: "/channels/pos/store-001",
    time: "2026-12-01T10:00:01Z",
    traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
  });
  assert.equal(record.topic, "store.sales.v1");
  assert.equal(record.message.key, "store-001");
  assert.deepEqual(JSON.parse(record.message.value), sale);
  const { ce_id, ...headers } = record.message.headers;
  assert.match(ce_id ?? "", /^[0-9a-f-]{36}$/);
  assert.deepEqual(headers, {
    ce_specversion: "1.0",
    ce_type: "store.sale.recorded",
    ce_source: "/channels/pos/store-001",
    ce_time: "2026-12-01T10:00:01Z",
    "content-type": "application/json",
    ce_subject: "store-001",
    correlation_id: ce_id,
    traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
  });
});

test("decode(encode(x)) is x, from Buffers as kafkajs hands them over", () => {
  const record = encode("store.sale.recorded", sale, { source: "/channels/pos/store-001" });
  const event = decode(consumed(record));
  assert.ok(event);
  assert.equal(event.type, "store.sale.recorded");
  assert.deepEqual(event.data, sale);
  assert.equal(event.envelope.id, record.message.headers["ce_id"]);
  assert.equal(event.envelope.subject, "store-001");
  assert.equal(event.envelope.correlationId, event.envelope.id);
  assert.deepEqual(decode(record.message), event, "strings decode the same");
});

test("a journey: the caused event keeps the correlation and names its cause", () => {
  const first = encode("store.sale.recorded", sale, { source: "/channels/pos/store-001" });
  const cause = decodeEnvelope(first.message.headers);
  const next = encode("store.sale.recorded", { ...sale, sale_id: "S-2" }, {
    source: "/channels/pos/store-001",
    correlationId: cause.correlationId as string,
    causationId: cause.id,
  });
  assert.equal(next.message.headers["correlation_id"], cause.id);
  assert.equal(next.message.headers["causation_id"], cause.id);
});

test("decode narrows by type, and by topic when given one", () => {
  const checkout: CheckoutSubmitted = {
    checkout_id: "chk-1",
    customer_id: "c-42",
    channel: "web",
    lines: [{ sku: "SKU-1", qty: 1, unit_price: { amount: "5.00", currency: "EUR" } }],
    fulfillment: { type: "pickup", location_id: "store-001" },
    payment: { reference: "pay-1", authorized: { amount: "5.00", currency: "EUR" } },
  };
  const message = encode("checkout.submitted", checkout, { source: "/channels/web" }).message;
  const event: Decoded | undefined = decode(message);
  if (event?.type === "checkout.submitted") {
    assert.equal(event.data.fulfillment.type, "pickup"); // typed as CheckoutSubmitted
  } else {
    assert.fail("not a checkout");
  }
  const onTopic = decode(message, "checkout.submitted.v1");
  assert.equal(onTopic?.data.payment.reference, "pay-1");
  assert.throws(() => decode(message, "store.sales.v1"), /belongs on checkout\.submitted\.v1/);
});

test("an event type this version does not know is skipped, not an error", () => {
  const message = encode("store.sale.recorded", sale, { source: "/s" }).message;
  message.headers["ce_type"] = "store.sale.gift_wrapped";
  assert.equal(decode(message), undefined);
});

test("what is not a contract event is a ContractError saying why", () => {
  const good = encode("store.sale.recorded", sale, { source: "/s" }).message;
  const broken = (headers: Record<string, string | undefined>, value: string | null = good.value) => {
    const merged = { ...good.headers, ...headers };
    for (const [name, v] of Object.entries(merged)) if (v === undefined) delete merged[name];
    return () => decode({ value, headers: merged });
  };
  const cases: [() => unknown, RegExp][] = [
    [broken({ ce_id: undefined }), /missing CloudEvents header\(s\): ce_id/],
    [broken({ ce_source: undefined, ce_type: undefined }), /ce_type, ce_source/],
    [broken({ ce_specversion: "0.3" }), /unsupported ce_specversion/],
    [broken({ ce_id: "42" }), /not a UUID/],
    [broken({ ce_time: "yesterday" }), /not RFC 3339/],
    [broken({ ce_time: "2026-12-01T10:00:00" }), /not RFC 3339/],
    [broken({ "content-type": "application/avro" }), /content-type/],
    [broken({}, "{not json"), /malformed JSON/],
    [broken({}, "[1]"), /not a JSON object/],
    [broken({}, null), /empty message value/],
    [broken({}, ""), /empty message value/],
  ];
  for (const [call, message] of cases) assert.throws(call, (e) => e instanceof ContractError && message.test(e.message));
  assert.throws(
    () => decode({ value: new Uint8Array([0xff, 0xfe]), headers: good.headers }),
    /not UTF-8/,
  );
  // JavaScript callers have no compiler to stop them.
  assert.throws(() => encode("store.sale.recorded", { ...sale, location_id: "" }, { source: "/s" }), /location_id/);
  assert.throws(() => encode("store.sale.gift_wrapped" as "store.sale.recorded", sale, { source: "/s" }), /unknown event type/);
  assert.throws(() => encode("store.sale.recorded", sale, { source: "" }), /source/);
});

test("the types hold the contract: ISO strings, closed vocabularies, required fields", () => {
  const typed = (data: SaleRecorded) => data;
  // @ts-expect-error: times are RFC 3339 strings, never Date
  typed({ ...sale, occurred_at: new Date() });
  // @ts-expect-error: money is a decimal string, never a number
  typed({ ...sale, lines: [{ sku: "A", qty: 1, unit_price: { amount: 19.9, currency: "EUR" } }] });
  // @ts-expect-error: location_id is required
  typed({ sale_id: "S-1", lines: sale.lines, occurred_at: sale.occurred_at });
  // @ts-expect-error: a misspelt field is refused in an object literal
  typed({ ...sale, terminalId: "T-1" });
  assert.throws(() =>
    // @ts-expect-error: the data must match the type named
    encode("inventory.stock.adjusted", sale, { source: "/s" }),
  );
  const checkout = (channel: CheckoutSubmitted["channel"]) => channel;
  // @ts-expect-error: channels are a closed vocabulary
  checkout("kiosk");
  assert.equal(checkout("web"), "web");
});

test("ids are version 4 UUIDs, also where the runtime has no Web Crypto (Node 18)", () => {
  const descriptor = Object.getOwnPropertyDescriptor(globalThis, "crypto");
  Object.defineProperty(globalThis, "crypto", { value: undefined, configurable: true });
  try {
    const ids = new Set<string>();
    for (let i = 0; i < 1000; i++) {
      const { message } = encode("store.sale.recorded", sale, { source: "/s" });
      ids.add(decodeEnvelope(message.headers).id);
    }
    assert.equal(ids.size, 1000);
    for (const id of ids) assert.match(id, /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
  } finally {
    if (descriptor) Object.defineProperty(globalThis, "crypto", descriptor);
  }
});
