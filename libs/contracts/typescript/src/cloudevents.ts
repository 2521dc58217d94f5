// CloudEvents 1.0 in Kafka binary content mode, as the platform writes and reads them: the
// message value is the event's data as UTF-8 JSON, the envelope travels in `ce_*` headers
// plus `content-type`, and the platform's `correlation_id`, `causation_id` and W3C trace
// context ride along. The same rules as omni_contracts.envelope (Python).
//
// Client-agnostic: `encode` returns plain strings that kafkajs (and most clients) send as
// they are, and `decode` takes anything shaped like a consumed kafkajs message.
import {
  EVENT_TYPES,
  type EventDataMap,
  type EventType,
  type Topic,
  type TopicEventType,
} from "./generated/catalogue.js";

export const SPECVERSION = "1.0";
export const CONTENT_TYPE = "application/json";

/** The Kafka header names of the envelope. */
export const HEADERS = {
  specversion: "ce_specversion",
  id: "ce_id",
  type: "ce_type",
  source: "ce_source",
  time: "ce_time",
  subject: "ce_subject",
  contentType: "content-type",
  correlationId: "correlation_id",
  causationId: "causation_id",
  traceparent: "traceparent",
  tracestate: "tracestate",
} as const;

/** The CloudEvents attributes and platform extras of one message. Times are strings. */
export interface Envelope {
  /** `ce_id`: unique per event, the consumer's deduplication key (a UUID). */
  id: string;
  /** `ce_type`, such as `store.sale.recorded`. */
  type: string;
  /** `ce_source`: who produced it, such as `/channels/pos/store-017`. */
  source: string;
  /** `ce_time`: RFC 3339. */
  time: string;
  /** `ce_subject`: the entity the event is about (the Kafka key by default). */
  subject?: string;
  /** One customer journey or order, across all its events. */
  correlationId?: string;
  /** The `ce_id` of the event that caused this one. */
  causationId?: string;
  traceparent?: string;
  tracestate?: string;
}

/** What `encode` needs besides the event: at least who is sending it. */
export interface EncodeOptions {
  /** `ce_source`, such as `/channels/web` or `/channels/pos/store-017`. */
  source: string;
  /** Default: a fresh UUID. Keep the same id when retrying a send, so it is deduplicated. */
  id?: string;
  /** Default: now. An RFC 3339 string. */
  time?: string;
  /** Default: the event's Kafka key. */
  subject?: string;
  /** Default: the event's own id (the start of a journey). */
  correlationId?: string;
  causationId?: string;
  traceparent?: string;
  tracestate?: string;
}

/** A message to produce: `producer.send({ topic, messages: [message] })`. */
export interface KafkaRecord<T extends EventType = EventType> {
  topic: (typeof EVENT_TYPES)[T]["topic"];
  message: {
    key: string;
    value: string;
    headers: Record<string, string>;
  };
}

/** A header value as clients hand them over (kafkajs: Buffer, string or a list of them). */
export type HeaderValue = Uint8Array | string | (Uint8Array | string)[] | undefined;

/** A consumed message, as kafkajs (and most clients) deliver it. */
export interface ConsumedMessage {
  key?: Uint8Array | string | null;
  value: Uint8Array | string | null;
  headers?: Record<string, HeaderValue>;
}

/** One decoded event: its type, its data typed by that type, and its envelope. */
export type Decoded<T extends EventType = EventType> = T extends EventType
  ? { type: T; data: EventDataMap[T]; envelope: Envelope }
  : never;

/** The message is not a valid CloudEvents binary-mode event of the contract. */
export class ContractError extends Error {
  override name = "ContractError";
}

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
const RFC3339 = /^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$/;
const utf8 = new TextDecoder("utf-8", { fatal: true });

/** A random (version 4) UUID: Web Crypto where the runtime has it. */
function uuid(): string {
  const webCrypto = (globalThis as { crypto?: { randomUUID?: () => string } }).crypto;
  if (webCrypto?.randomUUID) return webCrypto.randomUUID();
  // Node 18 hides Web Crypto behind a flag; an id only has to be unique, not secret.
  const hex = Array.from({ length: 32 }, () => Math.floor(Math.random() * 16).toString(16));
  hex[12] = "4";
  hex[16] = ((parseInt(hex[16] as string, 16) & 0x3) | 0x8).toString(16);
  const h = hex.join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/** Whether `type` is an event type of this version of the contract. */
export function isEventType(type: string): type is EventType {
  return Object.prototype.hasOwnProperty.call(EVENT_TYPES, type);
}

/** The event's data, its Kafka key, topic and `ce_*` headers, ready to produce. */
export function encode<T extends EventType>(
  type: T,
  data: EventDataMap[T],
  options: EncodeOptions,
): KafkaRecord<T> {
  if (!isEventType(type)) throw new ContractError(`unknown event type ${JSON.stringify(type)}`);
  const spec = EVENT_TYPES[type];
  const key = (data as unknown as Record<string, unknown>)[spec.key];
  if (typeof key !== "string" || key === "") {
    throw new ContractError(`${type} needs its key field ${spec.key} (a non-empty string)`);
  }
  if (!options.source) throw new ContractError("a source (ce_source) is required");
  const id = options.id ?? uuid();
  const headers: Record<string, string> = {
    [HEADERS.specversion]: SPECVERSION,
    [HEADERS.id]: id,
    [HEADERS.type]: type,
    [HEADERS.source]: options.source,
    [HEADERS.time]: options.time ?? new Date().toISOString(),
    [HEADERS.contentType]: CONTENT_TYPE,
    [HEADERS.subject]: options.subject ?? key,
    [HEADERS.correlationId]: options.correlationId ?? id,
  };
  for (const name of ["causationId", "traceparent", "tracestate"] as const) {
    const value = options[name];
    if (value !== undefined) headers[HEADERS[name]] = value;
  }
  return { topic: spec.topic, message: { key, value: JSON.stringify(data), headers } };
}

function text(value: Uint8Array | string): string {
  if (typeof value === "string") return value;
  try {
    return utf8.decode(value);
  } catch {
    throw new ContractError("a header or the value is not UTF-8");
  }
}

function header(headers: Record<string, HeaderValue>, name: string): string | undefined {
  const value = headers[name];
  if (value === undefined) return undefined;
  // A header repeated: the first one, as Kafka clients read a single value.
  const first = Array.isArray(value) ? value[0] : value;
  return first === undefined ? undefined : text(first);
}

/** The envelope in a message's headers, or a `ContractError` saying what is wrong. */
export function decodeEnvelope(headers: Record<string, HeaderValue> = {}): Envelope {
  const get = (name: string) => header(headers, name);
  const missing = [HEADERS.id, HEADERS.type, HEADERS.source].filter((name) => !get(name));
  if (missing.length) throw new ContractError(`missing CloudEvents header(s): ${missing.join(", ")}`);
  const specversion = get(HEADERS.specversion) ?? SPECVERSION;
  if (specversion !== SPECVERSION) throw new ContractError(`unsupported ce_specversion ${specversion}`);
  const contentType = get(HEADERS.contentType);
  if (contentType !== undefined && contentType.split(";")[0]?.trim() !== CONTENT_TYPE) {
    throw new ContractError(`content-type ${contentType} is not ${CONTENT_TYPE}`);
  }
  const id = get(HEADERS.id) as string;
  if (!UUID.test(id)) throw new ContractError(`ce_id ${id} is not a UUID`);
  const time = get(HEADERS.time);
  if (time !== undefined && !RFC3339.test(time)) {
    throw new ContractError(`ce_time ${time} is not RFC 3339 with a timezone`);
  }
  const envelope: Envelope = {
    id,
    type: get(HEADERS.type) as string,
    source: get(HEADERS.source) as string,
    // Absent: the time it is read, as the platform's own consumers do.
    time: time ?? new Date().toISOString(),
  };
  for (const name of ["subject", "correlationId", "causationId", "traceparent", "tracestate"] as const) {
    const value = get(HEADERS[name]);
    if (value !== undefined) envelope[name] = value;
  }
  return envelope;
}

/**
 * A consumed message as a typed event; `undefined` for an event type this version of the
 * package does not know (the contract adds event types: skip them). With `topic`, an event
 * type that does not belong on that topic is an error.
 *
 * The data is parsed, not validated: validate it against `docs/schemas/` (ajv) where a
 * producer is not trusted.
 */
export function decode(message: ConsumedMessage): Decoded | undefined;
export function decode<P extends Topic>(
  message: ConsumedMessage,
  topic: P,
): Decoded<TopicEventType<P>> | undefined;
export function decode(message: ConsumedMessage, topic?: Topic): Decoded | undefined {
  const envelope = decodeEnvelope(message.headers);
  if (!isEventType(envelope.type)) return undefined;
  const expected = EVENT_TYPES[envelope.type].topic;
  if (topic !== undefined && expected !== topic) {
    throw new ContractError(`${envelope.type} belongs on ${expected}, not on ${topic}`);
  }
  if (message.value === null || message.value.length === 0) {
    throw new ContractError("empty message value");
  }
  let data: unknown;
  try {
    data = JSON.parse(text(message.value));
  } catch (error) {
    if (error instanceof ContractError) throw error;
    throw new ContractError(`malformed JSON: ${(error as Error).message}`);
  }
  if (data === null || typeof data !== "object" || Array.isArray(data)) {
    throw new ContractError("the value is not a JSON object");
  }
  return { type: envelope.type, data, envelope } as Decoded;
}
