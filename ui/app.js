// modrun's dashboard: one page over the HTTP API (the same routes, scopes and errors as
// curl sees). No framework and nothing fetched from elsewhere. Every text from the server is
// put in the page as text (textContent), never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const el = (tag, props = {}, ...children) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("data-")) e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children) e.append(c);
  return e;
};

const FINAL = new Set(["succeeded", "failed", "cancelled", "timed_out", "lost"]);
const PAGE = 25;

const state = {
  session: null, // GET /session
  modules: [],
  feed: null, // the EventSource of /events
  runsCursor: [], // cursors of the pages shown before this one
  runsNext: null,
  runsRows: new Map(), // run id -> <tr>
  runView: null, // the open run page: {id, source, lastSeq}
};

/// A request to the API; resolves to {status, body}, or throws {status, problem}.
async function api(method, path, body) {
  const headers = { "x-modrun-csrf": "1", accept: "application/json" };
  const init = { method, headers, credentials: "same-origin" };
  if (body !== undefined) {
    headers["content-type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const res = await fetch(path, init);
  const text = await res.text();
  let json = null;
  try { json = text ? JSON.parse(text) : null; } catch (_) { json = null; }
  if (!res.ok) {
    const problem = json || { detail: text || res.statusText };
    throw { status: res.status, problem };
  }
  return { status: res.status, body: json };
}

const can = (scope) => !!state.session && state.session.scopes.includes(scope);

function notice(text) {
  const n = $("notice");
  n.textContent = text || "";
  n.hidden = !text;
}

function problemText(e) {
  if (e && e.problem) return e.problem.detail || e.problem.title || `error ${e.status}`;
  return String(e && e.message ? e.message : e);
}

// ---- time ----------------------------------------------------------------------------------

function relative(iso) {
  if (!iso) return "";
  const s = Math.round((Date.now() - Date.parse(iso)) / 1000);
  if (s < 5) return "just now";
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return `${Math.floor(s / 86400)} d ago`;
}

function timeCell(iso) {
  const t = el("time", { text: relative(iso), title: iso ? new Date(iso).toLocaleString() : "" });
  t.dateTime = iso || "";
  t.className = "rel";
  return t;
}

function duration(run) {
  if (!run.started_at) return "";
  const end = run.finished_at ? Date.parse(run.finished_at) : Date.now();
  const ms = end - Date.parse(run.started_at);
  if (ms < 1000) return `${ms} ms`;
  if (ms < 60000) return `${(ms / 1000).toFixed(1)} s`;
  return `${Math.floor(ms / 60000)} min ${Math.round((ms % 60000) / 1000)} s`;
}

function exitText(run) {
  if (run.exit_code !== null && run.exit_code !== undefined) return String(run.exit_code);
  if (run.signal !== null && run.signal !== undefined) return `signal ${run.signal}`;
  return "";
}

setInterval(() => {
  for (const t of document.querySelectorAll("time.rel")) t.textContent = relative(t.dateTime);
}, 10000);

// ---- session -------------------------------------------------------------------------------

async function loadSession() {
  state.session = (await api("GET", "/session")).body;
  const s = state.session;
  $("who").textContent = s.signed_in ? `signed in as ${s.name}` : "";
  $("sign-out").hidden = !s.signed_in;
  $("nav-runs").hidden = !can("runs:read");
  $("nav-modules").hidden = !can("modules:read");
}

$("signin-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  $("signin-error").textContent = "";
  try {
    await api("POST", "/session", { token: $("signin-token").value });
    $("signin-token").value = "";
    await start();
  } catch (e) {
    $("signin-error").textContent = problemText(e);
  }
});

$("sign-out").addEventListener("click", async () => {
  await api("DELETE", "/session").catch(() => {});
  if (state.feed) state.feed.close();
  state.feed = null;
  await start();
});

// ---- views ---------------------------------------------------------------------------------

function show(view) {
  for (const v of document.querySelectorAll("main > section")) v.hidden = v.id !== `view-${view}`;
  $("nav-modules").classList.toggle("active", view === "modules" || view === "module");
  $("nav-runs").classList.toggle("active", view === "runs" || view === "run");
  if (view !== "run") closeRunView();
}

async function route() {
  notice("");
  if (state.session && state.session.needs_token) return show("signin");
  const hash = location.hash || (can("modules:read") ? "#/modules" : "#/runs");
  const [path, query] = hash.slice(1).split("?");
  const parts = path.split("/").filter(Boolean);
  try {
    if (parts[0] === "modules" && parts[1]) return await showModule(decodeURIComponent(parts[1]), new URLSearchParams(query));
    if (parts[0] === "runs" && parts[1]) return await showRun(decodeURIComponent(parts[1]));
    if (parts[0] === "runs") return await showRuns();
    return await showModules();
  } catch (e) {
    if (e && e.status === 401) return start();
    notice(problemText(e));
  }
}

window.addEventListener("hashchange", route);

// ---- modules and the launch form -----------------------------------------------------------

async function loadModules() {
  if (!can("modules:read")) return [];
  const body = (await api("GET", "/modules")).body;
  state.modules = Array.isArray(body) ? body : body.modules || [];
  const sel = $("filter-module");
  const current = sel.value;
  sel.replaceChildren(el("option", { value: "", text: "all" }));
  for (const m of state.modules) sel.append(el("option", { value: m.id, text: m.id }));
  sel.value = current;
  return state.modules;
}

async function showModules() {
  show("modules");
  const list = $("module-list");
  list.replaceChildren();
  for (const m of await loadModules()) {
    list.append(el("li", { "data-module": m.id },
      el("a", { href: `#/modules/${encodeURIComponent(m.id)}`, text: m.name || m.id }),
      el("p", { text: m.description || "" })));
  }
}

function fieldFor(p, value) {
  const id = `param-${p.name}`;
  const wrap = el("div", { class: "field", "data-param": p.name });
  const label = el("label", { text: p.name, htmlFor: id });
  if (p.required) label.append(el("span", { class: "required", text: " *", title: "required" }));
  let input;
  const v = value !== undefined ? value : p.default;
  if (p.type === "boolean") {
    input = el("input", { type: "checkbox", id, name: p.name });
    input.checked = v === true;
  } else if (p.type === "choice") {
    input = el("select", { id, name: p.name });
    if (!p.required && (p.default === null || p.default === undefined)) input.append(el("option", { value: "", text: "" }));
    for (const c of p.choices || []) input.append(el("option", { value: c, text: c }));
    input.value = v === null || v === undefined ? "" : String(v);
  } else if (p.type === "integer" || p.type === "number") {
    input = el("input", { type: "number", id, name: p.name });
    input.step = p.type === "integer" ? "1" : "any";
    if (p.min !== null && p.min !== undefined) input.min = String(p.min);
    if (p.max !== null && p.max !== undefined) input.max = String(p.max);
    if (v !== null && v !== undefined) input.value = String(v);
  } else if (p.multiline) {
    input = el("textarea", { id, name: p.name, rows: 4 });
    if (v !== null && v !== undefined) input.value = String(v);
  } else {
    input = el("input", { type: p.secret ? "password" : "text", id, name: p.name });
    if (p.secret) input.autocomplete = "off";
    if (v !== null && v !== undefined && v !== "***") input.value = String(v);
  }
  if (p.max_length) input.maxLength = p.max_length;
  if (p.required) input.required = true;
  input.dataset.kind = p.type;
  wrap.append(label, input);
  const hints = [];
  if (p.description) hints.push(p.description);
  if (p.min !== null && p.min !== undefined && p.max !== null && p.max !== undefined) hints.push(`${p.min} to ${p.max}`);
  if (hints.length) wrap.append(el("span", { class: "hint", text: hints.join(" · ") }));
  wrap.append(el("span", { class: "error", "data-error-for": p.name, role: "alert" }));
  return wrap;
}

async function showModule(id, query) {
  show("module");
  const m = (await api("GET", `/modules/${encodeURIComponent(id)}`)).body;
  $("module-title").textContent = m.name || m.id;
  $("module-description").textContent = m.description || "";
  let values = {};
  const again = query.get("again");
  if (again && can("runs:read")) {
    try { values = (await api("GET", `/runs/${encodeURIComponent(again)}`)).body.parameters || {}; } catch (_) { values = {}; }
  }
  const fields = $("launch-fields");
  fields.replaceChildren(...(m.parameters || []).map((p) => fieldFor(p, values[p.name])));
  $("launch-error").textContent = "";
  $("launch").hidden = !can("runs:create");
  const form = $("launch-form");
  form.dataset.module = m.id;
  form.onsubmit = (ev) => { ev.preventDefault(); launch(m); };
}

function formValues(m) {
  const out = {};
  for (const p of m.parameters || []) {
    const input = document.getElementById(`param-${p.name}`);
    if (!input) continue;
    if (p.type === "boolean") { out[p.name] = input.checked; continue; }
    const raw = input.value;
    if (raw === "") continue; // the default applies, or the server says it is required
    if (p.type === "integer" || p.type === "number") {
      const n = Number(raw);
      out[p.name] = raw.trim() !== "" && Number.isFinite(n) ? n : raw;
    } else {
      out[p.name] = raw;
    }
  }
  return out;
}

async function launch(m) {
  for (const e of document.querySelectorAll("#launch-form .error")) e.textContent = "";
  for (const f of document.querySelectorAll("#launch-form .field")) f.classList.remove("invalid");
  $("launch").disabled = true;
  try {
    const res = await api("POST", "/runs", { module_id: m.id, parameters: formValues(m) });
    location.hash = `#/runs/${res.body.id}`;
  } catch (e) {
    const errors = (e.problem && e.problem.errors) || [];
    let placed = false;
    for (const fe of errors) {
      const name = String(fe.field || "").replace(/^parameters\./, "");
      const slot = document.querySelector(`#launch-form [data-error-for="${CSS.escape(name)}"]`);
      if (slot) {
        slot.textContent = fe.message;
        slot.parentElement.classList.add("invalid");
        placed = true;
      }
    }
    if (!placed || errors.length === 0) $("launch-error").textContent = problemText(e);
  } finally {
    $("launch").disabled = false;
  }
}

// ---- runs table, live ----------------------------------------------------------------------

function runRow(run) {
  const tr = el("tr", { "data-run": run.id });
  fillRow(tr, run);
  return tr;
}

function fillRow(tr, run) {
  if (FINAL.has(tr.dataset.status || "") && !FINAL.has(run.status)) return;
  tr.dataset.status = run.status;
  tr.replaceChildren(
    el("td", {}, el("span", { class: `badge ${run.status}`, text: run.status })),
    el("td", { text: run.module_id }),
    el("td", {}, el("a", { href: `#/runs/${run.id}` }, el("code", { text: run.id.slice(0, 8) + "…" }))),
    el("td", {}, timeCell(run.created_at)),
    el("td", { text: duration(run) }),
    el("td", { text: exitText(run) }),
    el("td", { text: run.created_by || "" }),
  );
}

function filters() {
  return { module: $("filter-module").value, status: $("filter-status").value };
}

async function loadRuns() {
  const f = filters();
  const q = new URLSearchParams({ limit: String(PAGE) });
  if (f.module) q.set("module_id", f.module);
  if (f.status) q.set("status", f.status);
  const cursor = state.runsCursor[state.runsCursor.length - 1];
  if (cursor) q.set("cursor", cursor);
  const page = (await api("GET", `/runs?${q}`)).body;
  state.runsNext = page.next_cursor;
  state.runsRows = new Map();
  const body = $("runs-body");
  body.replaceChildren();
  for (const run of page.runs) {
    const tr = runRow(run);
    state.runsRows.set(run.id, tr);
    body.append(tr);
  }
  $("page-older").disabled = !state.runsNext;
  $("page-newest").disabled = state.runsCursor.length === 0;
}

async function showRuns() {
  show("runs");
  if (state.modules.length === 0) await loadModules().catch(() => {});
  await loadRuns();
}

$("filter-module").addEventListener("change", () => { state.runsCursor = []; loadRuns().catch((e) => notice(problemText(e))); });
$("filter-status").addEventListener("change", () => { state.runsCursor = []; loadRuns().catch((e) => notice(problemText(e))); });
$("page-older").addEventListener("click", () => {
  if (!state.runsNext) return;
  state.runsCursor.push(state.runsNext);
  loadRuns().catch((e) => notice(problemText(e)));
});
$("page-newest").addEventListener("click", () => { state.runsCursor = []; loadRuns().catch((e) => notice(problemText(e))); });

/// A run changed (an event of /events): its row changes in place; a new run that fits the
/// filters comes on top of the first page.
function runChanged(run) {
  const tr = state.runsRows.get(run.id);
  if (tr) return fillRow(tr, run);
  const f = filters();
  if (state.runsCursor.length > 0) return;
  if (f.module && f.module !== run.module_id) return;
  if (f.status && f.status !== run.status) return;
  const row = runRow(run);
  state.runsRows.set(run.id, row);
  $("runs-body").prepend(row);
  while ($("runs-body").children.length > PAGE) {
    const last = $("runs-body").lastElementChild;
    state.runsRows.delete(last.dataset.run);
    last.remove();
  }
}

function openFeed() {
  if (state.feed || !can("runs:read")) return;
  const feed = new EventSource("/events");
  state.feed = feed;
  feed.addEventListener("open", () => { $("live-state").textContent = "live"; });
  feed.addEventListener("error", () => { $("live-state").textContent = "reconnecting…"; });
  const reload = () => { if (!$("view-runs").hidden) loadRuns().catch(() => {}); };
  feed.addEventListener("ready", reload);
  feed.addEventListener("reset", reload);
  feed.addEventListener("run", (ev) => {
    const run = JSON.parse(ev.data);
    runChanged(run);
    if (state.runView && state.runView.id === run.id) showFacts(run);
  });
}

// ---- one run: facts, live log, actions -----------------------------------------------------

function closeRunView() {
  if (state.runView && state.runView.source) state.runView.source.close();
  state.runView = null;
}

function showFacts(run) {
  const v = state.runView;
  if (!v || v.id !== run.id) return;
  // Answers can cross (a DELETE's answer after the stream's end): an end is never undone.
  if (v.run && FINAL.has(v.run.status) && !FINAL.has(run.status)) return;
  v.run = run;
  $("run-module").textContent = run.module_name || run.module_id;
  const badge = $("run-status");
  badge.textContent = run.cancel_requested_at && !FINAL.has(run.status) ? `${run.status} (cancelling)` : run.status;
  badge.className = `badge ${run.status}`;
  const facts = [
    ["Run", run.id],
    ["Created", run.created_at ? new Date(run.created_at).toLocaleString() : ""],
    ["Started by", run.created_by || "anonymous"],
    ["Duration", duration(run)],
    ["Exit", exitText(run)],
  ];
  if (run.error) facts.push(["Why", run.error]);
  if (run.cancelled_by) facts.push(["Cancelled by", run.cancelled_by]);
  $("run-facts").replaceChildren(...facts.flatMap(([k, val]) => [el("dt", { text: k }), el("dd", { text: val, "data-fact": k })]));
  $("run-cancel").hidden = !can("runs:cancel") || FINAL.has(run.status);
  $("run-again").hidden = !can("runs:create") || !can("modules:read");
  const params = Object.entries(run.parameters || {});
  $("run-params").replaceChildren(...params.map(([k, val]) =>
    el("tr", {}, el("th", { text: k }), el("td", { text: typeof val === "string" ? val : JSON.stringify(val) }))));
}

// ANSI SGR colours as classes; every other escape sequence is dropped. Text stays text.
const ANSI = /\x1b\[([0-9;]*)m|\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\x1b./g;

function ansiSpans(text, style) {
  const out = [];
  let last = 0;
  const push = (s) => {
    if (!s) return;
    const cls = [];
    if (style.bold) cls.push("ansi-bold");
    if (style.fg !== null) cls.push(`ansi-fg-${style.fg}`);
    out.push(cls.length ? el("span", { class: cls.join(" "), text: s }) : document.createTextNode(s));
  };
  for (const m of text.matchAll(ANSI)) {
    push(text.slice(last, m.index));
    last = m.index + m[0].length;
    if (m[1] === undefined) continue;
    const codes = m[1] === "" ? [0] : m[1].split(";").map(Number);
    for (const c of codes) {
      if (c === 0) { style.bold = false; style.fg = null; }
      else if (c === 1) style.bold = true;
      else if (c === 22) style.bold = false;
      else if (c >= 30 && c <= 37) style.fg = c - 30;
      else if (c >= 90 && c <= 97) style.fg = c - 90;
      else if (c === 39) style.fg = null;
    }
  }
  push(text.slice(last));
  return out;
}

const LOG_KEEP = 10000;

function appendLines(lines) {
  const v = state.runView;
  const log = $("log");
  const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 30;
  const frag = document.createDocumentFragment();
  for (const l of lines) {
    const style = v.styles[l.stream] || (v.styles[l.stream] = { bold: false, fg: null });
    const div = el("div", { class: `line ${l.stream}`, "data-seq": String(l.seq) }, ...ansiSpans(l.line, style));
    frag.append(div);
  }
  log.append(frag);
  while (log.childElementCount > LOG_KEEP) {
    log.firstElementChild.remove();
    if (!v.trimmed) {
      v.trimmed = true;
      log.prepend(el("div", { class: "line note", text: "[earlier lines are not shown here: download the output]" }));
    }
  }
  if (atEnd || v.follow) {
    log.scrollTop = log.scrollHeight;
    v.follow = false;
  } else {
    $("log-follow").hidden = false;
  }
}

$("log").addEventListener("scroll", () => {
  const log = $("log");
  if (log.scrollTop + log.clientHeight >= log.scrollHeight - 30) $("log-follow").hidden = true;
});
$("log-follow").addEventListener("click", () => {
  const log = $("log");
  log.scrollTop = log.scrollHeight;
  $("log-follow").hidden = true;
});

async function showRun(id) {
  show("run");
  closeRunView();
  const run = (await api("GET", `/runs/${encodeURIComponent(id)}`)).body;
  const v = { id, run, source: null, lastSeq: 0, styles: {}, follow: true, trimmed: false };
  state.runView = v;
  $("log").replaceChildren();
  $("log-follow").hidden = true;
  showFacts(run);
  $("log-state").textContent = "connecting…";
  // The browser reconnects a dropped stream by itself, sending the last line's id
  // (Last-Event-ID): the server goes on after it. A line seen before is dropped here too.
  const source = new EventSource(`/runs/${encodeURIComponent(id)}/stream`);
  v.source = source;
  let batch = [];
  let scheduled = false;
  const flush = () => {
    scheduled = false;
    if (state.runView !== v || batch.length === 0) return;
    const lines = batch;
    batch = [];
    appendLines(lines);
  };
  const onLine = (ev) => {
    const l = JSON.parse(ev.data);
    if (l.seq <= v.lastSeq) return;
    v.lastSeq = l.seq;
    batch.push(l);
    if (!scheduled) { scheduled = true; requestAnimationFrame(flush); setTimeout(flush, 100); }
  };
  source.addEventListener("stdout", onLine);
  source.addEventListener("stderr", onLine);
  source.addEventListener("open", () => { $("log-state").textContent = "live"; });
  source.addEventListener("error", () => {
    if (state.runView === v && source.readyState !== EventSource.CLOSED) $("log-state").textContent = "reconnecting…";
  });
  source.addEventListener("status", (ev) => showFacts(JSON.parse(ev.data)));
  source.addEventListener("end", (ev) => {
    const end = JSON.parse(ev.data);
    if (!FINAL.has(end.status)) return; // the server is stopping: the browser reconnects
    flush();
    source.close();
    showFacts(end);
    $("log-state").textContent = `ended: ${end.status}`;
  });
}

$("run-cancel").addEventListener("click", async () => {
  const v = state.runView;
  if (!v) return;
  $("run-cancel").disabled = true;
  try {
    const res = await api("DELETE", `/runs/${encodeURIComponent(v.id)}`);
    showFacts(res.body);
  } catch (e) {
    notice(problemText(e));
  } finally {
    $("run-cancel").disabled = false;
  }
});

$("run-again").addEventListener("click", () => {
  const v = state.runView;
  if (v) location.hash = `#/modules/${encodeURIComponent(v.run.module_id)}?again=${encodeURIComponent(v.id)}`;
});

$("run-download").addEventListener("click", async () => {
  const v = state.runView;
  if (!v) return;
  const res = await fetch(`/runs/${encodeURIComponent(v.id)}/output`, {
    headers: { accept: "text/plain" },
    credentials: "same-origin",
  });
  if (!res.ok) return notice(`cannot download: ${res.status}`);
  const url = URL.createObjectURL(await res.blob());
  const a = el("a", { href: url, download: `${v.run.module_id}-${v.id}.log` });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
});

// ---- start ---------------------------------------------------------------------------------

async function start() {
  try {
    await loadSession();
  } catch (e) {
    notice(`cannot reach the server: ${problemText(e)}`);
    return;
  }
  if (state.session.needs_token) {
    if (state.feed) state.feed.close();
    state.feed = null;
    return show("signin");
  }
  openFeed();
  await route();
}

start();
