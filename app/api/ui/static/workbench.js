/* vsearch workbench: the search and duplicates review pages.
 *
 * Plain browser JavaScript, no build step and no third-party code. Every request goes to
 * this service only; thumbnails are fetched with the API key and shown from blob URLs, so
 * the pages work when reads need a key and never load anything from another host.
 */
"use strict";

const KEY_STORAGE = "vsearch.apiKey";
const body = document.body;
const FLOOR = parseFloat(body.dataset.floor);

// api ------------------------------------------------------------------------------------
function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(method, path, options = {}) {
  const headers = { ...(options.headers || {}) };
  const key = apiKey();
  if (key) headers["X-API-Key"] = key;
  let payload = options.body;
  if (payload !== undefined && !(payload instanceof FormData)) {
    headers["Content-Type"] = "application/json";
    payload = JSON.stringify(payload);
  }
  const response = await fetch(path, { method, headers, body: payload });
  if (response.status === 204) return null;
  const type = response.headers.get("content-type") || "";
  if (!response.ok) {
    let code = "http_" + response.status;
    let message = response.statusText;
    if (type.includes("json")) {
      const err = (await response.json()).error || {};
      code = err.code || code;
      message = err.message || message;
    }
    if (response.status === 401) askForKey(message);
    throw new ApiError(response.status, code, message);
  }
  return type.includes("json") ? response.json() : response.blob();
}

function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v !== undefined && v !== null && v !== "") q.set(k, v);
  }
  return q.toString();
}

// the key: entered once, kept in sessionStorage (gone when the browser session ends) ------
function askForKey(message) {
  const input = document.getElementById("api-key");
  document.getElementById("key-state").textContent = message || "A key is needed.";
  input.focus();
}

function setupKey() {
  const form = document.getElementById("key-form");
  const input = document.getElementById("api-key");
  const state = document.getElementById("key-state");
  state.textContent = apiKey() ? "key set" : "";
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (input.value) sessionStorage.setItem(KEY_STORAGE, input.value);
    else sessionStorage.removeItem(KEY_STORAGE);
    input.value = "";
    state.textContent = apiKey() ? "key set" : "no key";
    input.blur();
    body.dispatchEvent(new Event("keychange"));
  });
}

function toast(text) {
  const el = document.getElementById("toast");
  el.textContent = text;
  el.classList.add("show");
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => el.classList.remove("show"), 2500);
}

// thumbnails and products, cached for the page's life ----------------------------------
const thumbnails = new Map();
const products = new Map();

function thumbnail(imageId) {
  if (!thumbnails.has(imageId)) {
    const url = api("GET", `/images/${imageId}/thumbnail`).then((blob) =>
      URL.createObjectURL(blob)
    );
    url.catch(() => thumbnails.delete(imageId));
    thumbnails.set(imageId, url);
  }
  return thumbnails.get(imageId);
}

function thumbImg(imageId, alt) {
  const img = document.createElement("img");
  img.alt = alt || "";
  img.className = "thumb";
  img.dataset.imageId = imageId;
  thumbnail(imageId)
    .then((url) => (img.src = url))
    .catch(() => img.classList.add("missing"));
  return img;
}

function product(id) {
  if (!products.has(id)) {
    const p = api("GET", `/products/${encodeURIComponent(id)}`);
    p.catch(() => products.delete(id));
    products.set(id, p);
  }
  return products.get(id);
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function fmt(value) {
  if (value === null || value === undefined) return "—";
  return typeof value === "object" ? JSON.stringify(value) : String(value);
}

// review page ----------------------------------------------------------------------------
const review = {
  threshold: 0.9,
  view: "pairs",
  queue: [],
  cursor: null,
  exhausted: false,
  loading: null,
  seen: new Set(), // pairs decided or skipped on this page: never shown again
  history: [], // {a, b, decision, pairs?} newest last
  stats: null,
  current: null,
  audit: [],
  generation: 0,
};

function pairKey(a, b) {
  return a < b ? `${a}\u0000${b}` : `${b}\u0000${a}`;
}

async function loadStats() {
  try {
    review.stats = await api("GET", "/duplicates/calibration");
  } catch (err) {
    review.stats = null;
  }
  showStats();
}

// After decisions the summary is read again, at most once a second: it histograms every
// open pair, which is cheap once but not on every key press of a fast reviewer.
function scheduleStats() {
  clearTimeout(scheduleStats.timer);
  scheduleStats.timer = setTimeout(loadStats, 1000);
}

function showStats() {
  const remaining = document.getElementById("remaining");
  const precision = document.getElementById("precision");
  const stats = review.stats;
  document.getElementById("threshold-value").textContent = review.threshold.toFixed(3);
  if (!stats) {
    remaining.textContent = "";
    precision.textContent = "";
    return;
  }
  let pairs = 0;
  let expected = 0;
  let known = true;
  for (const bin of stats.histogram) {
    if (bin.score_from + 1e-9 < review.threshold) continue;
    pairs += bin.pairs;
    if (bin.probability === null) known = false;
    else expected += bin.pairs * bin.probability;
  }
  remaining.textContent = `${pairs.toLocaleString()} undecided pairs at or above ${review.threshold.toFixed(3)}`;
  remaining.dataset.count = pairs;
  if (!stats.calibrated || !known) {
    precision.textContent = `estimated precision: not calibrated yet (${stats.labels} of ${stats.min_labels} decisions)`;
    precision.dataset.value = "";
  } else if (pairs === 0) {
    precision.textContent = "estimated precision: —";
  } else {
    const value = expected / pairs;
    precision.textContent = `estimated precision ${(100 * value).toFixed(1)}% (${stats.method}, ${stats.labels} decisions)`;
    precision.dataset.value = value.toFixed(4);
  }
}

async function fillQueue() {
  if (review.loading) return review.loading;
  if (review.exhausted) return;
  const generation = review.generation;
  const loading = (async () => {
    try {
      const page = await api(
        "GET",
        "/duplicates?" +
          query({ min_score: review.threshold, undecided: true, limit: 50, cursor: review.cursor })
      );
      if (generation !== review.generation) return;
      for (const pair of page.pairs) {
        if (!review.seen.has(pairKey(pair.a, pair.b))) review.queue.push(pair);
      }
      review.cursor = page.next_cursor;
      review.exhausted = !page.next_cursor;
    } finally {
      if (review.loading === loading) review.loading = null; // not a newer queue's load
    }
  })();
  review.loading = loading;
  return loading;
}

async function resetQueue() {
  review.generation += 1;
  review.queue = [];
  review.cursor = null;
  review.exhausted = false;
  review.loading = null;
  // Until the new queue's first pair is shown there is nothing to decide: the old pair
  // leaves the screen at once, so a key pressed meanwhile never acts on a pair not shown.
  review.current = null;
  const container = document.getElementById("pair");
  container.replaceChildren(el("p", { class: "empty" }, "Loading pairs…"));
  container.dataset.pair = "";
  try {
    await nextPair();
  } catch (err) {
    // not left saying "Loading" when the load failed (no key, server gone)
    container.replaceChildren(el("p", { class: "error" }, err.message));
    throw err;
  }
}

async function nextPair() {
  const generation = review.generation;
  while (review.queue.length < 10 && !review.exhausted) {
    await fillQueue();
    if (generation !== review.generation) return; // a newer queue shows its own pair
  }
  let pair = review.queue.shift() || null;
  while (pair && review.seen.has(pairKey(pair.a, pair.b))) pair = review.queue.shift() || null;
  review.current = pair;
  renderPair(document.getElementById("pair"), review.current);
  // prefetch the next thumbnails so the following key press shows them at once
  for (const pair of review.queue.slice(0, 3)) {
    thumbnail(pair.a_image_id);
    thumbnail(pair.b_image_id);
  }
}

function badge(pair) {
  const parts = [el("span", { class: "score" }, `score ${pair.score.toFixed(4)}`)];
  if (pair.probability !== undefined && pair.probability !== null) {
    parts.push(el("span", { class: "prob" }, `P(same) ${(100 * pair.probability).toFixed(1)}%`));
  }
  if (pair.tier) parts.push(el("span", { class: `tier tier-${pair.tier}` }, pair.tier));
  return el("div", { class: "badges" }, ...parts);
}

function renderPair(container, pair) {
  container.replaceChildren();
  if (!pair) {
    container.append(
      el("p", { class: "empty" }, "No undecided pairs at this threshold. Lower it, or check the groups.")
    );
    container.dataset.pair = "";
    return;
  }
  container.dataset.pair = `${pair.a}|${pair.b}`;
  const sides = el("div", { class: "sides" });
  const table = el("table", { class: "diff" });
  container.append(badge(pair), sides, table);
  sides.append(side(pair.a, pair.a_image_id), side(pair.b, pair.b_image_id));
  Promise.all([product(pair.a), product(pair.b)])
    .then(([pa, pb]) => {
      if (container.dataset.pair !== `${pair.a}|${pair.b}`) return;
      table.append(diffTable(pa, pb));
    })
    .catch((err) => table.append(el("caption", {}, err.message)));
}

function side(id, imageId) {
  return el("figure", { class: "side" }, thumbImg(imageId, id), el("figcaption", {}, id));
}

function diffTable(pa, pb) {
  const rows = [
    ["title", pa.title, pb.title],
    ["category", pa.category, pb.category],
    ["images", pa.images.length, pb.images.length],
  ];
  const keys = [...new Set([...Object.keys(pa.attributes || {}), ...Object.keys(pb.attributes || {})])].sort();
  for (const k of keys) rows.push([k, (pa.attributes || {})[k], (pb.attributes || {})[k]]);
  const frag = document.createDocumentFragment();
  frag.append(el("tr", {}, el("th", {}, ""), el("th", {}, pa.id), el("th", {}, pb.id)));
  for (const [name, va, vb] of rows) {
    const same = fmt(va) === fmt(vb);
    frag.append(
      el("tr", { class: same ? "same" : "differs" }, el("th", {}, name), el("td", {}, fmt(va)), el("td", {}, fmt(vb)))
    );
  }
  return frag;
}

async function decide(pair, decision) {
  await api("POST", "/duplicates/decisions", { body: { a: pair.a, b: pair.b, decision } });
  review.seen.add(pairKey(pair.a, pair.b));
  const entry = { pairs: [pair], decision };
  review.history.push(entry);
  renderHistory();
  return entry;
}

async function undoEntry(entry) {
  for (const pair of entry.pairs) {
    try {
      await api("DELETE", "/duplicates/decisions?" + query({ a: pair.a, b: pair.b }));
    } catch (err) {
      if (!(err instanceof ApiError && err.status === 404)) throw err;
    }
    review.seen.delete(pairKey(pair.a, pair.b));
  }
  review.history = review.history.filter((e) => e !== entry);
  renderHistory();
  return entry;
}

function renderHistory() {
  const list = document.getElementById("history");
  list.replaceChildren();
  for (const entry of [...review.history].reverse().slice(0, 200)) {
    const label = entry.pairs.length === 1
      ? `${entry.pairs[0].a} ↔ ${entry.pairs[0].b}`
      : `group of ${entry.pairs.length + 1} (${entry.pairs[0].a} …)`;
    list.append(
      el(
        "li",
        { class: `decision-${entry.decision}` },
        el("span", { class: "verdict" }, entry.decision),
        " ",
        label,
        " ",
        el("button", { class: "link", onclick: () => undoFromHistory(entry) }, "undo")
      )
    );
  }
}

async function undoFromHistory(entry) {
  try {
    await undoEntry(entry);
    if (entry.pairs.length === 1 && review.view === "pairs") {
      if (review.current) review.queue.unshift(review.current);
      review.current = entry.pairs[0];
      renderPair(document.getElementById("pair"), review.current);
    }
    toast(`undone: ${entry.decision}`);
    scheduleStats();
  } catch (err) {
    toast(err.message);
  }
}

let busy = false;

async function onKey(event) {
  if (event.target instanceof HTMLInputElement || event.target instanceof HTMLTextAreaElement) return;
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  const key = event.key.toLowerCase();
  if (key === "g" || key === "a") {
    event.preventDefault();
    const view = key === "g" ? "groups" : "audit";
    return switchView(review.view === view ? "pairs" : view);
  }
  if (!["s", "d", "k", " ", "u"].includes(key)) return;
  event.preventDefault();
  if (busy) return;
  busy = true;
  try {
    if (key === "u") return await undoLast();
    const audit = review.view === "audit";
    const pair = audit ? review.audit[0] : review.current;
    if (review.view === "groups" || !pair) return;
    if (key === "s" || key === "d") {
      await decide(pair, key === "s" ? "same" : "different");
      toast(`${key === "s" ? "same" : "different"}: ${pair.a} ↔ ${pair.b}`);
      scheduleStats();
    } else {
      review.seen.add(pairKey(pair.a, pair.b));
    }
    if (audit) {
      review.audit.shift();
      await showAudit();
    } else {
      await nextPair();
    }
  } catch (err) {
    toast(err.message);
  } finally {
    busy = false;
  }
}

async function undoLast() {
  const entry = review.history[review.history.length - 1];
  if (!entry) return toast("nothing to undo");
  await undoFromHistory(entry);
}

function switchView(view) {
  review.view = view;
  for (const tab of document.querySelectorAll("[role=tab]")) {
    tab.setAttribute("aria-selected", String(tab.dataset.view === view));
  }
  for (const name of ["pairs", "groups", "audit"]) {
    document.getElementById(`view-${name}`).hidden = name !== view;
  }
  if (view === "groups") loadGroups(true);
  if (view === "audit") loadAudit();
}

// groups: bulk decisions with a preview and undo
const groupsState = { cursor: null };

async function loadGroups(reset) {
  const container = document.getElementById("groups");
  if (reset) {
    container.replaceChildren();
    groupsState.cursor = null;
  }
  try {
    const page = await api(
      "GET",
      "/duplicates/groups?" + query({ min_score: review.threshold, limit: 20, cursor: groupsState.cursor })
    );
    for (const group of page.groups) container.append(groupCard(group));
    if (!page.groups.length && reset) container.append(el("p", { class: "empty" }, "No groups at this threshold."));
    groupsState.cursor = page.next_cursor;
    document.getElementById("more-groups").hidden = !page.next_cursor;
  } catch (err) {
    container.append(el("p", { class: "error" }, err.message));
  }
}

function groupCard(group) {
  const card = el("article", { class: "group" });
  const members = el("div", { class: "members" });
  for (const id of group.members) {
    const fig = el("figure", { class: "side small" }, el("figcaption", {}, id));
    members.append(fig);
    product(id).then((p) => {
      if (p.images.length) fig.prepend(thumbImg(p.images[0].image_id, id));
      fig.title = p.title || "";
    });
  }
  const info = [`${group.members.length} products`, `weakest score ${group.min_score.toFixed(4)}`];
  if (group.probability !== undefined && group.probability !== null) info.push(`P(same) ≥ ${(100 * group.probability).toFixed(1)}%`);
  if (group.tier) info.push(group.tier);
  const preview = el("div", { class: "preview", hidden: "" });
  const bulk = (decision) => () => previewBulk(group, decision, preview);
  card.append(
    el("header", {}, info.join(" · ")),
    members,
    el(
      "div",
      { class: "actions" },
      el("button", { class: "same", onclick: bulk("same") }, "All the same product…"),
      el("button", { class: "different", onclick: bulk("different") }, "All different…")
    ),
    preview
  );
  return card;
}

function previewBulk(group, decision, preview) {
  const pairs = group.members.slice(1).map((m) => ({ a: group.centre, b: m }));
  preview.hidden = false;
  preview.replaceChildren(
    el("p", {}, `${pairs.length} decisions will be recorded as “${decision}”:`),
    el("ul", {}, ...pairs.map((p) => el("li", {}, `${p.a} ↔ ${p.b}`))),
    el(
      "button",
      {
        class: decision,
        onclick: async () => {
          const entry = { pairs: [], decision };
          try {
            for (const pair of pairs) {
              await api("POST", "/duplicates/decisions", { body: { ...pair, decision } });
              review.seen.add(pairKey(pair.a, pair.b));
              entry.pairs.push(pair);
            }
          } catch (err) {
            toast(err.message);
          }
          if (entry.pairs.length) review.history.push(entry);
          renderHistory();
          preview.replaceChildren(
            el("p", {}, `Recorded ${entry.pairs.length} “${decision}” decisions. `,
              el("button", { class: "link", onclick: () => undoFromHistory(entry).then(() => preview.replaceChildren(el("p", {}, "Undone."))) }, "Undo"))
          );
          scheduleStats();
        },
      },
      "Confirm"
    ),
    el("button", { onclick: () => (preview.hidden = true) }, "Cancel")
  );
}

// audit sample
async function loadAudit() {
  try {
    const page = await api("GET", "/duplicates/audit?" + query({ size: 50 }));
    review.audit = page.pairs.filter((p) => !review.seen.has(pairKey(p.a, p.b)));
  } catch (err) {
    review.audit = [];
    toast(err.message);
  }
  await showAudit();
}

async function showAudit() {
  renderPair(document.getElementById("audit-pair"), review.audit[0] || null);
}

function setupReview() {
  const slider = document.getElementById("threshold");
  review.threshold = parseFloat(slider.value);
  let timer = null;
  slider.addEventListener("input", () => {
    review.threshold = parseFloat(slider.value);
    showStats();
    clearTimeout(timer);
    timer = setTimeout(() => {
      if (review.view === "groups") loadGroups(true);
      else resetQueue();
    }, 250);
  });
  document.addEventListener("keydown", onKey);
  const press = (key) => () => onKey({ key, target: document.body, preventDefault() {} });
  document.getElementById("btn-same").addEventListener("click", press("s"));
  document.getElementById("btn-different").addEventListener("click", press("d"));
  document.getElementById("btn-skip").addEventListener("click", press("k"));
  document.getElementById("btn-undo").addEventListener("click", press("u"));
  document.getElementById("more-groups").addEventListener("click", () => loadGroups(false));
  for (const tab of document.querySelectorAll("[role=tab]")) {
    tab.addEventListener("click", () => switchView(tab.dataset.view));
  }
  body.addEventListener("keychange", () => {
    loadStats();
    resetQueue().catch((err) => toast(err.message));
  });
  loadStats();
  resetQueue().catch((err) => toast(err.message));
}

// search page ----------------------------------------------------------------------------
const search = { file: null, image: null, box: null, drag: null };

function setupSearch() {
  const drop = document.getElementById("drop");
  const input = document.getElementById("file");
  const canvas = document.getElementById("canvas");
  input.addEventListener("change", () => input.files[0] && useFile(input.files[0]));
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const file = event.dataTransfer.files[0];
    if (file) useFile(file);
  });
  canvas.addEventListener("pointerdown", (event) => {
    search.drag = canvasPoint(event);
    search.box = null;
    canvas.setPointerCapture(event.pointerId);
  });
  canvas.addEventListener("pointermove", (event) => {
    if (!search.drag) return;
    const p = canvasPoint(event);
    search.box = normalise(search.drag, p);
    drawCanvas();
  });
  canvas.addEventListener("pointerup", () => {
    search.drag = null;
    if (search.box && (search.box.w < 4 || search.box.h < 4)) search.box = null;
    drawCanvas();
    if (search.box) runSearch();
  });
  document.getElementById("clear-box").addEventListener("click", () => {
    search.box = null;
    drawCanvas();
    runSearch();
  });
  document.getElementById("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    runSearch();
  });
}

function canvasPoint(event) {
  const canvas = document.getElementById("canvas");
  const rect = canvas.getBoundingClientRect();
  const scale = search.image.width / rect.width; // canvas pixels are the image's pixels
  return {
    x: Math.max(0, Math.min(search.image.width, (event.clientX - rect.left) * scale)),
    y: Math.max(0, Math.min(search.image.height, (event.clientY - rect.top) * scale)),
  };
}

function normalise(p, q) {
  return { x: Math.min(p.x, q.x), y: Math.min(p.y, q.y), w: Math.abs(p.x - q.x), h: Math.abs(p.y - q.y) };
}

async function useFile(file) {
  search.file = file;
  search.box = null;
  // createImageBitmap applies the EXIF orientation, as the service does: the box is in
  // pixels of the upright image on both sides.
  search.image = await createImageBitmap(file, { imageOrientation: "from-image" });
  drawCanvas();
  await runSearch();
}

function drawCanvas() {
  const canvas = document.getElementById("canvas");
  if (!search.image) return;
  canvas.hidden = false;
  canvas.width = search.image.width;
  canvas.height = search.image.height;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(search.image, 0, 0);
  if (search.box) {
    const { x, y, w, h } = search.box;
    ctx.fillStyle = "rgba(0, 0, 0, 0.45)";
    ctx.fillRect(0, 0, canvas.width, y);
    ctx.fillRect(0, y + h, canvas.width, canvas.height - y - h);
    ctx.fillRect(0, y, x, h);
    ctx.fillRect(x + w, y, canvas.width - x - w, h);
    ctx.strokeStyle = "#ffd400";
    ctx.lineWidth = Math.max(2, canvas.width / 200);
    ctx.strokeRect(x, y, w, h);
  }
}

async function runSearch() {
  if (!search.file) return;
  const state = document.getElementById("search-state");
  const form = new FormData();
  form.append("image", search.file, search.file.name || "query.jpg");
  form.append("k", document.getElementById("k").value || "12");
  const category = document.getElementById("category").value.trim();
  if (category) form.append("category", category);
  const minScore = document.getElementById("min-score").value;
  if (minScore !== "") form.append("min_score", minScore);
  let boxText = "";
  if (search.box) {
    const b = search.box;
    boxText = [b.x, b.y, b.w, b.h].map((v) => Math.round(v)).join(",");
    form.append("bbox", boxText);
  }
  state.textContent = "searching…";
  state.dataset.box = boxText;
  try {
    const found = await api("POST", "/search", { body: form });
    const where = boxText ? `, box ${boxText}` : "";
    state.textContent = `${found.results.length} products in ${found.took_ms.toFixed(0)} ms${where} (model ${found.model_id})`;
    showResults(found.results);
  } catch (err) {
    state.textContent = err.message;
  }
}

function showResults(results) {
  const grid = document.getElementById("results");
  grid.replaceChildren();
  for (const hit of results) {
    const card = el(
      "button",
      { class: "result", title: "Search with this product's image", "data-id": hit.id },
      thumbImg(hit.image_id, hit.id),
      el("span", { class: "score" }, hit.score.toFixed(4)),
      el("strong", {}, hit.title || hit.id),
      el("span", { class: "muted" }, `${hit.id}${hit.category ? " · " + hit.category : ""}`)
    );
    card.addEventListener("click", async () => {
      const blob = await api("GET", `/images/${hit.image_id}/thumbnail`);
      await useFile(new File([blob], `${hit.id}.webp`, { type: blob.type || "image/webp" }));
    });
    grid.append(card);
  }
}

// start ----------------------------------------------------------------------------------
setupKey();
if (body.dataset.page === "review") setupReview();
if (body.dataset.page === "search") setupSearch();
