// @omni/contracts: the Omni platform's public Kafka contract for TypeScript.
//
// The event types and the topic catalogue are generated from the committed JSON Schemas
// (docs/schemas/, themselves generated from the Python models); `encode` and `decode`
// speak CloudEvents 1.0 in Kafka binary mode, as every service does.
export * from "./generated/events.js";
export * from "./generated/catalogue.js";
export * from "./cloudevents.js";
