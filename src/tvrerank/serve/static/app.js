// tvrerank's search page: plain JavaScript over the JSON API (serve/app.py); no build step, no CDN.
// Text from the server is only ever set with textContent, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
// searches and explains carry a sequence number: an answer that arrives after a newer request is dropped
const state = { info: null, query: "", top: 10, videos: new Map(), explainId: null, searchSeq: 0, explainSeq: 0 };

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function showMessage(text, kind) {
  const box = $("message");
  box.textContent = text || "";
  box.className = kind || "";
}

// GET a JSON endpoint; a 503 is retried after its Retry-After (a few times), other errors throw
// the server's one-line message.
async function getJSON(url, tries = 4) {
  for (let attempt = 1; ; attempt++) {
    const response = await fetch(url);
    if (response.status === 503 && attempt < tries) {
      const wait = Number(response.headers.get("Retry-After") || "1");
      await new Promise((resolve) => setTimeout(resolve, wait * 1000));
      continue;
    }
    let body = null;
    try { body = await response.json(); } catch (err) { body = null; }
    if (!response.ok) throw new Error((body && body.error) || `${response.status} ${response.statusText}`);
    return body;
  }
}

const api = {
  search: (q, top, rerank) => `/api/search?${new URLSearchParams({ q, top, rerank })}`,
  video: (id) => `/api/videos/${encodeURIComponent(id)}`,
  frames: (id) => `/api/videos/${encodeURIComponent(id)}/frames`,
  explain: (q, id) => `/api/explain?${new URLSearchParams({ q, video_id: id })}`,
};

function fmt(value) {
  return value === null || value === undefined ? "–" : value.toFixed(3);
}

function changeBadge(hit, rank) {
  if (hit.stage1_rank > state.top) return element("span", "change new", "new");
  const moved = hit.stage1_rank - rank;
  if (moved > 0) return element("span", "change up", `↑${moved}`);
  if (moved < 0) return element("span", "change down", `↓${-moved}`);
  return element("span", "change same", "=");
}

async function videoInfo(id) {
  if (!state.videos.has(id)) {
    // a failed answer is not kept: the next render asks again
    state.videos.set(id, getJSON(api.video(id)).catch((err) => { state.videos.delete(id); throw err; }));
  }
  return state.videos.get(id);
}

function renderHit(hit, rank, reranked) {
  const item = element("li", "hit");
  item.dataset.videoId = hit.video_id;
  const title = element("div", "title");
  title.append(element("span", "rank", String(rank)), element("span", "video-id", hit.video_id));
  if (reranked) title.append(changeBadge(hit, rank));
  item.append(title);
  const scores = reranked && hit.rerank !== null
    ? `stage 1 ${fmt(hit.stage1)} · re-ranker ${fmt(hit.rerank)} · fused ${fmt(hit.score)}`
    : `stage 1 ${fmt(hit.stage1)}` + (reranked ? " · below the re-ranked top K" : "");
  item.append(element("div", "meta", scores));
  const captions = element("div", "captions");
  item.append(captions);
  videoInfo(hit.video_id).then((info) => {
    const shown = info.captions.slice(0, 2).join(" · ");
    captions.textContent = shown + (info.captions.length > 2 ? ` (+${info.captions.length - 2})` : "");
    if (!info.exists) captions.textContent += " [video file missing]";
  }).catch((err) => { captions.textContent = `(captions unavailable: ${err.message})`; });
  const strip = element("img", "strip");
  strip.alt = `sampled frames of ${hit.video_id}`;
  strip.loading = "lazy";
  strip.src = api.frames(hit.video_id);
  strip.addEventListener("error", () => strip.replaceWith(element("div", "meta", "(frames unavailable)")));
  item.append(strip);
  if (reranked && hit.rerank !== null) {
    item.classList.add("clickable");
    item.tabIndex = 0;
    item.title = "explain: what the re-ranker looked at";
    item.addEventListener("click", () => explain(hit.video_id));
    item.addEventListener("keydown", (event) => { if (event.key === "Enter") explain(hit.video_id); });
  }
  return item;
}

function renderColumn(list, hits, reranked) {
  list.replaceChildren(...hits.map((hit, i) => renderHit(hit, i + 1, reranked)));
}

function setURL(push) {
  const params = new URLSearchParams({ q: state.query, top: state.top });
  if (state.explainId) params.set("explain", state.explainId);
  const url = `${location.pathname}?${params}`;
  if (push) history.pushState(null, "", url); else history.replaceState(null, "", url);
}

async function search(push) {
  const query = $("query").value.trim();
  state.top = Math.max(1, Math.min(100, Math.trunc(Number($("top").value)) || 10));
  $("top").value = state.top;
  if (!query) { showMessage("type a query first", "error"); return; }
  const seq = ++state.searchSeq;
  state.query = query;
  state.explainId = push ? null : state.explainId;
  setURL(push);
  showMessage("searching…");
  try {
    const [stage1, reranked] = await Promise.all([
      getJSON(api.search(query, state.top, false)), getJSON(api.search(query, state.top, true))]);
    if (seq !== state.searchSeq) return;  // a newer search was started meanwhile
    renderColumn($("stage1"), stage1.results, false);
    renderColumn($("reranked"), reranked.results, true);
    $("reranked-note").textContent = state.info ? `(top ${state.info.k} by the re-ranker; click one)` : "";
    $("results").hidden = false;
    document.body.dataset.searched = query;
    showMessage(reranked.warning || "", reranked.warning ? "warning" : "");
    if (state.explainId) await explain(state.explainId); else closeExplain();
  } catch (err) {
    if (seq === state.searchSeq) showMessage(err.message, "error");
  }
}

function closeExplain() {
  state.explainSeq++;  // an explain still on its way is dropped
  $("explain").hidden = true;
  $("explain-frames").replaceChildren();
}

function loadImage(url) {
  return new Promise((resolve, reject) => {
    const image = new Image();
    image.onload = () => resolve(image);
    image.onerror = () => reject(new Error(`could not load ${url}`));
    image.src = url;
  });
}

// A detail world's known answer on frame t: each patch showing the detail outlined dashed, magenta
// over a dark line (visible on any colour), inside the kept-patch outline. Returns how many it drew.
function drawDetail(canvas, data, t) {
  const [rows, cols] = data.grid, side = canvas.width;
  const ctx = canvas.getContext("2d");
  const cellW = side / cols, cellH = side / rows, width = Math.max(1.5, side / 120), inset = 2.5 * width;
  const patches = data.detail_patches[t];
  ctx.save();
  ctx.lineWidth = width;
  patches.forEach((patch) => {
    const x = (patch % cols) * cellW + inset, y = Math.floor(patch / cols) * cellH + inset;
    const w = cellW - 2 * inset, h = cellH - 2 * inset;
    ctx.setLineDash([]);
    ctx.strokeStyle = "#1d232b";
    ctx.strokeRect(x, y, w, h);
    ctx.setLineDash([3 * width, 2 * width]);
    ctx.strokeStyle = "#ff2bd6";
    ctx.strokeRect(x, y, w, h);
  });
  ctx.restore();
  return patches.length;
}

// One canvas per sampled frame: the frame as the encoder saw it, the attention heat on each patch,
// the kept patches outlined, the video selector's picks marked. Returns how many overlay marks it drew.
// (A detail world's known answer is drawn over it by drawDetail.)
function drawFrame(canvas, strip, data, t, weightMax, heatMax) {
  const size = data.image_size, [rows, cols] = data.grid, side = canvas.width;
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = size >= side;
  ctx.drawImage(strip, t * size, 0, size, size, 0, 0, side, side);
  const cellW = side / cols, cellH = side / rows;
  const cell = (patch) => [(patch % cols) * cellW, Math.floor(patch / cols) * cellH];
  let marks = 0;
  const heat = data.patch_heat[t];  // one scale for every frame (heatMax), so frames compare
  if (data.kept_patches[t].length === 0 && data.frame_weight) {
    // global tokens only: the whole frame is one token; tint it by its share of the attention
    ctx.fillStyle = `rgba(255, 60, 0, ${(0.3 * data.frame_weight[t] / weightMax).toFixed(3)})`;
    ctx.fillRect(0, 0, side, side);
    marks += 1;
  }
  heat.forEach((value, patch) => {
    if (value <= 0) return;
    const [x, y] = cell(patch);
    ctx.fillStyle = `rgba(255, 60, 0, ${(0.65 * value / heatMax).toFixed(3)})`;
    ctx.fillRect(x, y, cellW, cellH);
    marks += 1;
  });
  if (data.frame_tokens !== "all") {
    ctx.strokeStyle = "#ffd400";
    ctx.lineWidth = Math.max(1.5, side / 120);
    data.kept_patches[t].forEach((patch) => {
      const [x, y] = cell(patch);
      ctx.strokeRect(x + 1, y + 1, cellW - 2, cellH - 2);
      marks += 1;
    });
  }
  ctx.fillStyle = "#00d0ff";
  data.video_picks.forEach((pick) => {
    if (pick.frame !== t || !pick.valid) return;
    if (pick.patch === null) { canvas.classList.add("global-pick"); marks += 1; return; }
    const [x, y] = cell(pick.patch);
    ctx.beginPath();
    ctx.arc(x + cellW / 2, y + cellH / 2, Math.max(2.5, Math.min(cellW, cellH) / 5), 0, 2 * Math.PI);
    ctx.fill();
    marks += 1;
  });
  return marks;
}

async function explain(id) {
  const panel = $("explain"), frames = $("explain-frames");
  const seq = ++state.explainSeq;
  document.querySelectorAll(".hit.selected").forEach((node) => node.classList.remove("selected"));
  document.querySelectorAll(`#reranked .hit`).forEach((node) => {
    if (node.dataset.videoId === id) node.classList.add("selected");
  });
  state.explainId = id;
  setURL(false);
  panel.hidden = false;
  delete panel.dataset.drawn;
  delete panel.dataset.detail;
  delete panel.dataset.detailKept;
  frames.replaceChildren();
  $("explain-title").textContent = `“${state.query}” × ${id}`;
  $("explain-note").textContent = "loading…";
  try {
    const [data, strip] = await Promise.all([getJSON(api.explain(state.query, id)), loadImage(api.frames(id))]);
    if (seq !== state.explainSeq) return;  // another hit was clicked, or the view was closed, meanwhile
    const notes = [`re-ranker score ${fmt(data.score)}`,
      `${data.grid[0]}×${data.grid[1]} patch grid, ${data.frame_tokens === "top_m"
        ? `${data.kept_patches[0].length} patches kept per frame`
        : data.frame_tokens === "all" ? "every patch kept" : "global token per frame only (no patch selection)"}`];
    if (data.warning) notes.push(data.warning);
    $("explain-note").textContent = notes.join(" · ");
    const side = Math.max(96, Math.min(224, 4 * data.image_size));
    const weights = data.frame_weight || [];
    const weightMax = Math.max(...weights, 1e-9);
    const heatMax = Math.max(...data.patch_heat.flat(), 1e-9);
    let marks = 0, detailDrawn = 0, detailKept = 0;
    const detail = data.detail_patches || null;  // a detail world's known answer, else absent
    $("legend-detail").hidden = !detail;
    for (let t = 0; t < data.frames; t++) {
      const box = element("figure", "frame" + (data.frame_valid[t] ? "" : " padding"));
      box.style.margin = "0";
      const canvas = element("canvas");
      canvas.width = canvas.height = side;
      box.append(canvas);
      const caption = element("figcaption", "", `frame ${t + 1}` + (data.frame_valid[t] ? "" : " (padding)"));
      if (data.global_attention && data.kept_patches[t].length) {
        caption.title = `frame-level attention on the frame's global token: ${(100 * data.global_attention[t]).toFixed(0)}%`;
      }
      if (data.frame_weight) {
        const bar = element("div", "bar");
        bar.style.width = `${Math.round(side * data.frame_weight[t] / weightMax)}px`;
        bar.title = `video-level attention ${data.frame_weight[t].toFixed(3)}`;
        box.append(bar);
        caption.textContent += ` · ${(100 * data.frame_weight[t]).toFixed(1)}%`;
      }
      if (detail && data.frame_valid[t] && detail[t].length) {
        // did the frame selector keep a patch that shows the detail?
        const kept = data.kept_patches[t].some((patch) => detail[t].includes(patch));
        const selecting = data.frame_tokens === "top_m";
        box.classList.add(selecting ? (kept ? "detail-kept" : "detail-missed") : "detail-shown");
        caption.append(element("span", "detail-note", selecting ? (kept ? " · detail kept" : " · detail missed")
          : " · detail"));
        if (selecting && kept) detailKept += 1;
      }
      box.append(caption);
      frames.append(box);
      if (data.frame_valid[t]) {
        marks += drawFrame(canvas, strip, data, t, weightMax, heatMax);
        if (detail) detailDrawn += drawDetail(canvas, data, t);
      }
    }
    panel.dataset.drawn = String(data.frames);
    panel.dataset.marks = String(marks);
    if (detail) {
      panel.dataset.detail = String(detailDrawn);  // detail patches outlined
      panel.dataset.detailKept = String(detailKept);  // frames whose kept patches include one
    }
  } catch (err) {
    if (seq === state.explainSeq) $("explain-note").textContent = `could not explain ${id}: ${err.message}`;
  }
}

async function start() {
  $("search-form").addEventListener("submit", (event) => { event.preventDefault(); search(true); });
  $("explain-close").addEventListener("click", () => {
    closeExplain();
    state.explainId = null;
    if (state.query) setURL(false);
  });
  window.addEventListener("popstate", () => fromURL());
  try {
    state.info = await getJSON("/api/info");
    const info = state.info;
    $("gallery-info").textContent = `${info.videos} videos (${info.searchable} searchable) · ${info.model} · `
      + `${info.frames} frames of ${info.image_size} px · re-ranker over the top ${info.k}`;
  } catch (err) {
    $("gallery-info").textContent = `could not read the gallery: ${err.message}`;
  }
  await fromURL();
}

async function fromURL() {
  const params = new URLSearchParams(location.search);
  const query = params.get("q");
  if (params.get("top")) $("top").value = params.get("top");
  state.explainId = params.get("explain");
  if (query) {
    $("query").value = query;
    await search(false);
    return;
  }
  state.searchSeq++;  // back to the empty page: drop answers on their way, clear what is shown
  state.query = "";
  $("query").value = "";
  $("results").hidden = true;
  closeExplain();
  showMessage("");
}

start();
