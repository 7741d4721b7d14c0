// BDI operator page: plain JavaScript over the public HTTP API (docs/contract.md), no build step.
// Every URL is relative to the page ("../infer"), so it works behind a reverse proxy under a path prefix.
"use strict";

const $ = (id) => document.getElementById(id);
const SVG_NS = "http://www.w3.org/2000/svg";
const state = { image: null, imageUrl: null, health: null, scores: null, current: null, previous: null };

// ------------------------------------------------------------------------------------------------ HTTP
class ApiError extends Error {}

/** The text of an error body, verbatim: shape A `error`, B `detail`, C `detail.error`, D (422) the list. */
function errorText(status, body, raw) {
  let message = raw;
  if (body && typeof body === "object") {
    const detail = body.detail;
    if (typeof body.error === "string") message = body.error;
    else if (typeof detail === "string") message = detail;
    else if (detail && typeof detail === "object" && !Array.isArray(detail)) message = detail.error || detail.message || JSON.stringify(detail);
    else if (detail !== undefined) message = JSON.stringify(detail);
  }
  return `HTTP ${status}: ${message}`;
}

// Access control (docs/security.md): when the server answers 401 the page asks for an API key once and keeps it
// for this browser tab only (sessionStorage), sending it as `Authorization: Bearer`.
const KEY_STORAGE = "bdi.apiKey";
function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORAGE);
  return key ? { Authorization: `Bearer ${key}` } : {};
}
function askForKey(status) {
  const entered = window.prompt(status === 401 ? "This server requires an API key (bdi keys create):" : "API key:");
  if (!entered || !entered.trim()) return false;
  sessionStorage.setItem(KEY_STORAGE, entered.trim());
  return true;
}
/** An <img> whose bytes need the key: fetched with it, shown from a blob URL. */
async function setAuthedSrc(img, url) {
  if (!sessionStorage.getItem(KEY_STORAGE)) { img.src = url; return; }
  const response = await fetch(url, { headers: authHeaders() });
  if (response.ok) img.src = URL.createObjectURL(await response.blob());
}

async function call(path, options = {}, retried = false) {
  const { method = "GET", query = null, json = undefined, form = null } = options;
  let url = "../" + path;
  if (query) url += "?" + new URLSearchParams(query).toString();
  const sentKey = sessionStorage.getItem(KEY_STORAGE);
  const init = { method, headers: { Accept: "application/json", ...authHeaders() } };
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  } else if (form) {
    init.body = form;
  }
  let response;
  try {
    response = await fetch(url, init);
  } catch (err) {
    throw new ApiError(`network error: ${err.message}`);
  }
  if (response.status === 401 && !retried) {
    const current = sessionStorage.getItem(KEY_STORAGE);
    if (current && current !== sentKey) return call(path, options, true);  // entered meanwhile for another call
    sessionStorage.removeItem(KEY_STORAGE);
    if (askForKey(401)) return call(path, options, true);
  }
  const raw = await response.text();
  let body = null;
  try { body = raw ? JSON.parse(raw) : null; } catch (_) { body = null; }
  if (!response.ok) throw new ApiError(errorText(response.status, body, raw));
  return { body, headers: response.headers };
}

/** Run `job` with `errorId` cleared first and filled with the error's text, verbatim, on failure. */
async function guarded(errorId, job, { busy = [], progress = null } = {}) {
  const errorEl = $(errorId);
  errorEl.textContent = "";
  busy.forEach((id) => { $(id).disabled = true; });
  if (progress) $(progress).hidden = false;
  try {
    return await job();
  } catch (err) {
    errorEl.textContent = err instanceof ApiError ? err.message : `page error: ${err.message}`;
    return undefined;
  } finally {
    busy.forEach((id) => { $(id).disabled = false; });
    if (progress) $(progress).hidden = true;
  }
}

// ------------------------------------------------------------------------------------------- target
function target() {
  return { recipe_id: $("recipe").value.trim() || "default", role_id: $("role").value.trim(),
           roi_id: $("roi").value.trim() };
}
const mmPerPx = () => Number($("mm").value);
const fmt = (v, digits = 4) => (typeof v === "number" && Number.isFinite(v) ? v.toFixed(digits) : "–");

function rememberTarget() {
  const key = "bdi-ui-targets";
  const t = target();
  let known = [];
  try { known = JSON.parse(localStorage.getItem(key) || "[]"); } catch (_) { known = []; }
  if (!known.some((k) => k.recipe_id === t.recipe_id && k.role_id === t.role_id && k.roi_id === t.roi_id)) {
    known.push(t);
    localStorage.setItem(key, JSON.stringify(known.slice(-50)));
  }
  return known;
}

function knownTargets() {
  let known = [];
  try { known = JSON.parse(localStorage.getItem("bdi-ui-targets") || "[]"); } catch (_) { known = []; }
  const synced = (state.health && state.health.registry && state.health.registry.synced) || [];
  synced.forEach((m) => known.push({ recipe_id: m.recipe_id, role_id: m.role_id, roi_id: m.roi_id,
                                     model_key: m.model_key }));
  known.push(target());
  const seen = new Set();
  return known.filter((k) => {
    const id = [k.recipe_id, k.role_id, k.roi_id, k.model_key || ""].join("\u0000");
    if (seen.has(id) || !k.role_id || !k.roi_id) return false;
    seen.add(id);
    return true;
  });
}

function fillDatalists() {
  const all = knownTargets();
  for (const [list, key] of [["recipes", "recipe_id"], ["roles", "role_id"], ["rois", "roi_id"]]) {
    $(list).replaceChildren(...[...new Set(all.map((k) => k[key]))].map((v) => new Option(v)));
  }
}

async function refreshTarget() {
  const t = target();
  if (!t.role_id || !t.roi_id) return;
  await guarded("target-error", async () => {
    const { body } = await call("manifest", { query: t });
    state.current = body.calib && typeof body.calib.threshold === "number" ? body.calib.threshold : null;
    const marks = [body.memory ? "model ✓" : "⚠ no model", body.calib ? "calibrated ✓" : "⚠ no calibration"];
    $("target-state").textContent = marks.join(" · ");
    $("target-state").className = "state" + (body.memory && body.calib ? "" : " warn");
  });
}

// ------------------------------------------------------------------------------------------ inspect
function setImage(file) {
  if (!file) return;
  state.image = file;
  if (state.imageUrl) URL.revokeObjectURL(state.imageUrl);
  state.imageUrl = URL.createObjectURL(file);
  const img = $("view-image");
  img.onload = () => {
    $("viewer").hidden = false;
    $("view-overlay").setAttribute("viewBox", `0 0 ${img.naturalWidth} ${img.naturalHeight}`);
    const canvas = $("view-heatmap");
    canvas.width = img.naturalWidth;
    canvas.height = img.naturalHeight;
    canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
    clearOverlay();
    drawShape();
  };
  img.src = state.imageUrl;
  $("result").hidden = true;
}

function clearOverlay() { $("view-overlay").replaceChildren(); }

function svg(tag, attrs, parent) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (parent) parent.appendChild(el);
  return el;
}

/** JET colour of v in [0, 1]. */
function jet(v) {
  const c = (x) => Math.round(255 * Math.min(1, Math.max(0, x)));
  return [c(1.5 - Math.abs(4 * v - 3)), c(1.5 - Math.abs(4 * v - 2)), c(1.5 - Math.abs(4 * v - 1))];
}

function drawHeatmap(b64) {
  const canvas = $("view-heatmap");
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  canvas.dataset.drawn = "0";
  if (!b64) return;
  const heat = new Image();
  heat.onload = () => {
    ctx.drawImage(heat, 0, 0, canvas.width, canvas.height);
    const pixels = ctx.getImageData(0, 0, canvas.width, canvas.height);
    const d = pixels.data;
    for (let i = 0; i < d.length; i += 4) {
      const v = d[i] / 255;
      const [r, g, b] = jet(v);
      d[i] = r; d[i + 1] = g; d[i + 2] = b; d[i + 3] = d[i + 3] && v > 0 ? 255 : 0;
    }
    ctx.putImageData(pixels, 0, 0);
    canvas.dataset.drawn = "1";
  };
  heat.src = "data:image/png;base64," + b64;
}

function drawRegions(regions) {
  const overlay = $("view-overlay");
  overlay.querySelectorAll(".region").forEach((el) => el.remove());
  const tbody = $("regions").tBodies[0];
  tbody.replaceChildren();
  regions.forEach((region, i) => {
    const g = svg("g", { class: "region" }, overlay);
    const points = (region.contour || []).map(([x, y]) => `${x},${y}`).join(" ");
    if (points) svg("polygon", { points, class: "region-outline" }, g);
    else svg("rect", { x: region.x, y: region.y, width: region.w, height: region.h, class: "region-outline" }, g);
    // the label in image pixels, sized to the image and kept inside it, beside the region's nearer edge
    const img = $("view-image");
    const W = img.naturalWidth || 1, H = img.naturalHeight || 1, size = Math.max(6, Math.min(W, H) / 18);
    const right = region.x + region.w / 2 > W / 2;
    const above = region.y > size * 1.2;
    const label = svg("text", {
      x: right ? region.x + region.w : region.x, y: above ? region.y - size * 0.25 : region.y + region.h + size,
      "text-anchor": right ? "end" : "start", "font-size": size, class: "region-label" }, g);
    label.textContent = `${i + 1}: ${fmt(region.area_mm2, 2)} mm²`;
    const row = tbody.insertRow();
    [i + 1, fmt(region.area_mm2, 2), region.area_px, (region.bbox || []).join(", ")].forEach((v) => {
      row.insertCell().textContent = String(v);
    });
  });
  if (!regions.length) tbody.insertRow().insertCell().textContent = "no region above the threshold";
}

/** `decode;dur=1.2, forward;dur=3` → [["decode", 1.2], …] */
function parseServerTiming(header) {
  if (!header) return [];
  return header.split(",").map((part) => {
    const [name, ...params] = part.trim().split(";");
    const dur = params.map((p) => p.trim()).find((p) => p.startsWith("dur="));
    return [name.trim(), dur ? Number(dur.slice(4)) : NaN];
  }).filter(([name]) => name);
}

function showModel(lineage) {
  const h = state.health || {};
  const l = lineage || {};
  const rows = [
    ["backbone", l.backbone || h.backbone], ["weights", l.weights_name || h.model],
    ["runtime", h.runtime ? `${h.runtime}${h.runtime_precision ? " " + h.runtime_precision : ""}` : null],
    ["device", h.device], ["registered model", l.registered_model], ["registered version", l.registered_version],
    ["alias", l.registered_alias], ["model source", l.source], ["threshold source", l.threshold_source],
    ["calibrated at", l.calibrated_at_utc],
  ].filter(([, v]) => v !== null && v !== undefined && v !== "");
  fillDefinitions("model-info", rows);
}

/** Whether `body` (an /infer answer or a calibration) carries the OK / review / NG band's two thresholds. */
const hasBand = (body) => typeof body.threshold_low === "number" && typeof body.threshold_high === "number";
const bandText = (body) => `${fmt(body.threshold_low)} – ${fmt(body.threshold_high)}`;

/** Replace the `<dl id=…>`'s entries with one term/value pair per `[name, value]` row. */
function fillDefinitions(id, rows) {
  const dl = $(id);
  dl.replaceChildren();
  rows.forEach(([k, v]) => {
    const dt = document.createElement("dt"); dt.textContent = k;
    const dd = document.createElement("dd"); dd.textContent = String(v);
    dl.append(dt, dd);
  });
}

async function runInfer() {
  await guarded("infer-error", async () => {
    if (!state.image) throw new ApiError("choose, drop or paste an image first");
    rememberTarget();
    const t = target();
    const form = new FormData();
    form.append("role_id", t.role_id);
    form.append("roi_id", t.roi_id);
    form.append("recipe_id", t.recipe_id);
    form.append("mm_per_px", String(mmPerPx()));
    form.append("include_heatmap", "true");
    const shape = currentShape();
    if (shape) form.append("shape", JSON.stringify(shape));
    form.append("image", state.image, state.image.name || "image.png");
    const { body, headers } = await call("infer", { method: "POST", form });
    $("result").hidden = false;
    // the OK / review / NG band (docs/design.md): a review score shows REVIEW, its legacy decision beside it
    const verdict = body.review ? "review" : body.decision;
    $("decision").textContent = verdict;
    $("decision").className = "decision-" + verdict;
    $("decision-note").textContent = body.review ? `(decision ${body.decision} until reviewed)` : "";
    $("score").textContent = fmt(body.score);
    $("threshold").textContent = fmt(body.threshold);
    const band = hasBand(body);
    $("band").hidden = !band;
    $("threshold-low").textContent = fmt(body.threshold_low);
    $("threshold-high").textContent = fmt(body.threshold_high);
    const top = Math.max(body.score, body.threshold, band ? body.threshold_high : 0) * 1.25 || 1;
    $("score-fill").style.width = `${(100 * body.score) / top}%`;
    $("score-fill").className = "fill " + verdict;
    $("threshold-mark").style.left = `${(100 * body.threshold) / top}%`;
    $("band-zone").hidden = !band;
    if (band) {
      $("band-zone").style.left = `${(100 * body.threshold_low) / top}%`;
      $("band-zone").style.width = `${(100 * (body.threshold_high - body.threshold_low)) / top}%`;
    }
    drawHeatmap(body.heatmap_png_base64);
    drawRegions(body.regions || []);
    drawShape();
    showModel(body.lineage);
    const tbody = $("timings").tBodies[0];
    tbody.replaceChildren();
    parseServerTiming(headers.get("Server-Timing")).forEach(([name, ms]) => {
      const row = tbody.insertRow();
      row.insertCell().textContent = name;
      row.insertCell().textContent = fmt(ms, 1);
    });
  }, { busy: ["infer-run"] });
}

// ------------------------------------------------------------------------------------------ ROI mask
const SHAPE_FIELDS = { rect: ["x", "y", "w", "h"], circle: ["cx", "cy", "r"], annulus: ["cx", "cy", "r", "r_inner"] };
// the handles of each kind: drag one (or focus it and press the arrow keys) to edit the mask
const HANDLE_LABELS = { move: "Move the ROI mask", nw: "Resize the ROI mask: top-left corner",
  ne: "Resize the ROI mask: top-right corner", sw: "Resize the ROI mask: bottom-left corner",
  se: "Resize the ROI mask: bottom-right corner", r: "Resize the ROI mask: outer radius",
  r_inner: "Resize the ROI mask: inner radius" };

function renderShapeFields() {
  const kind = $("shape-kind").value;
  const holder = $("shape-fields");
  holder.replaceChildren();
  (SHAPE_FIELDS[kind] || []).forEach((name) => {
    const label = document.createElement("label");
    label.textContent = name + " ";
    const input = document.createElement("input");
    input.type = "number"; input.step = "any"; input.id = "shape-" + name; input.value = "0";
    input.addEventListener("input", drawShape);
    label.appendChild(input);
    holder.appendChild(label);
  });
  const img = $("view-image");
  if (img.naturalWidth && kind) setShape(defaultShape(kind, img.naturalWidth, img.naturalHeight));
  drawShape();
}

function defaultShape(kind, w, h) {
  const r = Math.min(w, h) / 2;
  if (kind === "rect") return { x: 0, y: 0, w, h };
  if (kind === "circle") return { cx: w / 2, cy: h / 2, r };
  return { cx: w / 2, cy: h / 2, r, r_inner: r / 2 };
}

/** Fill the mask's number fields from `values` (its `kind` is the select's, never written here). */
function setShape(values) {
  for (const [k, v] of Object.entries(values)) {
    const el = k === "kind" ? null : $("shape-" + k);
    if (el) el.value = String(Math.round(v));
  }
}

function currentShape() {
  const kind = $("shape-kind").value;
  if (!kind) return null;
  const shape = { kind };
  SHAPE_FIELDS[kind].forEach((name) => { shape[name] = Number($("shape-" + name).value); });
  return shape;
}

/** Where each handle of `s` sits, in image pixels. */
function handlePoints(s) {
  if (s.kind === "rect") {
    return { move: [s.x + s.w / 2, s.y + s.h / 2], nw: [s.x, s.y], ne: [s.x + s.w, s.y],
             sw: [s.x, s.y + s.h], se: [s.x + s.w, s.y + s.h] };
  }
  // on the diagonals (up-right, down-right): inside the image for the default mask, never on each other
  const d = Math.SQRT1_2;
  const points = { move: [s.cx, s.cy], r: [s.cx + s.r * d, s.cy - s.r * d] };
  if (s.kind === "annulus") points.r_inner = [s.cx + s.r_inner * d, s.cy + s.r_inner * d];
  return points;
}

/** `s0` edited by moving handle `name` by (dx, dy), or to point `p` (radii), in image pixels. */
function editedShape(s0, name, dx, dy, p) {
  const s = { ...s0 };
  if (name === "move") {
    if (s.kind === "rect") { s.x += dx; s.y += dy; } else { s.cx += dx; s.cy += dy; }
    return s;
  }
  if (s.kind === "rect") {
    if (name.includes("w")) { s.x += dx; s.w -= dx; } else { s.w += dx; }
    if (name.includes("n")) { s.y += dy; s.h -= dy; } else { s.h += dy; }
    if (s.w < 0) { s.x += s.w; s.w = -s.w; }
    if (s.h < 0) { s.y += s.h; s.h = -s.h; }
    return s;
  }
  const radius = p ? Math.hypot(p.x - s.cx, p.y - s.cy) : null;
  if (name === "r") {
    s.r = Math.max(1, radius !== null ? radius : s.r + dx - dy);
    if (s.kind === "annulus") s.r_inner = Math.min(s.r_inner, s.r - 1);
  } else if (name === "r_inner") {
    s.r_inner = Math.min(s.r - 1, Math.max(0, radius !== null ? radius : s.r_inner + dx + dy));
  }
  return s;
}

function drawShape() {
  const overlay = $("view-overlay");
  const focused = document.activeElement && document.activeElement.classList &&
    document.activeElement.classList.contains("handle") ? document.activeElement.dataset.handle : null;
  overlay.querySelectorAll(".mask, .handle").forEach((el) => el.remove());
  const s = currentShape();
  if (!s) return;
  if (s.kind === "rect") svg("rect", { x: s.x, y: s.y, width: s.w, height: s.h, class: "mask" }, overlay);
  else {
    svg("circle", { cx: s.cx, cy: s.cy, r: Math.max(0, s.r), class: "mask" }, overlay);
    if (s.kind === "annulus") svg("circle", { cx: s.cx, cy: s.cy, r: Math.max(0, s.r_inner), class: "mask" }, overlay);
  }
  const img = $("view-image");
  const size = Math.max(2, Math.min(img.naturalWidth || 100, img.naturalHeight || 100) / 28);
  for (const [name, [x, y]] of Object.entries(handlePoints(s))) {
    const handle = svg("circle", { cx: x, cy: y, r: size, class: "handle handle-" + name, tabindex: "0",
                                   role: "button", "aria-label": HANDLE_LABELS[name], "data-handle": name }, overlay);
    if (name === focused) handle.focus();
  }
}

function imagePoint(event) {
  const overlay = $("view-overlay");
  const pt = overlay.createSVGPoint();
  pt.x = event.clientX; pt.y = event.clientY;
  return pt.matrixTransform(overlay.getScreenCTM().inverse());
}

/** Drag on the image: on a handle it edits the mask, elsewhere it draws a new one. */
function wireMaskDrawing() {
  const overlay = $("view-overlay");
  let start = null, handle = null, original = null;
  overlay.addEventListener("pointerdown", (e) => {
    if (!$("shape-kind").value) return;
    start = imagePoint(e);
    handle = e.target.dataset ? e.target.dataset.handle || null : null;
    original = currentShape();
    overlay.setPointerCapture(e.pointerId);
    e.preventDefault();
  });
  overlay.addEventListener("pointermove", (e) => {
    if (!start) return;
    const p = imagePoint(e);
    const kind = $("shape-kind").value;
    if (handle) {
      setShape(editedShape(original, handle, p.x - start.x, p.y - start.y, p));
    } else if (kind === "rect") {
      setShape({ x: Math.min(start.x, p.x), y: Math.min(start.y, p.y), w: Math.abs(p.x - start.x), h: Math.abs(p.y - start.y) });
    } else {
      const r = Math.hypot(p.x - start.x, p.y - start.y);
      setShape(kind === "annulus" ? { cx: start.x, cy: start.y, r, r_inner: r / 2 } : { cx: start.x, cy: start.y, r });
    }
    drawShape();
  });
  const end = () => { start = null; handle = null; };
  overlay.addEventListener("pointerup", end);
  overlay.addEventListener("pointercancel", end);
  // the keyboard: a focused handle moves by 1 px per arrow key (10 with Shift); radii grow with → and ↑
  overlay.addEventListener("keydown", (e) => {
    const name = e.target.dataset ? e.target.dataset.handle : null;
    const steps = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] }[e.key];
    if (!name || !steps) return;
    e.preventDefault();
    const k = e.shiftKey ? 10 : 1;
    const [dx, dy] = name === "r_inner" ? [steps[0] - steps[1], 0] : steps;  // ↑ grows the inner radius too
    setShape(editedShape(currentShape(), name, dx * k, dy * k, null));
    drawShape();
  });
}

// ------------------------------------------------------------------------------------------ samples
function fileUrl(label, filename) {
  const t = target();
  return "../datasets/file?" + new URLSearchParams({ ...t, label, filename }).toString();
}

async function loadSamples() {
  const t = target();
  if (!t.role_id || !t.roi_id) return;
  await guarded("samples-ok-error", async () => {
    const { body } = await call("datasets/list", { query: t });
    for (const label of ["ok", "ng"]) {
      const cls = (body.classes || {})[label] || { count: 0, files: [] };
      $("count-" + label).textContent = `(${cls.count})`;
      const holder = $("thumbs-" + label);
      holder.replaceChildren();
      cls.files.forEach((name) => {
        const fig = document.createElement("figure");
        fig.className = "thumb";
        fig.dataset.filename = name;
        const img = document.createElement("img");
        img.loading = "lazy"; img.alt = `${label} sample ${name}`; setAuthedSrc(img, fileUrl(label, name));
        const cap = document.createElement("figcaption");
        cap.textContent = name;
        const del = document.createElement("button");
        del.type = "button"; del.textContent = "Delete"; del.setAttribute("aria-label", `Delete ${label} sample ${name}`);
        del.addEventListener("click", () => deleteSample(label, name));
        fig.append(img, cap, del);
        holder.appendChild(fig);
      });
    }
  });
}

async function uploadSamples(label, files) {
  const list = [...files].filter((f) => f.type.startsWith("image/") || /\.(png|jpe?g|bmp|webp)$/i.test(f.name));
  if (!list.length) return;
  const ok = await guarded(`samples-${label}-error`, async () => {
    rememberTarget();
    const t = target();
    const form = new FormData();
    form.append("role_id", t.role_id);
    form.append("roi_id", t.roi_id);
    form.append("recipe_id", t.recipe_id);
    list.forEach((file) => {
      form.append("images", file, file.name);
      form.append("metas", JSON.stringify({ mm_per_px: mmPerPx() }));
    });
    await call(`datasets/${label}/upload`, { method: "POST", form });
    return true;
  });
  if (ok) await loadSamples();
}

async function deleteSample(label, filename) {
  const ok = await guarded(`samples-${label}-error`, async () => {
    await call("datasets/file", { method: "DELETE", query: { ...target(), label, filename } });
    return true;
  });
  if (ok) await loadSamples();
}

const STAGE_NAMES = { encode: "images embedded", coreset: "coreset centres chosen", score_ok: "OK samples scored",
                      score_ng: "NG samples scored" };
const PROGRESS_POLL_MS = 250;

/** A job that runs long: the seconds it has taken tick in `outputId`, and the bar `barId` shows the server's
 *  progress of the current stage (done/total, from ../progress, polled from whichever worker answers); then
 *  `outputId` shows `describe(result)`, or nothing when the job failed (its error is shown by `guarded`). */
async function timedJob(outputId, barId, jobName, job, describe) {
  const started = performance.now();
  const out = $(outputId), bar = $(barId);
  const query = target();
  let stage = "", polling = false, finished = false;
  bar.removeAttribute("value");  // indeterminate until the server reports this job
  bar.removeAttribute("aria-valuetext");
  const show = () => {
    if (finished) return;  // a poll answered late: the job's result stays
    out.textContent = `running… ${((performance.now() - started) / 1000).toFixed(0)} s${stage ? " · " + stage : ""}`;
  };
  const poll = async () => {
    if (polling) return;
    polling = true;
    try {
      const { body } = await call("progress", { query });
      if (body.job === jobName && body.state === "running" && body.total > 0) {
        bar.max = body.total;
        bar.value = body.done;
        stage = `${STAGE_NAMES[body.stage] || body.stage} ${body.done}/${body.total}`;
        bar.setAttribute("aria-valuetext", stage);
        show();
      }
    } catch (_) {
      // progress is a hint only: the job's own answer or error is what the page reports
    } finally {
      polling = false;
    }
  };
  const tick = setInterval(() => { show(); poll(); }, PROGRESS_POLL_MS);
  out.textContent = "running…";
  poll();
  let result;
  try {
    result = await job();
  } finally {
    clearInterval(tick);
    finished = true;
  }
  out.textContent = result === undefined ? "" : describe(result);
  return result;
}

async function runFit() {
  await timedJob("fit-result", "fit-progress", "fit", () => guarded("fit-error", async () => {
    rememberTarget();
    const t = target();
    const form = new FormData();
    form.append("role_id", t.role_id); form.append("roi_id", t.roi_id); form.append("recipe_id", t.recipe_id);
    form.append("mm_per_px", String(mmPerPx())); form.append("use_dataset", "true");
    const { body } = await call("fit_ok", { method: "POST", form });
    await refreshTarget();
    return body;
  }, { busy: ["fit-run", "calibrate-run"], progress: "fit-progress" }),
  (body) => `fitted: ${body.n_embeddings} patches → coreset ${body.coreset_size} ` +
    `(rate ${fmt(body.coreset_rate_applied, 3)}), token grid ${body.token_shape.join("×")}`);
}

async function runCalibrate() {
  await timedJob("calibrate-result", "calibrate-progress", "calibrate", () => guarded("calibrate-error", async () => {
    rememberTarget();
    const { body } = await call("calibrate_dataset", { method: "POST",
      json: { ...target(), default_mm_per_px: mmPerPx() } });
    await refreshTarget();
    return body;
  }, { busy: ["fit-run", "calibrate-run"], progress: "calibrate-progress" }),
  (body) => `threshold ${fmt(body.threshold)} from ${body.n_ok} OK / ${body.n_ng} NG ` +
    `(score percentile ${body.score_percentile}, regions ≥ ${body.area_mm2_thr} mm²)` +
    (hasBand(body) ? `, review band ${bandText(body)}` : ""));
}

function wireDrop(zoneId, onFiles) {
  const zone = $(zoneId);
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    onFiles(e.dataTransfer.files);
  });
}

// ----------------------------------------------------------------------------------------- threshold
/** False rejects (OK scores ≥ t) and escapes (NG scores < t): the decision rule of /infer. */
function countsAt(t, ok, ng) {
  return { falseRejects: ok.filter((s) => s >= t).length, escapes: ng.filter((s) => s < t).length };
}

async function loadScores() {
  await guarded("scores-error", async () => {
    rememberTarget();
    await refreshTarget();
    const { body } = await call("infer_dataset", { method: "POST", json: { ...target(), default_mm_per_px: mmPerPx() } });
    const ok = [], ng = [];
    body.items.forEach((item) => {
      if (typeof item.score !== "number" || item.error) return;
      (item.label === "ng" ? ng : ok).push(item.score);
    });
    const threshold = body.items.map((i) => i.threshold).find((t) => typeof t === "number");
    state.current = typeof threshold === "number" ? threshold : state.current;
    state.scores = { ok, ng };
    const all = ok.concat(ng, [state.current]).filter((v) => typeof v === "number");
    const lo = Math.min(...all), hi = Math.max(...all);
    const pad = (hi - lo) * 0.05 || 0.01;
    state.range = [Math.max(0, lo - pad), hi + pad];
    const slider = $("candidate");
    slider.min = String(state.range[0]); slider.max = String(state.range[1]);
    slider.step = "any";  // the candidate is any score, never snapped to a step
    $("threshold-view").hidden = false;
    $("n-ok").textContent = String(ok.length);
    $("n-ng").textContent = String(ng.length);
    $("current-threshold").textContent = fmt(state.current);
    setCandidate(state.current);
  }, { busy: ["scores-load"], progress: "scores-progress" });
}

function setCandidate(t) {
  if (!state.scores || !Number.isFinite(t)) return;
  state.candidate = t;
  $("candidate").value = String(t);
  $("candidate").dataset.value = String(t);  // exact: a range input's value may round it
  if (document.activeElement !== $("candidate-value")) $("candidate-value").value = t.toFixed(4);
  const { falseRejects, escapes } = countsAt(t, state.scores.ok, state.scores.ng);
  $("false-rejects").textContent = String(falseRejects);
  $("escapes").textContent = String(escapes);
  drawHistogram();
  drawRoc();
}

function drawHistogram() {
  const chart = $("histogram");
  chart.replaceChildren();
  const { ok, ng } = state.scores;
  const [lo, hi] = state.range;
  const W = 400, H = 200, B = 24, bins = 30;
  const x = (v) => ((v - lo) / (hi - lo)) * W;
  const count = (values) => {
    const c = new Array(bins).fill(0);
    values.forEach((v) => { c[Math.min(bins - 1, Math.max(0, Math.floor(((v - lo) / (hi - lo)) * bins)))] += 1; });
    return c;
  };
  const okBins = count(ok), ngBins = count(ng);
  const top = Math.max(1, ...okBins, ...ngBins);
  const bw = W / bins;
  [[okBins, "ok"], [ngBins, "ng"]].forEach(([c, cls]) => c.forEach((n, i) => {
    if (!n) return;
    const h = ((H - B) * n) / top;
    svg("rect", { x: i * bw + 1, y: H - B - h, width: bw - 2, height: h, class: "bar " + cls }, chart);
  }));
  svg("line", { x1: 0, y1: H - B, x2: W, y2: H - B, class: "axis" }, chart);
  [lo, (lo + hi) / 2, hi].forEach((v, i) => {
    const t = svg("text", { x: [2, W / 2, W - 2][i], y: H - 6, class: "tick", "text-anchor": ["start", "middle", "end"][i] }, chart);
    t.textContent = fmt(v, 3);
  });
  if (typeof state.current === "number") svg("line", { x1: x(state.current), y1: 0, x2: x(state.current), y2: H - B, class: "current" }, chart);
  const cx = x(state.candidate);
  svg("line", { x1: cx, y1: 0, x2: cx, y2: H - B, class: "candidate" }, chart);
  svg("rect", { x: cx - 8, y: 0, width: 16, height: H - B, class: "grip", id: "candidate-grip" }, chart);
}

function drawRoc() {
  const chart = $("roc");
  chart.replaceChildren();
  const { ok, ng } = state.scores;
  const S = 200;
  const thresholds = [...new Set(ok.concat(ng))].sort((a, b) => b - a);
  const pts = [[0, 0]];
  thresholds.forEach((t) => {
    const c = countsAt(t, ok, ng);
    pts.push([ok.length ? c.falseRejects / ok.length : 0, ng.length ? (ng.length - c.escapes) / ng.length : 0]);
  });
  pts.push([1, 1]);
  svg("rect", { x: 0, y: 0, width: S, height: S, class: "frame" }, chart);
  svg("line", { x1: 0, y1: S, x2: S, y2: 0, class: "chance" }, chart);
  svg("polyline", { points: pts.map(([f, d]) => `${f * S},${S - d * S}`).join(" "), class: "curve" }, chart);
  const c = countsAt(state.candidate, ok, ng);
  const f = ok.length ? c.falseRejects / ok.length : 0, d = ng.length ? (ng.length - c.escapes) / ng.length : 0;
  svg("circle", { cx: f * S, cy: S - d * S, r: 5, class: "candidate-dot" }, chart);
}

function wireHistogramDrag() {
  const chart = $("histogram");
  let dragging = false;
  const move = (e) => {
    const pt = chart.createSVGPoint();
    pt.x = e.clientX; pt.y = e.clientY;
    const p = pt.matrixTransform(chart.getScreenCTM().inverse());
    const [lo, hi] = state.range;
    setCandidate(Math.min(hi, Math.max(lo, lo + (p.x / 400) * (hi - lo))));
  };
  chart.addEventListener("pointerdown", (e) => { if (!state.scores) return; dragging = true; chart.setPointerCapture(e.pointerId); move(e); });
  chart.addEventListener("pointermove", (e) => { if (dragging) move(e); });
  chart.addEventListener("pointerup", () => { dragging = false; });
}

async function storeThreshold(threshold, verb) {
  await guarded("threshold-error", async () => {
    const { body } = await call("calibrate_manual", { method: "POST", json: { ...target(), threshold } });
    if (verb === "applied") state.previous = body.previous_threshold;
    else state.previous = null;
    state.current = body.threshold;
    $("current-threshold").textContent = fmt(body.threshold);
    $("threshold-restore").disabled = typeof state.previous !== "number";
    $("threshold-result").textContent = `${verb} threshold ${fmt(body.threshold)} (source ${body.source}` +
      (typeof body.previous_threshold === "number" ? `, replaced ${fmt(body.previous_threshold)})` : ")");
    setCandidate(state.candidate);
    await refreshTarget();
  }, { busy: ["threshold-apply", "threshold-restore"] });
  if (typeof state.previous !== "number") $("threshold-restore").disabled = true;
}

// --------------------------------------------------------------------------------------------- models
async function loadHealth() {
  const { body } = await call("health");
  state.health = body;
  return body;
}

async function loadModels() {
  await guarded("models-error", async () => {
    const h = await loadHealth();
    const reg = h.registry || {};
    const info = [["status", h.status], ["version", h.version], ["device", h.device], ["backbone", h.backbone],
      ["weights", h.model], ["runtime", h.runtime], ["registry", reg.state],
      ["following alias", reg.following ? reg.alias : "not following"], ["last sync", reg.last_sync_utc],
      ["sync error", reg.error]].filter(([, v]) => v !== null && v !== undefined);
    fillDefinitions("server-info", info);
    const synced = reg.synced || [];
    const tbody = $("models").tBodies[0];
    tbody.replaceChildren();
    for (const t of knownTargets()) {
      const query = { recipe_id: t.recipe_id, role_id: t.role_id, roi_id: t.roi_id };
      if (t.model_key) query.model_key = t.model_key;
      const row = tbody.insertRow();
      row.dataset.roi = t.roi_id;
      [t.recipe_id, t.role_id, t.roi_id].forEach((v) => { row.insertCell().textContent = v; });
      try {
        const { body } = await call("manifest", { query });
        const l = body.lineage || {};
        const held = synced.find((m) => m.role_id === t.role_id && m.roi_id === t.roi_id && m.recipe_id === t.recipe_id);
        const cells = [
          [body.memory ? "fitted" : "⚠ no model", !body.memory],
          [body.calib ? (l.threshold_source || "present") : "⚠ no calibration", !body.calib || l.threshold_source === "stale"],
          [body.calib ? fmt(body.calib.threshold) : "–", false],
          [body.calib && hasBand(body.calib) ? bandText(body.calib) : "–", false],
          [l.registered_version || (held && held.version) || "–", false],
          [l.registered_alias || (held && held.alias) || "–", false],
          [l.source ? `${l.source}${l.registry_managed ? " (managed)" : ""}` : "–", false],
        ];
        cells.forEach(([text, warn]) => { const c = row.insertCell(); c.textContent = String(text); if (warn) c.className = "warn"; });
      } catch (err) {
        const c = row.insertCell(); c.colSpan = 7; c.className = "error"; c.textContent = err.message;
      }
    }
  }, { busy: ["models-refresh"] });
}

// ----------------------------------------------------------------------------------------------- tabs
function showTab(tab) {
  document.querySelectorAll('[role="tab"]').forEach((t) => {
    const selected = t === tab;
    t.setAttribute("aria-selected", String(selected));
    t.tabIndex = selected ? 0 : -1;
    $(t.getAttribute("aria-controls")).hidden = !selected;
  });
  if (tab.id === "tab-samples") loadSamples();
  if (tab.id === "tab-models") loadModels();
}

function wireTabs() {
  const tabs = [...document.querySelectorAll('[role="tab"]')];
  tabs.forEach((tab, i) => {
    tab.addEventListener("click", () => showTab(tab));
    tab.addEventListener("keydown", (e) => {
      const step = e.key === "ArrowRight" ? 1 : e.key === "ArrowLeft" ? -1 : 0;
      if (!step) return;
      const next = tabs[(i + step + tabs.length) % tabs.length];
      next.focus();
      showTab(next);
    });
  });
}

// ---------------------------------------------------------------------------------------------- start
function start() {
  wireTabs();
  $("image-file").addEventListener("change", (e) => setImage(e.target.files[0]));
  wireDrop("image-drop", (files) => setImage(files[0]));
  document.addEventListener("paste", (e) => {
    const item = [...(e.clipboardData ? e.clipboardData.items : [])].find((i) => i.type.startsWith("image/"));
    if (item) setImage(item.getAsFile());
  });
  $("infer-run").addEventListener("click", runInfer);
  $("opacity").addEventListener("input", (e) => { $("view-heatmap").style.opacity = e.target.value; });
  $("view-heatmap").style.opacity = $("opacity").value;
  $("shape-kind").addEventListener("change", renderShapeFields);
  wireMaskDrawing();
  for (const label of ["ok", "ng"]) {
    $("upload-" + label).addEventListener("change", async (e) => { await uploadSamples(label, e.target.files); e.target.value = ""; });
    wireDrop("drop-" + label, (files) => uploadSamples(label, files));
  }
  $("fit-run").addEventListener("click", runFit);
  $("calibrate-run").addEventListener("click", runCalibrate);
  $("scores-load").addEventListener("click", loadScores);
  $("candidate").addEventListener("input", (e) => setCandidate(Number(e.target.value)));
  $("candidate-value").addEventListener("change", (e) => setCandidate(Number(e.target.value)));
  wireHistogramDrag();
  $("threshold-apply").addEventListener("click", () => storeThreshold(state.candidate, "applied"));
  $("threshold-restore").addEventListener("click", () => storeThreshold(state.previous, "restored"));
  $("models-refresh").addEventListener("click", loadModels);
  $("target").addEventListener("submit", (e) => e.preventDefault());
  $("target").addEventListener("change", () => {
    refreshTarget();
    state.scores = null;
    $("threshold-view").hidden = true;
    if (!$("panel-samples").hidden) loadSamples();
  });
  loadHealth().then(fillDatalists).catch((err) => { $("target-error").textContent = err.message; });
  refreshTarget();
  document.body.dataset.ready = "1";
}

start();
