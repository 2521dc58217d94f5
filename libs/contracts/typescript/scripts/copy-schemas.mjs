#!/usr/bin/env node
// Copies the committed JSON Schemas (docs/schemas/) into schemas/ before `npm pack`, so the
// package carries the schemas its types were generated from (`@omni/contracts/schemas/*`).
import { cp, rm } from "node:fs/promises";
import path from "node:path";
import { fileURLToPath } from "node:url";

const PACKAGE = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const target = path.join(PACKAGE, "schemas");
await rm(target, { recursive: true, force: true });
await cp(path.resolve(PACKAGE, "..", "..", "..", "docs", "schemas"), target, { recursive: true });
console.log("copied docs/schemas/ into schemas/");
