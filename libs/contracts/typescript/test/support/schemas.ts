// The committed JSON Schemas (docs/schemas/) loaded into ajv, as a channel team validates
// what it reads. Shared by the unit tests and the round trip against the platform.
import { readFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { Ajv2020, type ErrorObject } from "ajv/dist/2020.js";
import ajvFormats from "ajv-formats";

// ajv-formats is CommonJS: under NodeNext its default import is the module, the plugin .default.
const addFormats = ajvFormats.default;

/** docs/schemas/ of this checkout (dist/test/support -> the repository root). */
export const SCHEMAS_DIR =
  process.env["OMNI_SCHEMAS_DIR"] ??
  path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../../../../../docs/schemas");

export interface Index {
  topics: Record<string, { key: string; direction: string; events: Record<string, string> }>;
}

export function readIndex(dir = SCHEMAS_DIR): Index {
  return JSON.parse(readFileSync(path.join(dir, "index.json"), "utf8")) as Index;
}

export function readSchema(file: string, dir = SCHEMAS_DIR): Record<string, any> {
  return JSON.parse(readFileSync(path.join(dir, file), "utf8")) as Record<string, any>;
}

/** What is wrong with one event's data, one line each (empty: valid). */
export type Check = (ceType: string, data: unknown) => string[];

function describe(errors: ErrorObject[]): string[] {
  return errors.map((e) =>
    e.keyword === "additionalProperties"
      ? `${e.instancePath}/${String(e.params["additionalProperty"])}: not in the committed schema`
      : `${e.instancePath || "/"} ${e.message ?? e.keyword}`,
  );
}

/**
 * Validators of every event type against the committed schemas: `valid` as any consumer
 * validates (unknown fields allowed, formats asserted), and `drift`, which also names every
 * field the committed schema does not declare: a field the code has that the schemas lack,
 * such as one renamed in a model without `make contracts`.
 */
export function validators(dir = SCHEMAS_DIR): { valid: Check; drift: Check } {
  const ajv = new Ajv2020({ allErrors: true });
  addFormats(ajv);
  ajv.addVocabulary(["x-ce-type", "x-topic", "x-key"]);
  const closed = new Ajv2020({ allErrors: true });
  addFormats(closed);
  closed.addVocabulary(["x-ce-type", "x-topic", "x-key"]);
  const ids = new Map<string, string>();
  for (const topic of Object.values(readIndex(dir).topics)) {
    for (const [ceType, file] of Object.entries(topic.events)) {
      const schema = readSchema(file, dir);
      ids.set(ceType, schema["$id"] as string);
      ajv.addSchema(schema);
      closed.addSchema(close(schema));
    }
  }
  const check =
    (instance: Ajv2020, only?: string): Check =>
    (ceType, data) => {
      const id = ids.get(ceType);
      const validate = id === undefined ? undefined : instance.getSchema(id);
      if (!validate) return [`no committed schema for ${ceType}`];
      const errors = validate(data) ? [] : (validate.errors ?? []);
      return describe(only ? errors.filter((e) => e.keyword === only) : errors);
    };
  // The closed schemas' other errors are the open ones': drift says only what is extra.
  return { valid: check(ajv), drift: check(closed, "additionalProperties") };
}

/** The schema with every object closed: `additionalProperties: true` becomes false. */
function close(node: any): any {
  if (Array.isArray(node)) return node.map(close);
  if (node === null || typeof node !== "object") return node;
  const out: Record<string, any> = {};
  for (const [key, value] of Object.entries(node)) {
    out[key] = key === "additionalProperties" && value === true ? false : close(value);
  }
  return out;
}
