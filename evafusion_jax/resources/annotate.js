// EVAFusion feedback page: scores + artifact circles (annotate / review) or blind ranking (rank).
// Plain JS, no dependencies; talks only to the server that served it.
"use strict";

const $ = (id) => document.getElementById(id);
const S = {
  mode: null, scoreNames: [], items: [], index: -1, item: null, who: "",
  scores: {}, active: 0, circles: [], undo: [], sel: -1, dirty: false, leaveArmed: false,
  view: { z: 1, u: 0.5, v: 0.5 }, panels: [], order: [],
};

// ---------------------------------------------------------------- server calls
async function api(path, body) {
  const opt = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  const r = await fetch(path, opt);
  let data = null;
  try { data = await r.json(); } catch (e) { data = { error: `HTTP ${r.status}` }; }
  if (!r.ok) throw new Error(data.error || `HTTP ${r.status}`);
  return data;
}

function status(text, state) {
  const el = $("status");
  el.textContent = text;
  el.dataset.state = state;
}

function setDirty(d) {
  S.dirty = d;
  S.leaveArmed = false;
  if (d) status("Unsaved changes", "dirty");
}

// ---------------------------------------------------------------- panels, zoom and pan
function makePanel(label, kind) {
  const panel = document.createElement("div");
  panel.className = "panel";
  panel.innerHTML = `<div class="label"><span class="name"></span><span class="rank-badge"></span></div>
    <div class="view"><div class="stage"><img alt=""></div></div>`;
  panel.querySelector(".name").textContent = label;
  const p = { el: panel, kind, view: panel.querySelector(".view"), stage: panel.querySelector(".stage"),
              img: panel.querySelector("img"), w: 1, h: 1, svg: null, label };
  p.view.dataset.kind = kind;
  $("panels").appendChild(panel);
  p.view.addEventListener("wheel", (e) => onWheel(e, p), { passive: false });
  p.view.addEventListener("pointerdown", (e) => onDown(e, p));
  p.view.addEventListener("dblclick", (e) => onDblClick(e, p));
  S.panels.push(p);
  return p;
}

function geom(p) {
  const W = p.view.clientWidth, H = p.view.clientHeight;
  const s = Math.min(W / p.w, H / p.h) * S.view.z;
  return { s, tx: W / 2 - S.view.u * p.w * s, ty: H / 2 - S.view.v * p.h * s };
}

function applyView() {
  for (const p of S.panels) {
    const g = geom(p);
    p.stage.style.transform = `translate(${g.tx}px, ${g.ty}px) scale(${g.s})`;
    if (p.svg) drawCircles();
  }
}

function toImage(e, p) {  // event -> image pixel coordinates of panel p
  const r = p.view.getBoundingClientRect(), g = geom(p);
  return { x: (e.clientX - r.left - g.tx) / g.s, y: (e.clientY - r.top - g.ty) / g.s, s: g.s };
}

function zoom(factor, p, e) {
  const z = Math.min(64, Math.max(1, S.view.z * factor));
  if (p && e) {  // keep the point under the cursor fixed
    const a = toImage(e, p);
    const r = p.view.getBoundingClientRect();
    const W = p.view.clientWidth, H = p.view.clientHeight;
    const s = Math.min(W / p.w, H / p.h) * z;
    S.view.u = (a.x - (e.clientX - r.left - W / 2) / s) / p.w;
    S.view.v = (a.y - (e.clientY - r.top - H / 2) / s) / p.h;
  }
  S.view.z = z;
  if (z === 1) { S.view.u = 0.5; S.view.v = 0.5; }
  applyView();
}

function onWheel(e, p) {
  e.preventDefault();
  zoom(e.deltaY < 0 ? 1.25 : 0.8, p, e);
}

// ---------------------------------------------------------------- circles
function pushUndo() { S.undo.push(JSON.stringify(S.circles)); if (S.undo.length > 200) S.undo.shift(); }

function drawCircles() {
  const p = S.panels.find((q) => q.svg);
  if (!p) return;
  const s = geom(p).s, hs = 5 / s;
  let html = "";
  S.circles.forEach((c, i) => {
    const cls = i === S.sel ? "art sel" : "art";
    html += `<circle class="${cls}" data-i="${i}" cx="${c.x}" cy="${c.y}" r="${c.r}" stroke-width="${2 / s}"></circle>`;
    html += `<rect class="handle" data-i="${i}" x="${c.x + c.r - hs}" y="${c.y - hs}" width="${2 * hs}" height="${2 * hs}" stroke-width="${1 / s}"></rect>`;
  });
  p.svg.innerHTML = html;
  $("circle-count").textContent = `${S.circles.length} circle${S.circles.length === 1 ? "" : "s"}`;
}

function hit(pt, p) {  // -> {i, part: "handle"|"body"} or null; topmost first
  const tol = 7 / pt.s;
  for (let i = S.circles.length - 1; i >= 0; i--) {
    const c = S.circles[i];
    if (Math.abs(pt.x - (c.x + c.r)) <= tol && Math.abs(pt.y - c.y) <= tol) return { i, part: "handle" };
  }
  for (let i = S.circles.length - 1; i >= 0; i--) {
    const c = S.circles[i];
    if (Math.hypot(pt.x - c.x, pt.y - c.y) <= c.r) return { i, part: "body" };
  }
  return null;
}

function clampCircle(c, p) {
  c.x = Math.min(p.w, Math.max(0, c.x));
  c.y = Math.min(p.h, Math.max(0, c.y));
  c.r = Math.min(Math.max(p.w, p.h), Math.max(0.5, c.r));
  for (const k of ["x", "y", "r"]) c[k] = Math.round(c[k] * 10) / 10;
}

function onDown(e, p) {
  if (e.button !== 0 && e.button !== 1) return;
  e.preventDefault();
  p.view.setPointerCapture(e.pointerId);
  const start = { cx: e.clientX, cy: e.clientY, u: S.view.u, v: S.view.v };
  const pt = toImage(e, p);
  let action = "pan";
  let h = null;
  if (p.svg && !e.shiftKey && e.button === 0) {
    h = hit(pt, p);
    action = h ? (h.part === "handle" ? "resize" : "move") : "new";
  }
  let moved = false, before = JSON.stringify(S.circles), grab = null;
  if (action === "move" || action === "resize") {
    S.sel = h.i;
    grab = { dx: pt.x - S.circles[h.i].x, dy: pt.y - S.circles[h.i].y };
    drawCircles();
  }
  let newIndex = -1;
  const move = (ev) => {
    if (Math.hypot(ev.clientX - start.cx, ev.clientY - start.cy) > 3) moved = true;
    if (!moved) return;
    const q = toImage(ev, p);
    if (action === "pan") {
      const g = geom(p);
      S.view.u = start.u - (ev.clientX - start.cx) / (g.s * p.w);
      S.view.v = start.v - (ev.clientY - start.cy) / (g.s * p.h);
      applyView();
      return;
    }
    if (action === "new" && newIndex < 0) {
      S.circles.push({ x: pt.x, y: pt.y, r: 1 });
      newIndex = S.circles.length - 1;
      S.sel = newIndex;
    }
    const i = action === "new" ? newIndex : h.i;
    const c = S.circles[i];
    if (action === "move") { c.x = q.x - grab.dx; c.y = q.y - grab.dy; }
    else if (action === "new") { c.x = pt.x; c.y = pt.y; c.r = Math.hypot(q.x - pt.x, q.y - pt.y); }
    else { c.r = Math.hypot(q.x - c.x, q.y - c.y); }
    clampCircle(c, p);
    drawCircles();
  };
  const up = (ev) => {
    p.view.removeEventListener("pointermove", move);
    p.view.removeEventListener("pointerup", up);
    p.view.removeEventListener("pointercancel", up);
    if (action === "pan") {
      if (!moved && p.kind === "cand") toggleRank(p.label);
      return;
    }
    if (!moved) {  // a click: select (or deselect) only
      if (action === "new") S.sel = -1;
      drawCircles();
      return;
    }
    if (action === "new" && S.circles[newIndex].r < 1.5) {  // too small to mean anything
      S.circles.splice(newIndex, 1);
      S.sel = -1;
      drawCircles();
      return;
    }
    if (JSON.stringify(S.circles) !== before) {
      S.undo.push(before);
      setDirty(true);
    }
  };
  p.view.addEventListener("pointermove", move);
  p.view.addEventListener("pointerup", up);
  p.view.addEventListener("pointercancel", up);
}

function onDblClick(e, p) {
  if (!p.svg) return;
  const h = hit(toImage(e, p), p);
  if (h) { S.sel = h.i; deleteSelected(); }
}

function deleteSelected() {
  if (S.sel < 0 || S.sel >= S.circles.length) return;
  pushUndo();
  S.circles.splice(S.sel, 1);
  S.sel = -1;
  drawCircles();
  setDirty(true);
}

function undo() {
  if (!S.undo.length) return;
  S.circles = JSON.parse(S.undo.pop());
  S.sel = -1;
  drawCircles();
  setDirty(true);
}

// ---------------------------------------------------------------- scores
function buildScores() {
  const box = $("scores");
  box.innerHTML = "";
  S.scoreNames.forEach((name, k) => {
    const row = document.createElement("div");
    row.className = "score-row";
    row.dataset.k = k;
    let html = `<span class="name">${k + 1}. ${name}</span>`;
    for (let v = 1; v <= 5; v++) {
      html += `<label><input type="radio" name="score-${k}" value="${v}" data-name="${name}">${v}</label>`;
    }
    row.innerHTML = html;
    row.addEventListener("click", () => setActive(k));
    row.querySelectorAll("input").forEach((inp) => inp.addEventListener("change", () => {
      S.scores[name] = Number(inp.value);
      setDirty(true);
    }));
    box.appendChild(row);
  });
  setActive(0);
}

function setActive(k) {
  S.active = (k + S.scoreNames.length) % S.scoreNames.length;
  document.querySelectorAll(".score-row").forEach((r) => r.classList.toggle("active", Number(r.dataset.k) === S.active));
}

function showScores() {
  S.scoreNames.forEach((name, k) => {
    document.querySelectorAll(`input[name="score-${k}"]`).forEach((inp) => {
      inp.checked = S.scores[name] === Number(inp.value);
    });
  });
}

function setScore(v) {
  S.scores[S.scoreNames[S.active]] = v;
  showScores();
  setDirty(true);
  setActive(S.active + 1);
}

// ---------------------------------------------------------------- ranking
function toggleRank(label) {
  const at = S.order.indexOf(label);
  if (at >= 0) S.order.splice(at, 1); else S.order.push(label);
  showOrder();
  setDirty(true);
}

function showOrder() {
  const cands = S.item ? S.item.candidates.map((c) => c.label) : [];
  $("order").textContent = cands.length
    ? cands.map((_, k) => S.order[k] || "?").join(" > ") : "-";
  for (const p of S.panels) {
    if (p.kind !== "cand") continue;
    const k = S.order.indexOf(p.label);
    p.el.querySelector(".rank-badge").textContent = k >= 0 ? `rank ${k + 1}` : "";
    p.view.classList.toggle("ranked", k >= 0);
  }
}

// ---------------------------------------------------------------- items
function loadImage(p, url, w, h) {
  return new Promise((resolve) => {
    p.img.onload = () => {
      p.w = p.img.naturalWidth || w; p.h = p.img.naturalHeight || h;
      p.img.width = p.w; p.img.height = p.h;
      if (p.svg) {
        p.svg.setAttribute("width", p.w); p.svg.setAttribute("height", p.h);
        p.svg.setAttribute("viewBox", `0 0 ${p.w} ${p.h}`);
      }
      resolve();
    };
    p.img.onerror = () => { status(`cannot load image ${url}`, "error"); resolve(); };
    p.img.src = url;
  });
}

function buildPanels(item) {
  $("panels").innerHTML = "";
  S.panels = [];
  makePanel("Infrared", "ir");
  makePanel("Visible", "vi");
  if (S.mode === "rank") {
    $("panels").style.gridTemplateColumns = `repeat(${Math.max(3, item.candidates.length)}, 1fr)`;
    for (const c of item.candidates) makePanel(c.label, "cand");
  } else {
    const f = makePanel("Fused (blind)", "fused");
    f.view.classList.add("draw");
    f.svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    f.stage.appendChild(f.svg);
  }
}

async function show(index) {
  if (!S.items.length) return;
  index = Math.max(0, Math.min(S.items.length - 1, index));
  const id = S.items[index].id;
  let item;
  try {
    item = await api(`/api/item?id=${encodeURIComponent(id)}&who=${encodeURIComponent(S.who)}`);
  } catch (e) { status(e.message, "error"); return; }
  S.index = index; S.item = item;
  history.replaceState(null, "", `#i=${index + 1}`);
  buildPanels(item);
  const loads = [loadImage(S.panels[0], item.ir, item.width, item.height),
                 loadImage(S.panels[1], item.vi, item.width, item.height)];
  if (S.mode === "rank") {
    item.candidates.forEach((c, k) => loads.push(loadImage(S.panels[2 + k], c.url, item.width, item.height)));
    S.order = item.saved ? item.saved.slice() : [];
    showOrder();
  } else {
    loads.push(loadImage(S.panels[2], item.fused, item.width, item.height));
    S.scores = Object.assign({}, item.scores || {});
    S.circles = (item.circles || []).map((c) => ({ x: c.x, y: c.y, r: c.r }));
    S.undo = []; S.sel = -1;
    showScores(); setActive(0);
    $("review-note").hidden = !item.prefilled;
  }
  await Promise.all(loads);
  applyView();
  $("pos").textContent = `${index + 1} / ${S.items.length}`;
  $("jump").value = index + 1;
  S.dirty = false; S.leaveArmed = false;
  if (item.saved) status(`Saved${item.saved_by ? " by " + item.saved_by : ""}`, "saved");
  else status(item.prefilled ? "Model pre-fill, not saved yet"
              : S.mode === "rank" ? "Not ranked yet" : "Not annotated yet", "idle");
  document.body.dataset.loaded = id;
}

function go(index) {
  if (S.dirty && !S.leaveArmed) {
    S.leaveArmed = true;
    status("Unsaved changes: submit, or press again to discard", "dirty");
    return;
  }
  show(index);
}

function nextTodo(from) {
  const n = S.items.length;
  for (let k = 1; k <= n; k++) {
    const j = (from + k) % n;
    if (!S.items[j].done) return j;
  }
  return -1;
}

function progress(done, count) {
  $("progress").textContent = `${done} / ${count} done`;
}

async function loadItems() {
  S.who = $("who").value.trim();
  if (!S.who) { status("Enter your id to start", "error"); $("who").focus(); return false; }
  localStorage.setItem("evafusion-who", S.who);
  let data;
  try { data = await api(`/api/items?who=${encodeURIComponent(S.who)}`); }
  catch (e) { status(e.message, "error"); return false; }
  S.items = data.items;
  progress(data.done, data.count);
  return true;
}

async function submit() {
  if (!S.item) return;
  let body, path;
  if (S.mode === "rank") {
    if (S.order.length !== S.item.candidates.length) { status("Rank every image first", "error"); return; }
    body = { id: S.item.id, who: S.who, order: S.order };
    path = "/api/rank";
  } else {
    const missing = S.scoreNames.filter((n) => !S.scores[n]);
    if (missing.length) { status(`Set ${missing.join(", ")}`, "error"); return; }
    body = { id: S.item.id, who: S.who, scores: S.scores, circles: S.circles };
    path = "/api/submit";
  }
  status("Saving...", "busy");
  let res;
  try { res = await api(path, body); } catch (e) { status(`Not saved: ${e.message}`, "error"); return; }
  S.items[S.index].done = true;
  progress(res.done, res.count);
  S.dirty = false;
  const j = nextTodo(S.index);
  if (j >= 0) await show(j);
  status(`Saved ${res.time.slice(11, 19)} UTC` + (j < 0 ? " - all done" : ""), "saved");
  document.body.dataset.saved = String(Number(document.body.dataset.saved || 0) + 1);
}

// ---------------------------------------------------------------- keys and buttons
function onKey(e) {
  if (e.target.tagName === "INPUT" && e.target.type !== "radio") return;
  const k = e.key;
  if (k === "ArrowLeft") { go(S.index - 1); }
  else if (k === "ArrowRight") { go(S.index + 1); }
  else if (k === "n" || k === "N") { const j = nextTodo(S.index); if (j >= 0) go(j); }
  else if (k === "Enter") { submit(); }
  else if (k === "+" || k === "=") { zoom(1.25); }
  else if (k === "-") { zoom(0.8); }
  else if (k === "0") { S.view = { z: 1, u: 0.5, v: 0.5 }; applyView(); }
  else if (S.mode === "rank") {
    const labels = S.item ? S.item.candidates.map((c) => c.label) : [];
    if (k === "Backspace") { S.order.pop(); showOrder(); setDirty(true); }
    else if (labels.includes(k.toUpperCase())) { toggleRank(k.toUpperCase()); }
    else return;
  } else {
    if (k >= "1" && k <= "5") { setScore(Number(k)); }
    else if (k === "ArrowUp") { setActive(S.active - 1); }
    else if (k === "ArrowDown") { setActive(S.active + 1); }
    else if (k === "Delete" || k === "Backspace") { deleteSelected(); }
    else if (k === "z" || k === "Z") { undo(); }
    else return;
  }
  e.preventDefault();
}

async function init() {
  const cfg = await api("/api/config");
  S.mode = cfg.mode; S.scoreNames = cfg.score_names;
  document.body.dataset.mode = cfg.mode;
  $("title").textContent = cfg.mode === "rank" ? "Blind ranking" :
    cfg.mode === "review" ? "Review model annotations" : "Annotate fused images";
  $("annotate-controls").hidden = cfg.mode === "rank";
  $("rank-controls").hidden = cfg.mode !== "rank";
  $("keys-annotate").hidden = cfg.mode === "rank";
  $("keys-rank").hidden = cfg.mode !== "rank";
  if (cfg.mode !== "rank") buildScores();
  const params = new URLSearchParams(location.search);
  $("who").value = params.get("who") || localStorage.getItem("evafusion-who") || "";
  $("who").addEventListener("change", async () => { if (await loadItems()) show(Math.max(0, nextTodo(-1))); });
  $("prev").onclick = () => go(S.index - 1);
  $("next").onclick = () => go(S.index + 1);
  $("next-todo").onclick = () => { const j = nextTodo(S.index); if (j >= 0) go(j); };
  $("jump").addEventListener("change", () => go(Number($("jump").value) - 1));
  $("submit").onclick = submit;
  $("undo").onclick = undo;
  $("delete").onclick = deleteSelected;
  $("rank-reset").onclick = () => { S.order = []; showOrder(); setDirty(true); };
  $("zoom-in").onclick = () => zoom(1.25);
  $("zoom-out").onclick = () => zoom(0.8);
  $("zoom-reset").onclick = () => { S.view = { z: 1, u: 0.5, v: 0.5 }; applyView(); };
  document.addEventListener("keydown", onKey);
  window.addEventListener("resize", applyView);
  window.addEventListener("beforeunload", (e) => { if (S.dirty) { e.preventDefault(); e.returnValue = ""; } });
  if (!(await loadItems())) return;
  const m = /#i=(\d+)/.exec(location.hash);
  const todo = nextTodo(-1);
  await show(m ? Number(m[1]) - 1 : (todo >= 0 ? todo : 0));
}

init().catch((e) => status(`Cannot start: ${e.message}`, "error"));
