// Every core flow of the service through openapi-fetch, typed by the schema.d.ts that
// openapi-typescript generated from the served document. `tsc --noEmit` checks that each
// call matches the document; run with node, it checks the answers against a live server.
//
// Environment: VS_URL (the service), VS_WRITE_KEY, VS_READ_KEY, VS_IMAGE_URL (a photo of
// the oatly product on a host the service may fetch from), VS_PHOTOS (the fixture folder).
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import createClient from "openapi-fetch";
import type { components, paths } from "./schema.js";

type Schemas = components["schemas"];

function env(name: string): string {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
}

const baseUrl = env("VS_URL");
const imageUrl = env("VS_IMAGE_URL");
const photo = (name: string): Buffer => readFileSync(join(env("VS_PHOTOS"), `${name}.jpg`));
const OATLY = photo("oatly-natural-oatghurt");
const TROPICANA = photo("tropicana-apple-juice");

const writer = createClient<paths>({ baseUrl, headers: { "X-API-Key": env("VS_WRITE_KEY") } });
const reader = createClient<paths>({ baseUrl, headers: { "X-API-Key": env("VS_READ_KEY") } });
const anonymous = createClient<paths>({ baseUrl });

/** Multipart bodies: one part per field, one per file of a list. */
function form(body: object): FormData {
  const data = new FormData();
  for (const [name, value] of Object.entries(body)) {
    for (const item of Array.isArray(value) ? value : [value]) {
      if (item instanceof Blob) data.append(name, item, `${name}.jpg`);
      else if (item !== undefined) data.append(name, String(item));
    }
  }
  return data;
}

const jpeg = (bytes: Buffer): Blob => new Blob([new Uint8Array(bytes)], { type: "image/jpeg" });
const pair = (a: string, b: string): string => [a, b].sort().join("|");

async function pairs(minScore: number, undecided = false): Promise<Schemas["DuplicatePairRead"][]> {
  const found: Schemas["DuplicatePairRead"][] = [];
  let cursor: string | undefined;
  for (;;) {
    const { data } = await reader.GET("/duplicates", {
      params: {
        query: { min_score: minScore, limit: 1, undecided, ...(cursor ? { cursor } : {}) },
      },
    });
    assert.ok(data);
    found.push(...data.pairs);
    if (!data.next_cursor) return found;
    cursor = data.next_cursor;
  }
}

async function main(): Promise<void> {
  // Create as JSON: base64, a URL, a cropped image.
  const crop: Schemas["BoxIn"] = { x: 20, y: 30, w: 120, h: 100 };
  const created = await writer.POST("/products", {
    body: {
      products: [
        {
          id: "oatly",
          title: "Oatly natural oatghurt",
          category: "dairy",
          attributes: { brand: "Oatly" },
          images: [{ data: OATLY.toString("base64") }],
        },
        { id: "oatly-url", category: "dairy", images: [{ url: imageUrl }] },
        { id: "oatly-crop", category: "dairy", images: [{ data: OATLY.toString("base64"), box: crop }] },
        { id: "tropicana", category: "juice", images: [{ data: TROPICANA.toString("base64") }] },
      ],
    },
  });
  assert.deepEqual(
    created.data?.results.map((r) => [r.id, r.status]),
    [
      ["oatly", "created"],
      ["oatly-url", "created"],
      ["oatly-crop", "created"],
      ["tropicana", "created"],
    ],
  );

  // Create as a multipart upload.
  const uploaded = await writer.POST("/products/upload", {
    body: {
      id: "tropicana-upload",
      title: "Tropicana apple 1 L",
      category: "juice",
      attributes: JSON.stringify({ brand: "Tropicana" }),
      image: [jpeg(TROPICANA)],
    },
    bodySerializer: form,
  });
  assert.equal(uploaded.data?.results[0]?.status, "created", JSON.stringify(uploaded.error));

  // Get.
  const product = await reader.GET("/products/{product_id}", {
    params: { path: { product_id: "tropicana-upload" } },
  });
  assert.equal(product.data?.title, "Tropicana apple 1 L");
  assert.deepEqual(product.data?.attributes, { brand: "Tropicana" });
  const cropped = await reader.GET("/products/{product_id}", {
    params: { path: { product_id: "oatly-crop" }, query: { embeddings: true } },
  });
  assert.deepEqual(cropped.data?.images[0]?.box, [20, 30, 120, 100]);
  assert.equal(cropped.data?.images[0]?.embedding?.length, 512);

  // List, two at a time: every product exactly once.
  const seen: string[] = [];
  let cursor: string | undefined;
  for (;;) {
    const page = await reader.GET("/products", {
      params: { query: { limit: 2, ...(cursor ? { cursor } : {}) } },
    });
    assert.ok(page.data);
    seen.push(...page.data.products.map((p) => p.id));
    if (!page.data.next_cursor) break;
    cursor = page.data.next_cursor;
  }
  assert.deepEqual(seen.sort(), ["oatly", "oatly-crop", "oatly-url", "tropicana", "tropicana-upload"]);

  // Search by upload with a box and a category: the cropped listing matches the crop.
  const byUpload = await reader.POST("/search/upload", {
    body: { image: jpeg(OATLY), bbox: "20,30,120,100", k: 3, category: "dairy" },
    bodySerializer: form,
  });
  assert.equal(byUpload.data?.results[0]?.id, "oatly-crop", JSON.stringify(byUpload.error));
  assert.ok((byUpload.data?.results[0]?.score ?? 0) > 0.999);

  // Search by base64 with a filter.
  const byData = await reader.POST("/search", {
    body: { image: TROPICANA.toString("base64"), k: 5, filters: { category: "juice" } },
  });
  assert.deepEqual(byData.data?.results.map((h) => h.id).sort(), ["tropicana", "tropicana-upload"]);

  // Search by URL with a box and a filter.
  const byUrl = await reader.POST("/search", {
    body: { image_url: imageUrl, bbox: crop, k: 2, filters: { category: "dairy" }, min_score: 0.5 },
  });
  assert.equal(byUrl.data?.results[0]?.id, "oatly-crop");

  // Duplicate pairs and groups.
  const all = (await pairs(0.999)).map((p) => pair(p.a, p.b));
  assert.ok(all.includes(pair("oatly", "oatly-url")), all.join(", "));
  assert.ok(all.includes(pair("tropicana", "tropicana-upload")), all.join(", "));
  const groups = await reader.GET("/duplicates/groups", {
    params: { query: { min_score: 0.999, category: "juice" } },
  });
  assert.deepEqual(groups.data?.groups.map((g) => [...g.members].sort()), [["tropicana", "tropicana-upload"]]);

  // Decide, list, undo.
  const decision = await writer.POST("/duplicates/decisions", {
    body: { a: "oatly", b: "oatly-url", decision: "different" },
  });
  assert.equal(decision.data?.decision, "different");
  assert.ok(!(await pairs(0.999)).some((p) => pair(p.a, p.b) === pair("oatly", "oatly-url")));
  const decisions = await reader.GET("/duplicates/decisions", {
    params: { query: { decision: "different" } },
  });
  assert.deepEqual(decisions.data?.decisions.map((d) => pair(d.a, d.b)), [pair("oatly", "oatly-url")]);
  const undo = await writer.DELETE("/duplicates/decisions", {
    params: { query: { a: "oatly", b: "oatly-url" } },
  });
  assert.equal(undo.response.status, 204);
  const after = await reader.GET("/duplicates/decisions", { params: { query: {} } });
  assert.deepEqual(after.data?.decisions, []);
  assert.ok((await pairs(0.999, true)).some((p) => pair(p.a, p.b) === pair("oatly", "oatly-url")));

  // Delete.
  const deleted = await writer.DELETE("/products/{product_id}", {
    params: { path: { product_id: "oatly-url" } },
  });
  assert.equal(deleted.response.status, 204);
  const gone = await reader.GET("/products/{product_id}", {
    params: { path: { product_id: "oatly-url" } },
  });
  assert.equal(gone.response.status, 404);
  const code: "product_not_found" | "invalid_request" | "unauthorized" | "rate_limited" | "not_ready" | undefined =
    gone.error?.error.code;
  assert.equal(code, "product_not_found");

  // Keys are enforced.
  const refused = await anonymous.GET("/products", { params: { query: {} } });
  assert.equal(refused.response.status, 401);
  assert.equal(refused.error?.error.code, "unauthorized");
  const ready = await reader.GET("/ready");
  assert.equal(ready.data?.status, "ready");
  assert.equal(ready.data?.model?.embedding_dim, 512);

  console.log("typescript flows: ok");
}

await main();
