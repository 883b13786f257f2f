// instyle debug viewer: plain JS, no dependencies, talks only to the local viewer server.
"use strict";

const $ = (sel) => document.querySelector(sel);
const SVG_NS = "http://www.w3.org/2000/svg";
const PAGE = 500;
const HIGHLIGHT = [255, 221, 0];

const state = {
  manifest: null,
  frames: [],          // frame records in dump order
  pos: 0,              // position in `frames` (not the frame index)
  selected: null,      // {track, instance}: track id, or instance number when untracked
  playing: null,       // interval id while playing
  stages: [],
  tracks: [],          // [{id, segments: [{start, end, style}]}]
  styleColors: new Map(),
  maskCache: new Map(),
};

// ---------- COCO RLE (pycocotools' compressed counts string) ----------
// Mirrors rleFrString in pycocotools/maskApi.c: 5 bits per char (+48), 0x20 = more chars follow,
// 0x10 on the last char = negative; from the 3rd count on, values are deltas to the count two back.
function rleCounts(str) {
  const counts = [];
  let p = 0;
  while (p < str.length) {
    let x = 0, k = 0, more = 1, c = 0;
    while (more) {
      c = str.charCodeAt(p) - 48;
      x |= (c & 0x1f) << (5 * k);
      more = c & 0x20;
      p++; k++;
      if (!more && (c & 0x10)) x |= -1 << (5 * k);
    }
    if (counts.length > 2) x += counts[counts.length - 2];
    counts.push(x);
  }
  return counts;
}

// Returns a row-major Uint8Array (h*w) of 0/1; RLE runs are column-major, starting with zeros.
function decodeRle(rle) {
  const [h, w] = rle.size;
  const counts = rleCounts(rle.counts);
  const colMajor = new Uint8Array(h * w);
  let i = 0, v = 0;
  for (const n of counts) { if (v) colMajor.fill(1, i, i + n); i += n; v ^= 1; }
  const out = new Uint8Array(h * w);
  for (let x = 0; x < w; x++) for (let y = 0; y < h; y++) out[y * w + x] = colMajor[x * h + y];
  return out;
}

// ---------- helpers ----------
const el = (tag, attrs = {}, text) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
};
const svgEl = (tag, attrs = {}) => {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
};
const rgb = (c) => `rgb(${c[0]},${c[1]},${c[2]})`;
function trackColor(id) {
  const m = state.manifest;
  return id < 0 ? m.untracked_color : m.palette[id % m.palette.length];
}
function styleColor(style) {
  if (style === null || style === undefined) return "#c8c8c8";
  if (!state.styleColors.has(style)) {
    let h = 0;
    for (const ch of style) h = (h * 31 + ch.charCodeAt(0)) >>> 0;
    const used = state.styleColors.size;
    state.styleColors.set(style, `hsl(${(used * 137 + (h % 17)) % 360}, 65%, 55%)`);
  }
  return state.styleColors.get(style);
}
const current = () => state.frames[state.pos];

// What painted an instance, when not a style of its own: null for its own pixels. Under a background style the
// instances assign did not keep (score or area too low) are painted by the background like the rest of the frame;
// a kept one left original (an excluded class) keeps its pixels.
function shownStyle(d, f) {
  if (d.style !== null && d.style !== undefined) return d.style;
  if (d.keep !== false || !f.background) return null;
  return f.background_style ? `(background: ${f.background_style})` : "(background)";
}
const number = (v, digits) => (v === null || v === undefined ? "–" : v.toFixed(digits));
function showMessage(text) { const m = $("#message"); m.textContent = text; m.hidden = false; }

// ---------- loading ----------
async function getJson(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
  return response.json();
}

async function load() {
  try {
    state.manifest = await getJson("/api/manifest");
  } catch (e) {
    showMessage(`Cannot reach the viewer server (${e.message}). Is python -m pipeline.viewer still running?`);
    return;
  }
  const m = state.manifest;
  $("#dump-dir").textContent = m.dir || "";
  if (m.warnings && m.warnings.length) {
    const banner = $("#banner");
    for (const w of m.warnings) banner.appendChild(el("div", {}, w));
    banner.hidden = false;
  }
  try {
    let offset = 0, total = 1;
    while (offset < total) {
      const page = await getJson(`/api/frames?offset=${offset}&limit=${PAGE}`);
      total = page.total;
      state.frames.push(...page.frames);
      offset += page.frames.length;
      showMessage(`Loading frames… ${offset} / ${total}`);
      if (!page.frames.length) break;
    }
  } catch (e) {
    showMessage(`Could not load the frame records (${e.message}).`);
    return;
  }
  if (!state.frames.length) {
    showMessage(m.complete
      ? "This dump holds no frames: the render finished without decoding any frame."
      : "This dump holds no frames yet: the render stopped (or is still running) before writing the first frame.");
    return;
  }
  $("#message").hidden = true;
  $("#main").hidden = false;
  build();
  seek(0);
}

// ---------- building the page ----------
function build() {
  const m = state.manifest;
  const slider = $("#slider");
  slider.max = String(state.frames.length - 1);
  slider.addEventListener("input", () => seek(Number(slider.value)));
  $("#prev").addEventListener("click", () => step(-1));
  $("#next").addEventListener("click", () => step(1));
  $("#play").addEventListener("click", togglePlay);
  $("#fps").addEventListener("change", () => { if (state.playing) { togglePlay(); togglePlay(); } });
  document.addEventListener("keydown", (e) => {
    // A field one types in needs its keys; a slider or checkbox has no use for ←/→ of its own, so they still step
    // (after a click on "frames with images only" the focus stays on it). Space keeps toggling a checkbox.
    const t = e.target, input = t.tagName === "INPUT" ? t.type : null;
    if (t.isContentEditable || t.tagName === "TEXTAREA" || (input && input !== "range" && input !== "checkbox")) return;
    if (e.key === "ArrowLeft") { step(-1); e.preventDefault(); }
    if (e.key === "ArrowRight") { step(1); e.preventDefault(); }
    if (e.key === " " && input !== "checkbox") { togglePlay(); e.preventDefault(); }
  });
  const rate = videoRate(m);
  if (rate) {
    const option = el("option", { value: rate.toFixed(3) }, `video (${rate.toFixed(2)})`);
    $("#fps").appendChild(option);
    $("#fps").value = option.value;
  }
  $("#frame-of").textContent = `(${state.frames.length} frames dumped` +
    (m.every > 1 ? `, images every ${m.every} frames)` : ")");

  const toggles = $("#layer-toggles"), panels = $("#panels");
  for (const layer of m.layers) {
    const box = el("input", { type: "checkbox", id: `toggle-${layer}`, "data-layer": layer });
    box.checked = true;
    box.addEventListener("change", () => { panelFor(layer).hidden = !box.checked; });
    const label = el("label");
    label.append(box, " " + layer);
    toggles.appendChild(label);
    const panel = el("div", { class: "panel", "data-layer": layer });
    const stage = el("div", { class: "stage" });
    stage.append(el("img", { alt: layer }), el("canvas", { class: "highlight" }), el("div", { class: "noimage" }));
    panel.append(el("h3", {}, layer === "masks" ? "masks (by track)" : layer), stage);
    panels.appendChild(panel);
  }
  state.stages = [];
  for (const f of state.frames) for (const s of Object.keys(f.timings || {})) if (!state.stages.includes(s)) state.stages.push(s);
  state.tracks = collectTracks();
  buildTimeline();
  buildTimingChart();
  window.addEventListener("resize", () => { buildTimeline(); buildTimingChart(); updateMarkers(); });
}

// The video's nominal frame rate from the manifest ("30000/1001" or a number), for real-time playback.
function videoRate(m) {
  const raw = m.video && m.video.info && m.video.info.average_rate;
  if (!raw) return null;
  const [num, den] = String(raw).split("/").map(Number);
  const rate = den ? num / den : num;
  return rate > 0 && rate < 1000 ? rate : null;
}

const panelFor = (layer) => document.querySelector(`.panel[data-layer="${layer}"]`);

function collectTracks() {
  const byId = new Map();
  state.frames.forEach((f, pos) => {
    for (const inst of f.instances) {
      if (inst.track_id < 0) continue;
      if (!byId.has(inst.track_id)) byId.set(inst.track_id, { id: inst.track_id, cls: inst.class, segments: [] });
      const segs = byId.get(inst.track_id).segments, last = segs[segs.length - 1];
      const style = shownStyle(inst, f);
      if (last && last.end === pos - 1 && last.style === style) last.end = pos;
      else segs.push({ start: pos, end: pos, style });
    }
  });
  return [...byId.values()].sort((a, b) => a.id - b.id);
}

// x position of a frame position in a chart `width` px wide, after a `left` px label column.
const chartX = (pos, left, width) => left + (pos / state.frames.length) * (width - left - 8);
function posFromEvent(e, left) {
  const svg = e.currentTarget, rect = svg.getBoundingClientRect();
  const x = e.clientX - rect.left, width = rect.width;
  return Math.max(0, Math.min(state.frames.length - 1, Math.floor((x - left) / (width - left - 8) * state.frames.length)));
}
const chartWidth = (box) => Math.max(400, $(box).clientWidth - 2);

function buildTimeline() {
  const svg = $("#timeline"), left = 110, rowH = 16, width = chartWidth("#timeline-box");
  svg.replaceChildren();
  const height = Math.max(1, state.tracks.length) * rowH + 20;
  svg.setAttribute("width", width); svg.setAttribute("height", height);
  svg.dataset.tracks = String(state.tracks.length);
  svg.dataset.frames = String(state.frames.length);
  const legend = $("#style-legend");
  legend.replaceChildren();
  if (!state.tracks.length) {
    const t = svgEl("text", { x: 8, y: 14 }); t.textContent = "no tracked instances in this dump"; svg.appendChild(t);
  }
  const styles = new Set();
  state.tracks.forEach((track, row) => {
    const y = row * rowH;
    const g = svgEl("g", { class: "track", "data-track": track.id });
    g.appendChild(svgEl("rect", { class: "row-bg", x: 0, y, width, height: rowH, fill: row % 2 ? "#fafafa" : "#fff" }));
    const label = svgEl("text", { x: 4, y: y + rowH - 4 });
    label.textContent = `#${track.id} ${track.cls}`;
    const swatch = svgEl("rect", { x: left - 14, y: y + 4, width: 8, height: 8, fill: rgb(trackColor(track.id)) });
    g.append(label, swatch);
    for (const s of track.segments) {
      styles.add(s.style);
      const x1 = chartX(s.start, left, width), x2 = chartX(s.end + 1, left, width);
      const r = svgEl("rect", { class: "segment", x: x1, y: y + 2, width: Math.max(1, x2 - x1), height: rowH - 4,
                                fill: styleColor(s.style), "data-style": s.style ?? "" });
      const tip = svgEl("title"); tip.textContent = `track ${track.id}: frames ${state.frames[s.start].index}–${state.frames[s.end].index}, style ${s.style ?? "(original)"}`;
      r.appendChild(tip);
      g.appendChild(r);
    }
    svg.appendChild(g);
  });
  for (const s of styles) {
    const item = el("span");
    item.append(el("span", { class: "swatch", style: `background:${styleColor(s)}` }), s ?? "(left original)");
    legend.appendChild(item);
  }
  state.frames.forEach((f, pos) => {  // a new shot: every track ended there
    if (!f.cut) return;
    const x = chartX(pos, left, width);
    const line = svgEl("line", { class: "cut", x1: x, x2: x, y1: 0, y2: height, "data-frame": f.index });
    const tip = svgEl("title"); tip.textContent = `frame ${f.index}: new shot, every track starts afresh`;
    line.appendChild(tip);
    svg.appendChild(line);
  });
  svg.appendChild(svgEl("line", { id: "timeline-marker", class: "marker", y1: 0, y2: height }));
  svg.onclick = (e) => seek(posFromEvent(e, left));
  svg.dataset.left = left;
}

function buildTimingChart() {
  const svg = $("#timing"), left = 110, height = 180, top = 8, bottom = 22, width = chartWidth("#timing-box");
  svg.replaceChildren();
  svg.setAttribute("width", width); svg.setAttribute("height", height);
  svg.dataset.frames = String(state.frames.length);
  svg.dataset.stages = String(state.stages.length);
  const n = state.frames.length;
  const totals = state.frames.map((f) => state.stages.reduce((a, s) => a + 1000 * (f.timings[s] || 0), 0));
  const maxMs = totals.reduce((a, b) => Math.max(a, b), 1e-3); // spread: a stack overflow past ~124k frames
  const y = (ms) => top + (1 - ms / maxMs) * (height - top - bottom);
  // One stacked step-area path per stage: top edge left→right over the running sum, bottom edge back.
  let below = new Array(n).fill(0);
  const legend = $("#stage-legend");
  legend.replaceChildren();
  state.stages.forEach((stage, k) => {
    const above = below.map((b, i) => b + 1000 * (state.frames[i].timings[stage] || 0));
    let d = "";
    for (let i = 0; i < n; i++) {
      const x1 = chartX(i, left, width), x2 = chartX(i + 1, left, width);
      d += `${i ? "L" : "M"}${x1.toFixed(1)},${y(above[i]).toFixed(1)}L${x2.toFixed(1)},${y(above[i]).toFixed(1)}`;
    }
    for (let i = n - 1; i >= 0; i--) {
      const x1 = chartX(i, left, width), x2 = chartX(i + 1, left, width);
      d += `L${x2.toFixed(1)},${y(below[i]).toFixed(1)}L${x1.toFixed(1)},${y(below[i]).toFixed(1)}`;
    }
    const color = `hsl(${(k * 67 + 200) % 360}, 55%, 55%)`;
    const path = svgEl("path", { class: "stage", "data-stage": stage, d: d + "Z", fill: color });
    const tip = svgEl("title"); tip.textContent = stage; path.appendChild(tip);
    svg.appendChild(path);
    const item = el("span");
    item.append(el("span", { class: "swatch", style: `background:${color}` }), stage);
    legend.appendChild(item);
    below = above;
  });
  for (const frac of [0, 0.5, 1]) {
    const ms = maxMs * frac, t = svgEl("text", { x: 4, y: y(ms) + 4 });
    t.textContent = `${ms.toFixed(ms < 10 ? 1 : 0)} ms`;
    svg.append(t, svgEl("line", { x1: left, x2: width - 8, y1: y(ms), y2: y(ms), stroke: "#ddd" }));
  }
  const first = svgEl("text", { x: left, y: height - 6 }); first.textContent = `frame ${state.frames[0].index}`;
  const last = svgEl("text", { x: width - 8, y: height - 6, "text-anchor": "end" }); last.textContent = `frame ${state.frames[n - 1].index}`;
  svg.append(first, last, svgEl("line", { id: "timing-marker", class: "marker", y1: top, y2: height - bottom }));
  if (!state.stages.length) {
    const t = svgEl("text", { x: left + 8, y: 40 }); t.textContent = "no stage timings were recorded"; svg.appendChild(t);
  }
  svg.onclick = (e) => seek(posFromEvent(e, left));
  svg.dataset.left = left;
}

function updateMarkers() {
  for (const id of ["#timeline", "#timing"]) {
    const svg = $(id), left = Number(svg.dataset.left), width = Number(svg.getAttribute("width"));
    const marker = svg.querySelector(".marker");
    if (!marker) continue;
    const x = (chartX(state.pos, left, width) + chartX(state.pos + 1, left, width)) / 2;
    marker.setAttribute("x1", x); marker.setAttribute("x2", x);
  }
  for (const g of document.querySelectorAll("#timeline g.track")) {
    g.classList.toggle("selected-track", state.selected !== null && Number(g.dataset.track) === state.selected.track && state.selected.track >= 0);
  }
}

// ---------- per-frame view ----------
function seek(pos) {
  state.pos = Math.max(0, Math.min(state.frames.length - 1, pos));
  const f = current();
  $("#slider").value = String(state.pos);
  $("#frame-index").textContent = String(f.index);
  $("#frame-time").textContent = (f.time === null || f.time === undefined ? "" : `t = ${f.time.toFixed(3)} s`)
    + (f.propagated ? " (not segmented: objects moved by the tracker" + (carriedInstances(f).size
      ? ", stylized crops carried over)" : ")") : "")
    + (f.cut ? " (new shot: every track starts afresh)" : "");
  document.body.dataset.frame = String(f.index);
  showImages(f);
  showInstances(f);
  showTimings(f);
  drawHighlight();
  updateMarkers();
}

// One frame on (delta 1) or back (-1), wrapping at either end so that playback loops. With "frames with images
// only" the wrap happens inside the search, so it can never stop on an image-less frame at either end.
function step(delta) {
  const n = state.frames.length, imagesOnly = $("#images-only").checked;
  let pos = state.pos;
  for (let i = 0; i < n; i++) {
    pos = (pos + delta + n) % n;
    if (!imagesOnly || Object.keys(state.frames[pos].images).length) { seek(pos); return; }
  }
  seek((state.pos + delta + n) % n);   // no frame has images: the option cannot apply, step as without it
}

function togglePlay() {
  if (state.playing) {
    clearInterval(state.playing); state.playing = null; $("#play").textContent = "▶ play";
  } else {
    state.playing = setInterval(() => step(1), 1000 / Number($("#fps").value));
    $("#play").textContent = "❚❚ pause";
  }
}

function showImages(f) {
  const [h, w] = f.dump_size;
  for (const layer of state.manifest.layers) {
    const panel = panelFor(layer), img = panel.querySelector("img"), note = panel.querySelector(".noimage");
    const canvas = panel.querySelector("canvas");
    canvas.width = w; canvas.height = h;
    const src = f.images[layer];
    if (src) {
      note.hidden = true; img.style.visibility = "visible";
      img.onerror = () => { note.textContent = `image missing: ${src}`; note.hidden = false; };
      img.src = "/" + src;
    } else {
      // Keep the panel's size (a blank of the dump size) so the layout does not jump while scrubbing.
      img.removeAttribute("src"); img.style.visibility = "hidden";
      img.width = w; img.height = h; img.style.aspectRatio = `${w} / ${h}`;
      note.textContent = Object.keys(f.images).length ? `no ${layer} layer for frame ${f.index}`
        : `no images for frame ${f.index} (images every ${state.manifest.every} frames)`;
      note.hidden = false;
    }
  }
}

function selectedIndex(f) {
  if (!state.selected) return -1;
  if (state.selected.track >= 0) return f.instances.findIndex((d) => d.track_id === state.selected.track);
  return state.selected.frame === f.index ? state.selected.instance : -1;
}

// instances whose stylized crop is the last segmented frame's, moved (style.propagate)
function carriedInstances(f) {
  return new Set((f.regions ?? []).filter((r) => r.carried).map((r) => r.instance));
}

function showInstances(f) {
  const body = $("#instances tbody");
  body.replaceChildren();
  const chosen = selectedIndex(f), carried = carriedInstances(f);
  f.instances.forEach((d, i) => {
    const tr = el("tr", { "data-instance": i, "data-track": d.track_id });
    const track = el("td");
    track.append(el("span", { class: "swatch", style: `background:${rgb(trackColor(d.track_id))}` }), d.track_id >= 0 ? `#${d.track_id}` : "–");
    const box = d.box.map((v) => (v === null ? "–" : Math.round(v))).join(", ");
    const style = (shownStyle(d, f) ?? "(original)") + (carried.has(i) ? " (carried)" : "");
    tr.append(track, el("td", {}, d.class), el("td", {}, number(d.score, 3)), el("td", {}, style),
              el("td", {}, box), el("td", {}, d.area ?? "–"), el("td", {}, d.keep === null ? "–" : d.keep ? "yes" : "no"));
    if (i === chosen) tr.classList.add("selected");
    tr.addEventListener("click", () => select(f, i));
    body.appendChild(tr);
  });
  $("#no-instances").hidden = f.instances.length > 0;
  const sel = chosen >= 0 ? f.instances[chosen] : null;
  $("#selection").textContent = sel ? `— selected: ${sel.track_id >= 0 ? "track #" + sel.track_id : "untracked"} ${sel.class}` : "";
  $("#selection").dataset.track = sel ? String(sel.track_id) : "";
}

function select(f, i) {
  const d = f.instances[i];
  const same = state.selected && (d.track_id >= 0 ? state.selected.track === d.track_id
                                                   : state.selected.frame === f.index && state.selected.instance === i);
  state.selected = same ? null : { track: d.track_id, instance: i, frame: f.index };
  showInstances(f);
  drawHighlight();
  updateMarkers();
}

function showTimings(f) {
  const body = $("#timing-current tbody");
  body.replaceChildren();
  let total = 0;
  for (const stage of state.stages) {
    const ms = 1000 * (f.timings[stage] || 0); total += ms;
    body.appendChild(el("tr")).append(el("td", {}, stage), el("td", {}, `${ms.toFixed(2)} ms`));
  }
  body.appendChild(el("tr")).append(el("th", {}, "total"), el("th", {}, `${total.toFixed(2)} ms`));
}

function maskFor(f, i) {
  const key = `${f.index}:${i}`;
  if (!state.maskCache.has(key)) {
    if (state.maskCache.size > 64) state.maskCache.clear();
    const rle = f.instances[i].mask;
    state.maskCache.set(key, rle ? decodeRle(rle) : null);
  }
  return state.maskCache.get(key);
}

// Outline (and lightly fill) the selected instance's mask and box on every panel.
function drawHighlight() {
  const f = current(), i = selectedIndex(f);
  const [h, w] = f.dump_size;
  let pixels = null;
  if (i >= 0) {
    const mask = maskFor(f, i);
    if (mask) {
      pixels = new ImageData(w, h);
      const px = pixels.data;
      for (let y = 0; y < h; y++) for (let x = 0; x < w; x++) {
        const p = y * w + x;
        if (!mask[p]) continue;
        const edge = x === 0 || y === 0 || x === w - 1 || y === h - 1 || !mask[p - 1] || !mask[p + 1] || !mask[p - w] || !mask[p + w];
        px.set(edge ? [...HIGHLIGHT, 255] : [...HIGHLIGHT, 70], p * 4);
      }
    }
  }
  for (const canvas of document.querySelectorAll("canvas.highlight")) {
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    canvas.dataset.track = i >= 0 ? String(f.instances[i].track_id) : "";
    if (i < 0) continue;
    if (pixels) ctx.putImageData(pixels, 0, 0);
    const sx = w / f.size[1], sy = h / f.size[0], box = f.instances[i].box;
    if (box.some((v) => v === null)) continue;   // a coordinate the render could not give (written as null)
    const [x1, y1, x2, y2] = [box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy];
    ctx.strokeStyle = rgb(HIGHLIGHT); ctx.lineWidth = Math.max(2, w / 320); ctx.setLineDash([6, 4]);
    ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
  }
}

window.viewer = { state, seek, decodeRle };   // for tests and the console
load();
