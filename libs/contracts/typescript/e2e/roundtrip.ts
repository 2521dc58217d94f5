// A Node channel against the running platform: what a web shop, a till and a warehouse
// system written in TypeScript would do, with kafkajs and @omni/contracts alone.
//
//   KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9092 TOPIC_PREFIX=... ROUNDTRIP_STORE=store-1 \
//     node dist/e2e/roundtrip.js
//
// ROUNDTRIP_STORE must be a store inventory knows that offers pickup; OMNI_SCHEMAS_DIR
// validates against other schemas than this checkout's docs/schemas/.
//
// It receives stock at a store, sells one unit at its till and checks out two for pickup
// there, each step once the platform has answered the one before, and reads
// inventory.availability.v1 and order.lifecycle.v1 back. Every record it reads is validated
// with ajv against the committed schemas (docs/schemas/), and none may carry a field those
// schemas lack (a model changed without `make contracts`). It prints one JSON line and
// exits 0 when every answer came and every record was valid, 1 otherwise.
import { randomUUID } from "node:crypto";
import { Kafka, Partitioners, logLevel } from "kafkajs";
import {
  decode,
  encode,
  type CheckoutSubmitted,
  type Decoded,
  type EventType,
  type EventDataMap,
  type SaleRecorded,
  type StockAdjusted,
  type Topic,
} from "../src/index.js";
import { validators } from "../test/support/schemas.js";

const bootstrap = process.env["KAFKA_BOOTSTRAP_SERVERS"] ?? "127.0.0.1:9092";
const prefix = process.env["TOPIC_PREFIX"] ?? "";
const store = process.env["ROUNDTRIP_STORE"] ?? "store-001";
const timeoutMs = Number(process.env["ROUNDTRIP_TIMEOUT_MS"] ?? 60_000);
const READ: Topic[] = ["inventory.availability.v1", "order.lifecycle.v1"];

const run = randomUUID().slice(0, 8);
const sku = `SKU-NODE-${run}`;
const eur = (amount: string) => ({ amount, currency: "EUR" });

// Fields a service sends that no model declares, so no schema has them: a contract finding
// to settle (declare them, or stop sending them), not a model changed without
// `make contracts`. Listed here so that every other undeclared field fails the run.
const KNOWN_UNDECLARED: Record<string, string[]> = {
  "order.confirmed": ["/allocations"], // order copies inventory's allocations into it
};

const { valid, drift } = validators();
const seen: Decoded[] = [];
const problems: string[] = [];
const undeclared = new Set<string>();
let wake: () => void = () => {};

function record(topic: string, event: Decoded | undefined, offset: string): void {
  const where = `${topic}@${offset}`;
  if (event === undefined) {
    problems.push(`${where}: an event type this package does not know`);
  } else {
    const known = KNOWN_UNDECLARED[event.type] ?? [];
    for (const line of valid(event.type, event.data)) problems.push(`${where} ${event.type}: ${line}`);
    for (const line of drift(event.type, event.data)) {
      const field = line.split(":")[0] ?? "";
      if (known.includes(field)) undeclared.add(`${event.type} ${field}`);
      else problems.push(`${where} ${event.type}: ${line}`);
    }
    seen.push(event);
  }
  wake();
}

/** The first event read of type `type` that `match` accepts, once it arrives. */
async function answer<T extends EventType>(
  type: T,
  what: string,
  match: (data: EventDataMap[T]) => boolean,
): Promise<EventDataMap[T]> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (problems.length) throw new Error(`invalid records while waiting for ${what}`);
    const found = seen.find((e) => e.type === type && match(e.data as EventDataMap[T]));
    if (found) return found.data as EventDataMap[T];
    const left = deadline - Date.now();
    if (left <= 0) throw new Error(`no ${what} within ${timeoutMs} ms`);
    await new Promise<void>((resolve) => {
      const timer = setTimeout(resolve, Math.min(left, 500));
      wake = () => {
        clearTimeout(timer);
        resolve();
      };
    });
  }
}

async function main(): Promise<number> {
  const started = Date.now();
  const kafka = new Kafka({
    clientId: "node-channel",
    brokers: bootstrap.split(","),
    logLevel: logLevel.ERROR,
  });
  // The Java client's partitioner (murmur2), as every producer of the platform uses: the
  // same key lands on the same partition whoever sends it, so per-key order holds.
  const producer = kafka.producer({ createPartitioner: Partitioners.DefaultPartitioner });
  const consumer = kafka.consumer({ groupId: `${prefix}node-channel-${run}` });
  const send = async <T extends EventType>(type: T, data: EventDataMap[T], source: string) => {
    const { topic, message } = encode(type, data, { source });
    await producer.send({ topic: prefix + topic, messages: [message] });
  };
  const steps: string[] = [];
  try {
    await Promise.all([producer.connect(), consumer.connect()]);
    await consumer.subscribe({ topics: READ.map((t) => prefix + t), fromBeginning: true });
    await consumer.run({
      eachMessage: async ({ topic, message }) => {
        const contractTopic = topic.slice(prefix.length) as Topic;
        let event: Decoded | undefined;
        try {
          event = decode(message, contractTopic);
        } catch (error) {
          problems.push(`${topic}@${message.offset}: ${(error as Error).message}`);
          wake();
          return;
        }
        record(contractTopic, event, message.offset);
      },
    });

    // A warehouse system: goods received at the store.
    const receipt: StockAdjusted = {
      adjustment_id: `adj-${run}`,
      location_id: store,
      sku,
      kind: "receipt",
      delta: 5,
      occurred_at: new Date().toISOString(),
    };
    await send("inventory.stock.adjusted", receipt, "/channels/wms");
    await answer("inventory.availability.changed", "availability after the receipt", (a) =>
      a.sku === sku && a.location_id === store && a.on_hand === 5,
    );
    steps.push("receipt -> availability");

    // The store's till: one unit sold, anonymously.
    const sale: SaleRecorded = {
      sale_id: `sale-${run}`,
      location_id: store,
      lines: [{ sku, qty: 1, unit_price: eur("19.90") }],
      occurred_at: new Date().toISOString(),
      customer_id: null,
      total: eur("19.90"),
    };
    await send("store.sale.recorded", sale, `/channels/pos/${store}`);
    const sold = await answer("inventory.availability.changed", "availability after the sale", (a) =>
      a.sku === sku && a.cause === "sale",
    );
    if (sold.on_hand !== 4) throw new Error(`after the sale on_hand is ${sold.on_hand}, not 4`);
    await answer("order.placed", "the sale's order", (o) => o.sale_id === sale.sale_id);
    steps.push("sale -> availability, order.placed");

    // The web shop: two units to pick up at the store.
    const checkout: CheckoutSubmitted = {
      checkout_id: `chk-${run}`,
      customer_id: `cust-${run}`,
      channel: "web",
      lines: [{ sku, qty: 2, unit_price: eur("19.90") }],
      fulfillment: { type: "pickup", location_id: store },
      payment: { reference: `pay-${run}`, authorized: eur("39.80") },
    };
    await send("checkout.submitted", checkout, "/channels/web");
    const placed = await answer("order.placed", "the checkout's order", (o) =>
      o.checkout_id === checkout.checkout_id,
    );
    await answer("order.confirmed", "its confirmation", (o) => o.order_id === placed.order_id);
    const reserved = await answer("inventory.availability.changed", "the reservation", (a) =>
      a.sku === sku && a.cause === "reservation",
    );
    if (reserved.reserved !== 2 || reserved.available !== 2) {
      throw new Error(`after the reservation: ${JSON.stringify(reserved)}`);
    }
    steps.push("checkout -> order.placed, order.confirmed, availability");
  } catch (error) {
    problems.push((error as Error).message);
  } finally {
    await Promise.allSettled([consumer.disconnect(), producer.disconnect()]);
  }
  const types: Record<string, number> = {};
  for (const event of seen) types[event.type] = (types[event.type] ?? 0) + 1;
  const ok = problems.length === 0;
  const summary = {
    ok,
    validated: seen.length,
    types,
    steps,
    problems,
    undeclared: [...undeclared].sort(),
    seconds: (Date.now() - started) / 1000,
  };
  console.log(JSON.stringify(summary));
  return ok ? 0 : 1;
}

main().then(
  (code) => process.exit(code),
  (error: unknown) => {
    console.error(error);
    process.exit(2);
  },
);
