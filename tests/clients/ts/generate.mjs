// Writes schema.d.ts from a served OpenAPI document with openapi-typescript:
//   node generate.mjs <document URL or file> <output schema.d.ts>
// File parts (`format: binary`) become Blob, so multipart bodies type-check with real files.
// `defaultNonNullable: false`: a property with a default (`k`, optional fields defaulting to
// null) stays optional; the default (true) would make request bodies demand every one.
import fs from "node:fs";
import openapiTS, { astToString } from "openapi-typescript";
import ts from "typescript";

const [source, output] = process.argv.slice(2);
const BLOB = ts.factory.createTypeReferenceNode(ts.factory.createIdentifier("Blob"));
const location = /^https?:/.test(source) ? new URL(source) : new URL(`file://${fs.realpathSync(source)}`);
const ast = await openapiTS(location, {
  defaultNonNullable: false,
  transform(schema) {
    if (schema.format === "binary") return BLOB;
    return undefined;
  },
});
fs.writeFileSync(output, astToString(ast));
