"use strict";
// The page at GET /: an image goes to POST /segment (formats=rle, at the model's own low score
// threshold), and every returned mask is drawn from its COCO RLE over the image. The score slider and
// the class toggles then filter what is drawn without a new request; the tiling toggle sends the image
// again with tiles=auto (or without). The drawing style (palette, mask
// blend, line and font sizes) comes from GET page.json, the same values service/overlay.py draws with;
// the rules are written down there. All URLs are relative, so the page also works under a path prefix.
// When the server has API keys, its 401 brings up a form that asks for one; the key is kept for the tab
// (sessionStorage) and sent as "Authorization: Bearer <key>" with every call.

const $ = (selector) => document.querySelector(selector);

const state = {
  config: null,      // GET page.json: {score_threshold, default_score, style}
  classes: [],       // class names from GET v1/model, class_id 1.. in order
  hidden: new Set(), // class names toggled off
  base: null,        // ImageData of the uploaded image alone
  answered: false,   // a response to the latest upload has arrived
  detections: [],    // the response's detections, each with its decoded runs
  shown: [],         // the detections that pass the filters, best first
  hovered: null,     // the detection under the pointer in the list
  upload: 0,         // counter: only the latest upload's answer is drawn
  file: null,        // the latest image chosen, sent again when the tiling toggle changes
  key: sessionStorage.getItem("mrcnn-api-key") || "",  // the API key the user gave, if the server asked
  wired: false,      // the controls' listeners are set (once, after the first successful start)
};

// ---- COCO RLE ------------------------------------------------------------------------------------

// The run lengths of a COCO compressed RLE string (pycocotools' rleFrString): each count is a
// little-endian sequence of 5-bit groups in characters offset by 48, 0x20 flagging "more groups", the
// sign in 0x10 of the last group; from the third count on, each is stored as a difference from the
// count two places before. Arithmetic is on doubles (exact to 2^53), never 32-bit shifts.
function decodeCounts(counts) {
  const runs = [];
  let p = 0;
  while (p < counts.length) {
    let x = 0;
    let k = 0;
    let more = true;
    while (more) {
      if (p >= counts.length) throw new Error("truncated RLE");
      const c = counts.charCodeAt(p) - 48;
      x += (c & 0x1f) * 2 ** (5 * k);
      more = (c & 0x20) !== 0;
      p += 1;
      k += 1;
      if (!more && (c & 0x10) !== 0) x -= 2 ** (5 * k);
    }
    if (runs.length > 2) x += runs[runs.length - 2];
    runs.push(x);
  }
  return runs;
}

// Runs alternate background and mask pixels, background first, over the image in column-major order
// (down each column, then the next column), as COCO stores masks.
function decodeMask(rle, width, height) {
  const [h, w] = rle.size;
  if (h !== height || w !== width) throw new Error(`mask of ${w}x${h} on an image of ${width}x${height}`);
  const runs = decodeCounts(rle.counts);
  const total = runs.reduce((a, b) => a + b, 0);
  if (total !== width * height) throw new Error(`RLE covers ${total} pixels, the image ${width * height}`);
  return runs;
}

// Blend one mask into RGBA pixel data: (p * (256 - a) + c * a + 128) >> 8 per channel, as overlay.py.
function blendMask(data, width, height, runs, colour, alpha) {
  const [r, g, b] = colour;
  const keep = 256 - alpha;
  let pos = 0;
  for (let i = 0; i < runs.length; i += 1) {
    const n = runs[i];
    if (i % 2 === 1) {
      let col = Math.floor(pos / height);
      let row = pos - col * height;
      for (let j = 0; j < n; j += 1) {
        const o = (row * width + col) * 4;
        data[o] = (data[o] * keep + r * alpha + 128) >> 8;
        data[o + 1] = (data[o + 1] * keep + g * alpha + 128) >> 8;
        data[o + 2] = (data[o + 2] * keep + b * alpha + 128) >> 8;
        row += 1;
        if (row === height) {
          row = 0;
          col += 1;
        }
      }
    }
    pos += n;
  }
}

// ---- drawing -------------------------------------------------------------------------------------

function paletteEntry(classId) {
  const palette = state.config.style.palette;
  return palette[(classId - 1) % palette.length];
}

function rgb(colour) {
  return `rgb(${colour[0]}, ${colour[1]}, ${colour[2]})`;
}

function lineAndFontPx(width, height) {
  const style = state.config.style;
  const longSide = Math.max(width, height);
  return [Math.max(style.min_line_px, Math.floor(longSide / style.line_divisor)),
          Math.max(style.min_font_px, Math.floor(longSide / style.font_divisor))];
}

// The box's pixels [x0, y0, x1, y1) clipped to the image, as overlay.pixel_box.
function pixelBox(box, width, height) {
  const x0 = Math.max(0, Math.floor(box[0]));
  const y0 = Math.max(0, Math.floor(box[1]));
  const x1 = Math.min(width, Math.ceil(box[2]));
  const y1 = Math.min(height, Math.ceil(box[3]));
  return [x0, y0, Math.max(x0, x1), Math.max(y0, y1)];
}

function labelText(det) {
  return `${det.label} ${det.score.toFixed(2)}`;
}

function drawBoxes(ctx, ordered, width, height) {
  const [line, fontPx] = lineAndFontPx(width, height);
  const pad = Math.max(1, Math.floor(fontPx / 6));
  for (const det of ordered) {
    const [x0, y0, x1, y1] = pixelBox(det.box, width, height);
    const w = x1 - x0;
    const h = y1 - y0;
    if (w === 0 || h === 0) continue;
    const t = Math.min(det === state.hovered ? 2 * line : line, Math.ceil(w / 2), Math.ceil(h / 2));
    ctx.fillStyle = rgb(paletteEntry(det.class_id).fill);
    ctx.fillRect(x0, y0, w, t);
    ctx.fillRect(x0, y1 - t, w, t);
    ctx.fillRect(x0, y0, t, h);
    ctx.fillRect(x1 - t, y0, t, h);
  }
  ctx.font = `${fontPx}px sans-serif`;
  ctx.textBaseline = "top";
  for (const det of ordered) {  // labels after all boxes, so that no box crosses a label
    const [x0, y0] = pixelBox(det.box, width, height);
    const text = labelText(det);
    const labelW = Math.ceil(ctx.measureText(text).width) + 2 * pad;
    const labelH = fontPx + 2 * pad;
    const top = y0 >= labelH ? y0 - labelH : y0;
    const entry = paletteEntry(det.class_id);
    ctx.fillStyle = rgb(entry.fill);
    ctx.fillRect(x0, top, labelW, labelH);
    ctx.fillStyle = rgb(entry.text);
    ctx.fillText(text, x0 + pad, top + pad);
  }
}

// Masks lowest score first (the best ends on top), the hovered one last and more opaque.
function paint() {
  if (!state.base) return;
  const canvas = $("#overlay");
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  const { width, height } = state.base;
  const style = state.config.style;
  const pixels = new ImageData(new Uint8ClampedArray(state.base.data), width, height);
  const ordered = state.shown.slice().sort((a, b) => a.score - b.score);
  if (state.hovered && ordered.includes(state.hovered)) {
    ordered.splice(ordered.indexOf(state.hovered), 1);
    ordered.push(state.hovered);
  }
  for (const det of ordered) {
    const alpha = det === state.hovered ? style.highlight_alpha : style.mask_alpha;
    blendMask(pixels.data, width, height, det.runs, paletteEntry(det.class_id).fill, alpha);
  }
  ctx.putImageData(pixels, 0, 0);
  if ($("#boxes").checked) drawBoxes(ctx, ordered, width, height);
}

// ---- the list and the filters --------------------------------------------------------------------

function applyFilters() {
  const minScore = Number($("#score").value);
  $("#score-value").textContent = minScore.toFixed(2);
  state.shown = state.detections.filter((d) => d.score > minScore && !state.hidden.has(d.label));
  if (!state.shown.includes(state.hovered)) state.hovered = null;
  renderList();
  paint();
}

function renderList() {
  const list = $("#detections");
  const items = state.shown.map((det) => {
    const li = document.createElement("li");
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = rgb(paletteEntry(det.class_id).fill);
    const name = document.createElement("span");
    name.textContent = labelText(det);
    const where = document.createElement("span");
    where.className = "where";
    where.textContent = `[${det.box.map((v) => Math.round(v)).join(", ")}] ${det.area} px`;
    li.append(swatch, name, where);
    li.addEventListener("mouseenter", () => hover(det, li));
    li.addEventListener("mouseleave", () => hover(null, null));
    return li;
  });
  list.replaceChildren(...items);
  const total = state.detections.length;
  $("#summary").textContent = state.answered ? `${state.shown.length} of ${total} detections shown` : "";
}

function hover(det, li) {
  state.hovered = det;
  for (const item of $("#detections").children) item.classList.toggle("hovered", item === li);
  paint();
}

function renderClasses() {
  const box = $("#classes");
  for (const [i, name] of state.classes.entries()) {
    const label = document.createElement("label");
    const input = document.createElement("input");
    input.type = "checkbox";
    input.checked = true;
    input.value = name;
    input.addEventListener("change", () => {
      if (input.checked) state.hidden.delete(name);
      else state.hidden.add(name);
      applyFilters();
    });
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = rgb(paletteEntry(i + 1).fill);
    label.append(input, swatch, document.createTextNode(name));
    box.append(label);
  }
}

// ---- requests ------------------------------------------------------------------------------------

function showError(message) {
  const el = $("#error");
  el.textContent = message;
  el.hidden = !message;
}

// The server's own message for a refused request: {"error": {"code", "message"}}.
async function errorMessage(response) {
  let message = response.statusText;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch {
    // not JSON (a proxy's page): the status text stays
  }
  return `${response.status}: ${message}`;
}

// fetch's options with the API key, when the user gave one.
function withKey(options = {}) {
  if (!state.key) return options;
  return { ...options, headers: { ...options.headers, Authorization: `Bearer ${state.key}` } };
}

// The server refused the key (or wants one): say why, in its own words, and ask.
function askForKey(message) {
  $("#key-form").hidden = false;
  showError(message);
  $("#api-key").focus();
}

class RefusedError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function getJSON(url) {
  const response = await fetch(url, withKey());
  if (!response.ok) throw new RefusedError(response.status, await errorMessage(response));
  return response.json();
}

// Draw the file on the canvas at its own size; false when this browser cannot decode it (TIFF).
async function showImage(file, upload) {
  let bitmap;
  try {
    bitmap = await createImageBitmap(file);
  } catch {
    return false;
  }
  if (upload !== state.upload) return false;
  const canvas = $("#overlay");
  canvas.width = bitmap.width;
  canvas.height = bitmap.height;
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(bitmap, 0, 0);
  bitmap.close();
  return true;
}

function showTimings(body) {
  const t = body.timings;
  const parts = [["decode", t.decode_ms], ["queue", t.queue_ms], ["inference", t.inference_ms],
                 ["post-processing", t.postprocess_ms], ["total", t.total_ms]];
  $("#timings").textContent = `${parts.map(([k, v]) => `${k} ${v.toFixed(1)} ms`).join(" · ")}`
    + ` · batch of ${body.batch_size}` + (body.tiles ? ` · ${body.tiles} tiles` : "");
}

async function upload(file) {
  state.file = file;  // the tiling toggle sends it again
  const upload = ++state.upload;
  showError("");
  Object.assign(state, { base: null, answered: false, detections: [], hovered: null });
  $("#overlay").width = 0;  // nothing of the previous image stays
  applyFilters();
  $("#timings").textContent = "";
  $("#summary").textContent = `segmenting ${file.name}...`;
  const shown = showImage(file, upload);
  const form = new FormData();
  form.append("image", file, file.name);
  form.append("formats", "rle");
  form.append("score_threshold", String(state.config.score_threshold));
  if ($("#tiles").checked) form.append("tiles", "auto");  // a no-op for images the model does not shrink 2x
  let response;
  try {
    response = await fetch("segment", withKey({ method: "POST", body: form }));
  } catch (err) {
    if (upload === state.upload) {
      $("#summary").textContent = "";
      showError(`cannot reach the server (${err.message})`);
    }
    return;
  }
  if (upload !== state.upload) return;
  if (!response.ok) {
    const message = await errorMessage(response);
    if (upload !== state.upload) return;
    $("#summary").textContent = "";
    if (response.status === 401) askForKey(message);
    else showError(message);
    return;
  }
  const body = await response.json();
  const drawn = await shown;
  if (upload !== state.upload) return;
  const { width, height } = body.image;
  const canvas = $("#overlay");
  state.detections = body.detections.map((det) => ({ ...det, runs: decodeMask(det.mask, width, height) }));
  state.answered = true;
  showTimings(body);
  if (!drawn) {
    showError("this browser cannot display the image; its detections are listed");
  } else if (canvas.width !== width || canvas.height !== height) {
    showError(`the browser decoded the image as ${canvas.width}x${canvas.height}, the server as ${width}x${height}`);
  } else {
    state.base = canvas.getContext("2d", { willReadFrequently: true }).getImageData(0, 0, width, height);
  }
  applyFilters();
}

function watchDrops() {
  const zone = $("#drop");
  for (const name of ["dragenter", "dragover"]) {
    zone.addEventListener(name, (event) => {
      event.preventDefault();
      zone.classList.add("over");
    });
  }
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    const file = event.dataTransfer.files[0];
    if (file) upload(file);
  });
}

async function start() {
  try {
    const [config, model] = await Promise.all([getJSON("page.json"), getJSON("v1/model")]);
    state.config = config;
    state.classes = model.classes;
    $("#model").textContent = `${model.name} ${model.version} (${model.architecture}) · `
      + `classes: ${model.classes.join(", ")} · ${model.providers.join(", ")}`;
  } catch (err) {
    $("#model").textContent = "";
    if (err.status === 401) askForKey(err.message);
    else showError(`cannot describe the model (${err.message})`);
    return;
  }
  $("#key-form").hidden = true;
  showError("");
  if (state.wired) return;
  state.wired = true;
  const slider = $("#score");
  slider.min = String(state.config.score_threshold);
  slider.value = String(state.config.default_score);
  slider.addEventListener("input", applyFilters);
  $("#boxes").addEventListener("change", paint);
  $("#tiles").addEventListener("change", () => { if (state.file) upload(state.file); });
  $("#image").addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (file) upload(file);
  });
  renderClasses();
  watchDrops();
  applyFilters();
}

$("#key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  state.key = $("#api-key").value.trim();
  sessionStorage.setItem("mrcnn-api-key", state.key);
  start();
});
start();
