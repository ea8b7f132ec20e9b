// trioworker dashboard: an ES module (with dom.js), no build step, no dependencies.
//
// Everything shown is read from the REST API (/api/...) and kept current by the live feed
// (the /api/events websocket): the server pushes the overview and the runs that changed;
// this page never polls. Text from the server is always set as text, never as HTML.

import { h } from "./dom.js";

const STATES = ["SCHEDULED", "PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLED", "CRASHED"];
const ENDED = ["COMPLETED", "FAILED", "CANCELLED", "CRASHED"];
const LABEL = {
  SCHEDULED: "Scheduled", PENDING: "Pending", RUNNING: "Running", COMPLETED: "Completed",
  FAILED: "Failed", CANCELLED: "Cancelled", CRASHED: "Crashed",
};
const STORE_NAMES = { sqlite: "SQLite", postgresql: "PostgreSQL" };
const PAGE_SIZE = 50;
// Children a run page shows at first, and adds per "Show more".
const CHILD_PAGE = 200;
// The most runs one list request returns (the server's limit).
const CHILD_REQUEST = 1000;
const KEY_STORAGE = "trioworker.apiKey";
// A view refetches what it shows at most this often when the feed says it changed.
const REFETCH_MS = 1000;

const app = {
  key: sessionStorage.getItem(KEY_STORAGE),
  overview: null,
  clockOffset: 0, // server time minus this machine's time, in ms
  view: null,
  socket: null,
  reconnectDelay: 1000,
  reconnectTimer: null,
  feedWasDown: false, // set when the live feed drops: on reconnecting, the view reloads
  signedOut: false,
};

// ---------------------------------------------------------------- small helpers

// Replaces the children of `el`, leaving out null, undefined and false.
function fill(el, ...children) {
  el.replaceChildren(...children.flat().filter((child) => child !== null && child !== undefined && child !== false));
}

const SVG = "http://www.w3.org/2000/svg";
function s(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) el.setAttribute(name, String(value));
  for (const child of children) el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return el;
}

const pad = (n) => String(n).padStart(2, "0");
const num = (n) => Number(n).toLocaleString("en-US");
const serverNow = () => Date.now() + app.clockOffset;

function formatTime(iso) {
  if (!iso) return "—";
  const d = new Date(iso);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

function formatDuration(ms) {
  if (ms === null || ms === undefined || !Number.isFinite(ms)) return "—";
  if (ms < 0) ms = 0;
  if (ms < 1000) return `${Math.round(ms)} ms`;
  const sec = ms / 1000;
  if (sec < 60) return `${sec < 10 ? sec.toFixed(1) : Math.round(sec)} s`;
  const min = Math.floor(sec / 60);
  if (min < 60) return `${min} min ${Math.round(sec % 60)} s`;
  const hours = Math.floor(min / 60);
  if (hours < 48) return `${hours} h ${min % 60} min`;
  return `${Math.floor(hours / 24)} d ${hours % 24} h`;
}

function ago(iso) {
  if (!iso) return "—";
  const ms = serverNow() - Date.parse(iso);
  if (ms < 5000) return "just now";
  return `${formatDuration(ms).replace(/ \d+ (s|min|h)$/, "")} ago`;
}

// An element whose text is "N ago" (or an age), kept current by the ticker below.
function since(iso, { suffix = true } = {}) {
  const el = h("time", { datetime: iso, title: formatTime(iso), "data-since": iso, "data-suffix": suffix ? "1" : "" });
  el.textContent = suffix ? ago(iso) : formatDuration(serverNow() - Date.parse(iso));
  return el;
}

function tick() {
  for (const el of document.querySelectorAll("[data-since]")) {
    const iso = el.getAttribute("data-since");
    el.textContent = el.getAttribute("data-suffix") ? ago(iso) : formatDuration(serverNow() - Date.parse(iso));
  }
  app.view?.tick?.();
}

function badge(state, name, big = false) {
  const type = state || "PENDING";
  return h("span", { class: `badge s-${type}${big ? " big" : ""}`, "data-state": type }, name || LABEL[type] || type);
}

function shortId(id) {
  return id.slice(0, 8);
}

// A server as a short name: the first 8 hex digits of its id (its URL in the tooltip).
function serverName(server, id) {
  return h("span", { class: "server-id", title: server?.url || id }, shortId(id));
}

function runLink(run) {
  return h("a", { href: `#/runs/${encodeURIComponent(run.id)}` }, run.name || shortId(run.id));
}

function runsHref(params) {
  const query = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v) query.set(k, v);
  const text = query.toString();
  return `#/runs${text ? `?${text}` : ""}`;
}

function json(value) {
  return JSON.stringify(value, null, 2);
}

function toast(message, bad = false) {
  const el = h("div", { class: `toast${bad ? " bad" : ""}` }, message);
  document.getElementById("toasts").append(el);
  setTimeout(() => el.remove(), 4000);
}

// Calls fn at most once per `ms`, and once more after the last call in a burst.
function throttled(fn, ms) {
  let last = 0;
  let timer = null;
  const run = () => {
    timer = null;
    last = Date.now();
    fn();
  };
  const call = () => {
    if (timer) return;
    const wait = last + ms - Date.now();
    if (wait <= 0) run();
    else timer = setTimeout(run, wait);
  };
  call.cancel = () => clearTimeout(timer);
  return call;
}

// ---------------------------------------------------------------- the API

class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

async function api(path, { method = "GET" } = {}) {
  const headers = { Accept: "application/json" };
  if (app.key) headers.Authorization = `Bearer ${app.key}`;
  const response = await fetch(`/api${path}`, { method, headers });
  if (response.status === 401) {
    showLogin(app.key ? "That key was refused." : null);
    throw new ApiError(401, "the server asks for its API key");
  }
  if (!response.ok) {
    let detail = response.statusText;
    try {
      detail = (await response.json()).detail || detail;
    } catch {
      // not JSON: keep the status text
    }
    throw new ApiError(response.status, detail);
  }
  return response.status === 204 ? null : response.json();
}

// ---------------------------------------------------------------- login

function showLogin(message) {
  app.signedOut = true;
  document.body.dataset.locked = "";
  closeLive();
  fill(document.getElementById("view"), );
  document.getElementById("login").hidden = false;
  const error = document.getElementById("login-error");
  error.hidden = !message;
  error.textContent = message || "";
  setLive("offline", "Locked");
  document.getElementById("api-key").focus();
}

async function signIn(event) {
  event.preventDefault();
  const input = document.getElementById("api-key");
  app.key = input.value.trim();
  try {
    app.overview = await api("/overview");
  } catch (error) {
    if (!(error instanceof ApiError && error.status === 401)) showLogin(`The server did not answer: ${error.message}`);
    return;
  }
  sessionStorage.setItem(KEY_STORAGE, app.key);
  input.value = "";
  start();
}

function signOut() {
  sessionStorage.removeItem(KEY_STORAGE);
  app.key = null;
  app.overview = null;
  showLogin(null);
}

// ---------------------------------------------------------------- the live feed

function setLive(state, label) {
  const el = document.getElementById("live");
  el.dataset.state = state;
  el.querySelector(".label").textContent = label;
}

function closeLive() {
  clearTimeout(app.reconnectTimer);
  if (app.socket) {
    app.socket.onclose = null;
    app.socket.close();
    app.socket = null;
  }
}

function connectLive() {
  closeLive();
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const socket = new WebSocket(`${scheme}://${location.host}/api/events`);
  app.socket = socket;
  setLive("connecting", "Connecting");
  socket.onopen = () => socket.send(JSON.stringify({ type: "auth", token: app.key || null }));
  socket.onmessage = (event) => {
    const message = JSON.parse(event.data);
    if (message.type === "auth_success") {
      setLive("live", "Live");
      app.reconnectDelay = 1000;
      // What changed while the feed was down; at page load the view is loading already
      // (its one request), so a first connection asks for nothing more.
      if (app.feedWasDown) app.view?.refresh?.();
      app.feedWasDown = false;
    } else if (message.type === "overview") {
      app.overview = message.overview;
      app.clockOffset = Date.parse(message.server_time) - Date.now();
      app.view?.onOverview?.();
    } else if (message.type === "runs") {
      app.view?.onRuns?.(message.runs);
    } else if (message.type === "schedules") {
      app.view?.onSchedules?.();
    } else if (message.type === "resync") {
      app.view?.refresh?.();
    }
  };
  socket.onclose = (event) => {
    app.socket = null;
    if (event.code === 1008) {
      showLogin(app.key ? "That key was refused." : null);
      return;
    }
    app.feedWasDown = true;
    setLive("offline", "Reconnecting");
    app.reconnectTimer = setTimeout(connectLive, app.reconnectDelay);
    app.reconnectDelay = Math.min(app.reconnectDelay * 2, 15000);
  };
}

// ---------------------------------------------------------------- overview

function totals(overview) {
  const byState = Object.fromEntries(STATES.map((st) => [st, 0]));
  for (const key of overview.task_keys) for (const [st, n] of Object.entries(key.counts)) byState[st] += n;
  return byState;
}

// The last 60 minutes as slots (oldest first): {start (ms), counts: {STATE: n}}.
function minuteSlots(ended, taskKey = null) {
  const now = serverNow();
  const current = Math.floor(now / 60000) * 60000;
  const slots = [];
  for (let i = 59; i >= 0; i--) slots.push({ start: current - i * 60000, counts: {} });
  const first = slots[0].start;
  for (const row of ended) {
    if (taskKey !== null && row.task_key !== taskKey) continue;
    const index = Math.round((Date.parse(row.minute) - first) / 60000);
    if (index < 0 || index >= slots.length) continue;
    const counts = slots[index].counts;
    counts[row.state_type] = (counts[row.state_type] || 0) + row.count;
  }
  return slots;
}

function niceMax(value) {
  if (value <= 4) return 4;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 2.5, 5, 10]) if (step * power >= value) return step * power;
  return 10 * power;
}

function endedChart(ended, width) {
  const slots = minuteSlots(ended);
  const height = 220;
  const left = 44;
  const right = 8;
  const top = 10;
  const bottom = 26;
  const plotW = Math.max(width - left - right, 60);
  const plotH = height - top - bottom;
  const peak = Math.max(0, ...slots.map((slot) => ENDED.reduce((sum, st) => sum + (slot.counts[st] || 0), 0)));
  const max = niceMax(peak);
  const svg = s("svg", { class: "chart", viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "Runs ended per minute over the last hour" });
  for (const fraction of [0, 0.5, 1]) {
    const y = top + plotH - fraction * plotH;
    svg.append(s("line", { class: "grid", x1: left, x2: left + plotW, y1: y, y2: y }));
    svg.append(s("text", { class: "axis", x: left - 8, y: y + 4, "text-anchor": "end" }, num(Math.round(max * fraction))));
  }
  const slotW = plotW / slots.length;
  const barW = Math.max(slotW - 2, 1);
  slots.forEach((slot, i) => {
    const x = left + i * slotW + (slotW - barW) / 2;
    let y = top + plotH;
    const group = s("g");
    const parts = [];
    for (const st of ENDED) {
      const n = slot.counts[st] || 0;
      if (!n) continue;
      const barH = (n / max) * plotH;
      y -= barH;
      group.append(s("rect", { class: `bar-${st}`, x, y, width: barW, height: Math.max(barH, 1) }));
      parts.push(`${num(n)} ${LABEL[st].toLowerCase()}`);
    }
    const d = new Date(slot.start - app.clockOffset);
    group.append(s("title", {}, `${pad(d.getHours())}:${pad(d.getMinutes())} — ${parts.length ? parts.join(", ") : "none ended"}`));
    svg.append(group);
    if (i % 10 === 0 || i === slots.length - 1) {
      const label = i === slots.length - 1 ? "now" : `${pad(d.getHours())}:${pad(d.getMinutes())}`;
      svg.append(s("text", { class: "axis", x: left + i * slotW + slotW / 2, y: height - 8, "text-anchor": "middle" }, label));
    }
  });
  return svg;
}

function sparkline(ended, taskKey) {
  const slots = minuteSlots(ended, taskKey);
  const width = 120;
  const height = 24;
  const peak = Math.max(1, ...slots.map((slot) => ENDED.reduce((sum, st) => sum + (slot.counts[st] || 0), 0)));
  const svg = s("svg", { class: "spark", viewBox: `0 0 ${width} ${height}`, "aria-hidden": "true" });
  const slotW = width / slots.length;
  slots.forEach((slot, i) => {
    const good = (slot.counts.COMPLETED || 0) + (slot.counts.CANCELLED || 0);
    const bad = (slot.counts.FAILED || 0) + (slot.counts.CRASHED || 0);
    const goodH = (good / peak) * height;
    const badH = (bad / peak) * height;
    if (good) svg.append(s("rect", { x: i * slotW, y: height - goodH - badH, width: Math.max(slotW - 0.5, 0.5), height: goodH }));
    if (bad) svg.append(s("rect", { class: "bad", x: i * slotW, y: height - badH, width: Math.max(slotW - 0.5, 0.5), height: badH }));
  });
  return svg;
}

function endedInHour(ended, states) {
  const first = minuteSlots([])[0].start;
  return ended.filter((row) => states.includes(row.state_type) && Date.parse(row.minute) >= first).reduce((sum, row) => sum + row.count, 0);
}

function stat(name, value, accent = "") {
  return h("div", { class: `stat${accent ? ` accent-${accent}` : ""}` }, h("div", { class: "value" }, value), h("div", { class: "name" }, name));
}

// ---------------------------------------------------------------- schedules (periodic runs)

// When a schedule fires: "in 4 min 10 s" (or "due" once its time came).
function until(iso) {
  const ms = Date.parse(iso) - serverNow();
  return ms <= 0 ? "due" : `in ${formatDuration(ms)}`;
}

function scheduleWhen(schedule) {
  if (schedule.cron !== null) return schedule.timezone === "UTC" ? schedule.cron : `${schedule.cron} (${schedule.timezone})`;
  return `every ${formatDuration(schedule.interval * 1000)}`;
}

function schedulesCard(schedules) {
  const rows = schedules.map((schedule) => h("tr", { "data-schedule": schedule.name },
    h("td", {}, schedule.name),
    h("td", {}, h("a", { href: runsHref({ task_key: schedule.task_key }) }, schedule.task_key)),
    h("td", { class: "mono" }, scheduleWhen(schedule)),
    h("td", { class: "next-fire" }, h("time", { datetime: schedule.next_fire_time, title: formatTime(schedule.next_fire_time) },
      until(schedule.next_fire_time)), h("span", { class: "sub" }, formatTime(schedule.next_fire_time))),
    h("td", {}, schedule.last_run_id
      ? h("a", { href: `#/runs/${encodeURIComponent(schedule.last_run_id)}`, title: "the run of the last tick" }, formatTime(schedule.last_fire_time))
      : h("span", { class: "muted" }, "—")),
  ));
  return h("section", { class: "card", id: "schedules" },
    h("header", {}, h("h2", {}, "Schedules"), h("span", { class: "muted" }, "periodic runs: the server creates one run at each tick")),
    rows.length
      ? h("div", { class: "table-wrap" }, h("table", {},
        h("thead", {}, h("tr", {}, h("th", {}, "Name"), h("th", {}, "Task key"), h("th", {}, "When"), h("th", {}, "Next run"), h("th", {}, "Last run"))),
        h("tbody", {}, rows)))
      : h("div", { class: "empty" }, "No schedule. Add one with @task(schedule=...), or: trioworker schedule add MODULE:TASK --cron EXPR"),
  );
}

class OverviewView {
  constructor() {
    this.schedules = [];
    // Read again when the feed says schedules changed (created, deleted, or a tick fired).
    this.loadSchedules = throttled(() => api("/schedules").then((schedules) => {
      this.schedules = schedules;
      this.render();
    }, () => {}), REFETCH_MS);
    this.chartMinute = null;
    this.onResize = throttled(() => this.render(), 200);
    window.addEventListener("resize", this.onResize);
  }

  async show() {
    if (!app.overview) app.overview = await api("/overview");
    this.schedules = await api("/schedules");
    this.render();
  }

  refresh() {
    api("/overview").then((overview) => {
      app.overview = overview;
      this.render();
    }, () => {});
    this.loadSchedules();
  }

  onOverview() {
    this.render();
  }

  onSchedules() {
    this.loadSchedules();
  }

  tick() {
    const minute = Math.floor(serverNow() / 60000);
    if (minute !== this.chartMinute) this.render(); // the chart's hour moved on
    for (const el of document.querySelectorAll("#schedules .next-fire time")) el.textContent = until(el.getAttribute("datetime"));
  }

  dispose() {
    window.removeEventListener("resize", this.onResize);
    this.onResize.cancel();
    this.loadSchedules.cancel();
  }

  render() {
    const overview = app.overview;
    if (!overview) return;
    this.chartMinute = Math.floor(serverNow() / 60000);
    const view = document.getElementById("view");
    const byState = totals(overview);
    const all = Object.values(byState).reduce((a, b) => a + b, 0);

    const stats = h("div", { class: "stats", id: "stats" },
      stat("Waiting", num(byState.SCHEDULED), "scheduled"),
      stat("In flight", num(byState.PENDING + byState.RUNNING), "running"),
      stat("Completed · last hour", num(endedInHour(overview.ended, ["COMPLETED"])), "completed"),
      stat("Failed · last hour", num(endedInHour(overview.ended, ["FAILED", "CRASHED"])), "failed"),
      stat("Workers", num(overview.workers.length)),
      stat("Runs stored", num(all)),
    );

    const width = Math.max((view.clientWidth || 1000) - 34, 280);
    const chart = h("section", { class: "card", id: "chart" },
      h("header", {}, h("h2", {}, "Runs ended per minute"), h("span", { class: "muted" }, "last hour, all task keys"),
        h("div", { class: "legend" }, ENDED.map((st) => h("span", {}, h("i", { class: st }), LABEL[st])))),
      h("div", { class: "body" }, endedChart(overview.ended, width)),
    );

    const keyRows = overview.task_keys.map((key) => h("tr", { "data-task-key": key.task_key },
      h("td", {}, h("a", { href: runsHref({ task_key: key.task_key }) }, key.task_key)),
      STATES.map((st) => {
        const n = key.counts[st] || 0;
        return h("td", { class: `num${n ? "" : " zero"}` },
          n ? h("a", { class: `count c-${st}`, href: runsHref({ task_key: key.task_key, state: st }), title: `${LABEL[st]} runs of ${key.task_key}` }, num(n)) : "0");
      }),
      h("td", {}, key.oldest_waiting
        ? h("a", { href: `#/runs/${encodeURIComponent(key.oldest_waiting.id)}`, title: `${key.oldest_waiting.name}, waiting since ${formatTime(key.oldest_waiting.since)}` },
          since(key.oldest_waiting.since, { suffix: false }))
        : h("span", { class: "muted" }, "—")),
      h("td", { class: `num${key.workers ? "" : " zero"}` }, num(key.workers)),
      h("td", { class: "hide-narrow" }, sparkline(overview.ended, key.task_key)),
    ));
    const keys = h("section", { class: "card", id: "task-keys" },
      h("header", {}, h("h2", {}, "Task keys"), h("span", { class: "muted" }, "runs by state; the oldest waiting run is the one first in line")),
      keyRows.length
        ? h("div", { class: "table-wrap" }, h("table", {},
          h("thead", {}, h("tr", {}, h("th", {}, "Task key"), STATES.map((st) => h("th", { class: "num" }, LABEL[st])),
            h("th", {}, "Oldest waiting"), h("th", { class: "num" }, "Workers"), h("th", { class: "hide-narrow" }, "Ended, last hour"))),
          h("tbody", {}, keyRows)))
        : h("div", { class: "empty" }, "No runs yet. Submit one, or start a worker: its task keys appear here."),
    );

    // Several servers on one database: each worker shows the server it is connected to.
    const several = overview.servers.length > 1;
    const serverOf = new Map(overview.servers.map((server) => [server.id, server]));
    const workerRows = overview.workers.map((worker) => h("tr", { "data-client-id": worker.client_id, "data-server-id": worker.server },
      h("td", { class: "mono" }, worker.client_id),
      h("td", { class: "wrap" }, h("div", { class: "keys" }, worker.task_keys.map((key) => h("span", { class: "chip" }, key)))),
      h("td", { class: "num" }, num(worker.limit)),
      h("td", {},
        h("span", { class: "meter", title: `${worker.runs_in_flight} of ${worker.limit}` },
          h("span")),
        num(worker.runs_in_flight)),
      h("td", {}, since(worker.connected_since), h("span", { class: "sub" }, formatTime(worker.connected_since))),
      several ? h("td", { class: "mono server" }, serverName(serverOf.get(worker.server), worker.server)) : null,
    ));
    // widths set as properties: the page's policy allows no inline style attributes
    workerRows.forEach((row, i) => {
      const worker = overview.workers[i];
      const fill = row.querySelector(".meter > span");
      fill.style.width = `${Math.min(100, (100 * worker.runs_in_flight) / Math.max(worker.limit, 1))}%`;
    });
    const connected = several
      ? `${overview.workers.length} connected to ${overview.servers.length} servers; runs in flight on the others as of their last heartbeat`
      : `${overview.workers.length} connected`;
    const workers = h("section", { class: "card", id: "workers" },
      h("header", {}, h("h2", {}, "Connected workers"), h("span", { class: "muted" }, connected)),
      workerRows.length
        ? h("div", { class: "table-wrap" }, h("table", {},
          h("thead", {}, h("tr", {}, h("th", {}, "Client id"), h("th", {}, "Task keys"), h("th", { class: "num" }, "Limit"), h("th", {}, "Runs in flight"), h("th", {}, "Connected"),
            several ? h("th", {}, "Server") : null)),
          h("tbody", {}, workerRows)))
        : h("div", { class: "empty" }, "No worker is connected. Start one with: trioworker worker MODULE:TASK"),
    );

    const servers = h("section", { class: "card", id: "servers" },
      h("header", {}, h("h2", {}, "Servers"), h("span", { class: "muted" }, several
        ? `${overview.servers.length} servers share one database; any of them answers`
        : "the server that answers")),
      h("div", { class: "table-wrap" }, h("table", {},
        h("thead", {}, h("tr", {}, h("th", {}, "Server"), h("th", {}, "Version"), h("th", {}, "Store"), h("th", {}, "Started"),
          h("th", {}, "Last heartbeat"), h("th", { class: "num" }, "Workers"))),
        h("tbody", {}, overview.servers.map((server) => h("tr", { "data-server-id": server.id },
          h("td", { class: "mono" }, serverName(server, server.id),
            server.answering ? h("span", { class: "chip this" }, "this one") : null,
            h("span", { class: "sub" }, server.url || "")),
          h("td", { class: "mono" }, server.version), h("td", {}, STORE_NAMES[server.store] || server.store),
          h("td", {}, since(server.started), h("span", { class: "sub" }, formatTime(server.started))),
          h("td", {}, server.heartbeat ? since(server.heartbeat) : h("span", { class: "muted", title: "a server alone on its database sends none" }, "—")),
          h("td", { class: "num" }, num(server.workers))))))),
    );

    fill(view, 
      h("div", { class: "page-head" }, h("div", { class: "grow" }, h("h1", {}, "Overview"),
        h("div", { class: "subtitle" }, `As of ${formatTime(overview.now)}`))),
      stats, chart, keys, workers, schedulesCard(this.schedules), servers,
    );
  }
}

// ---------------------------------------------------------------- runs

function matches(note, filters) {
  if (filters.task_key && note.task_key && note.task_key !== filters.task_key) return false;
  if (filters.state && note.state_type && note.state_type !== filters.state) return false;
  return true;
}

class RunsView {
  constructor(params) {
    this.filters = { task_key: params.get("task_key") || "", state: params.get("state") || "" };
    this.page = Math.max(0, Number.parseInt(params.get("page") || "0", 10) || 0);
    this.runs = [];
    this.refetch = throttled(() => this.load(), REFETCH_MS);
  }

  async show() {
    this.renderShell();
    await this.load();
  }

  refresh() {
    this.refetch();
  }

  dispose() {
    this.refetch.cancel();
  }

  total() {
    if (!app.overview) return null;
    let total = 0;
    for (const key of app.overview.task_keys) {
      if (this.filters.task_key && key.task_key !== this.filters.task_key) continue;
      for (const [st, n] of Object.entries(key.counts)) if (!this.filters.state || st === this.filters.state) total += n;
    }
    return total;
  }

  onOverview() {
    this.renderKeys();
    this.renderPager();
  }

  onRuns(notes) {
    const shown = new Map(this.runs.map((run) => [run.id, run]));
    let stale = false;
    for (const note of notes) {
      const row = document.querySelector(`#runs-table tr[data-run-id="${CSS.escape(note.id)}"]`);
      if (row && shown.has(note.id)) {
        if (note.deleted) {
          row.querySelector(".badge").replaceWith(badge("DELETED", "Deleted"));
        } else if (note.state_type) {
          row.querySelector(".badge").replaceWith(badge(note.state_type, note.state_name));
          if (note.timestamp) row.querySelector("td.updated").replaceChildren(since(note.timestamp));
          row.classList.remove("flash");
          void row.offsetWidth; // restart the animation
          row.classList.add("flash");
        } else {
          stale = true;
        }
        if (!note.deleted && note.state_type && !matches(note, this.filters)) stale = true;
      } else if (!note.deleted && this.page === 0 && matches(note, this.filters)) {
        stale = true; // a run that may now belong on this page
      }
    }
    if (stale) this.refetch();
  }

  url() {
    const query = new URLSearchParams({ sort: "CREATED_DESC", fields: "summary", limit: String(PAGE_SIZE), offset: String(this.page * PAGE_SIZE) });
    if (this.filters.task_key) query.set("task_key", this.filters.task_key);
    if (this.filters.state) query.set("state", this.filters.state);
    return `/task_runs?${query}`;
  }

  async load() {
    const runs = await api(this.url());
    if (app.view !== this) return;
    this.runs = runs;
    this.renderRows();
    this.renderPager();
  }

  go(changes) {
    const next = { ...this.filters, page: this.page, ...changes };
    location.hash = runsHref({ task_key: next.task_key, state: next.state, page: next.page ? String(next.page) : "" });
  }

  renderShell() {
    const keySelect = h("select", { id: "filter-key", "aria-label": "Task key", onchange: (e) => this.go({ task_key: e.target.value, page: 0 }) });
    const stateSelect = h("select", { id: "filter-state", "aria-label": "State", onchange: (e) => this.go({ state: e.target.value, page: 0 }) },
      h("option", { value: "" }, "All states"),
      STATES.map((st) => h("option", { value: st, selected: st === this.filters.state }, LABEL[st])));
    this.keySelect = keySelect;
    this.pager = h("div", { class: "pager", id: "pager" });
    const filtered = this.filters.task_key || this.filters.state;
    fill(document.getElementById("view"), 
      h("div", { class: "page-head" }, h("div", { class: "grow" }, h("h1", {}, "Runs"), h("div", { class: "subtitle" }, "Newest first; live"))),
      h("section", { class: "card" },
        h("div", { class: "filters" },
          h("label", {}, "Task key", keySelect),
          h("label", {}, "State", stateSelect),
          filtered ? h("a", { href: "#/runs", id: "clear-filters" }, "Clear filters") : null,
          this.pager),
        h("div", { class: "table-wrap", id: "runs-body" }, h("div", { class: "empty" }, "Loading…"))),
    );
    this.renderKeys();
  }

  renderKeys() {
    if (!this.keySelect) return;
    const keys = new Set((app.overview?.task_keys || []).map((key) => key.task_key));
    if (this.filters.task_key) keys.add(this.filters.task_key);
    const wanted = ["", ...[...keys].sort()];
    const have = [...this.keySelect.options].map((option) => option.value);
    if (wanted.join("\n") === have.join("\n")) return;
    this.keySelect.replaceChildren(...wanted.map((key) => h("option", { value: key, selected: key === this.filters.task_key }, key || "All task keys")));
  }

  renderPager() {
    if (!this.pager) return;
    const total = this.total();
    const from = this.runs.length ? this.page * PAGE_SIZE + 1 : 0;
    const to = this.page * PAGE_SIZE + this.runs.length;
    const text = this.runs.length ? `${num(from)}–${num(to)}${total !== null ? ` of ${num(Math.max(total, to))}` : ""}` : "No runs";
    const more = total !== null ? to < total : this.runs.length === PAGE_SIZE;
    this.pager.replaceChildren(
      h("span", { id: "page-range" }, text),
      h("button", { class: "btn", type: "button", disabled: this.page === 0, onclick: () => this.go({ page: this.page - 1 }) }, "Newer"),
      h("button", { class: "btn", type: "button", disabled: !more, onclick: () => this.go({ page: this.page + 1 }) }, "Older"),
    );
  }

  renderRows() {
    const body = document.getElementById("runs-body");
    if (!body) return;
    if (!this.runs.length) {
      body.replaceChildren(h("div", { class: "empty" }, this.filters.task_key || this.filters.state ? "No run matches these filters." : "No runs yet."));
      return;
    }
    body.replaceChildren(h("table", { id: "runs-table" },
      h("thead", {}, h("tr", {}, h("th", {}, "State"), h("th", {}, "Run"), h("th", {}, "Task key"),
        h("th", {}, "Created"), h("th", {}, "Last change"), h("th", { class: "num hide-narrow" }, "Attempts"))),
      h("tbody", {}, this.runs.map((run) => h("tr", { "data-run-id": run.id },
        h("td", {}, badge(run.state.type, run.state.name)),
        h("td", {}, runLink(run), h("span", { class: "sub mono" }, shortId(run.id))),
        h("td", {}, h("a", { href: runsHref({ task_key: run.task_key, state: this.filters.state }) }, run.task_key)),
        h("td", {}, since(run.created), h("span", { class: "sub" }, formatTime(run.created))),
        h("td", { class: "updated" }, since(run.state.timestamp)),
        h("td", { class: "num hide-narrow" }, num(run.run_count)),
      )))));
  }
}

// ---------------------------------------------------------------- one run

function fact(name, ...value) {
  return h("div", {}, h("dt", {}, name), h("dd", {}, ...value));
}

function firstOf(history, type) {
  return history.find((change) => change.type === type) || null;
}

class RunView {
  constructor(id) {
    this.id = id;
    this.run = null;
    this.childIds = new Set();
    // How many children the page shows; "Show more" adds CHILD_PAGE.
    this.childLimit = CHILD_PAGE;
    this.moreChildren = false;
    this.refetch = throttled(() => this.load(), REFETCH_MS);
  }

  // The first `this.childLimit` children, oldest first, and whether there are more (one more
  // is asked for), read in requests of at most CHILD_REQUEST (the list's own limit).
  async loadChildren() {
    const want = this.childLimit + 1;
    const children = [];
    while (children.length < want) {
      const limit = Math.min(CHILD_REQUEST, want - children.length);
      const page = await api(`/task_runs?parent_task_run_id=${encodeURIComponent(this.id)}&fields=summary&limit=${limit}&offset=${children.length}`);
      children.push(...page);
      if (page.length < limit) break;
    }
    this.moreChildren = children.length > this.childLimit;
    return children.slice(0, this.childLimit);
  }

  async show() {
    fill(document.getElementById("view"), h("div", { class: "empty" }, "Loading…"));
    await this.load();
  }

  refresh() {
    this.refetch();
  }

  dispose() {
    this.refetch.cancel();
  }

  onRuns(notes) {
    if (notes.some((note) => note.id === this.id || this.childIds.has(note.id) || note.parent_task_run_id === this.id)) {
      this.refetch(); // this run, or a child of it (perhaps a new one)
    }
  }

  async load() {
    let run;
    try {
      run = await api(`/task_runs/${encodeURIComponent(this.id)}`);
    } catch (error) {
      if (app.view !== this) return;
      if (error.status === 404) {
        fill(document.getElementById("view"), h("div", { class: "card narrow" }, h("h1", {}, "No such run"),
          h("p", { class: "muted" }, "It does not exist, or it was deleted."), h("a", { href: "#/runs" }, "All runs")));
        return;
      }
      throw error;
    }
    const [history, children] = await Promise.all([
      api(`/task_runs/${encodeURIComponent(this.id)}/history`),
      this.loadChildren(),
    ]);
    if (app.view !== this) return;
    this.run = run;
    this.childIds = new Set(children.map((child) => child.id));
    this.render(run, history, children);
  }

  async act(what) {
    const path = `/task_runs/${encodeURIComponent(this.id)}`;
    try {
      if (what === "cancel") {
        await api(`${path}/cancel`, { method: "POST" });
        toast("Cancelled.");
        this.refetch();
      } else if (what === "retry") {
        const run = await api(`${path}/retry`, { method: "POST" });
        toast("A new run with the same arguments was created.");
        location.hash = `#/runs/${encodeURIComponent(run.id)}`;
      } else if (what === "delete") {
        await api(path, { method: "DELETE" });
        toast("Deleted.");
        location.hash = runsHref({ task_key: this.run.task_key });
      }
    } catch (error) {
      if (error.status !== 401) toast(`Could not ${what}: ${error.message}`, true);
    }
  }

  actions(run) {
    const ended = ENDED.includes(run.state.type);
    // Delete asks again: while it waits for "Confirm delete", the run's other action
    // (cancel or retry) is hidden and "Keep" backs out, so backing out never cancels the run.
    const other = ended
      ? h("button", { class: "btn", type: "button", id: "retry-run", title: "Create a new run with the same arguments", onclick: () => this.act("retry") }, "Retry")
      : h("button", { class: "btn", type: "button", id: "cancel-run", onclick: () => this.act("cancel") }, "Cancel run");
    const keep = h("button", { class: "btn", type: "button", id: "keep-run", title: "Do not delete this run", hidden: true }, "Keep");
    const remove = h("button", { class: "btn danger", type: "button", id: "delete-run" }, "Delete");
    let armed = null;
    const disarm = () => {
      clearTimeout(armed);
      armed = null;
      remove.classList.remove("armed");
      remove.textContent = "Delete";
      keep.hidden = true;
      other.hidden = false;
    };
    keep.addEventListener("click", disarm);
    remove.addEventListener("click", () => {
      if (armed) {
        disarm();
        this.act("delete");
        return;
      }
      other.hidden = true;
      keep.hidden = false;
      remove.classList.add("armed");
      remove.textContent = "Confirm delete";
      armed = setTimeout(disarm, 4000);
    });
    return h("div", { class: "actions" }, other, keep, remove);
  }

  outcome(run) {
    const state = run.state;
    if (state.type === "COMPLETED") {
      const value = run.serializer === "pickle" && typeof state.data === "string"
        ? `(pickled, ${num(state.data.length)} characters of base64)` : json(state.data);
      return h("section", { class: "card", id: "result" }, h("header", {}, h("h2", {}, "Result")), h("pre", { class: "json" }, value));
    }
    if ((state.type === "FAILED" || state.type === "CRASHED") && state.data) {
      const error = state.data;
      const title = error.type ? `${error.type}: ${error.message ?? ""}` : state.message || "Error";
      return h("section", { class: "card", id: "error" },
        h("header", {}, h("h2", {}, "Error"), h("span", { class: "error" }, title)),
        h("pre", { class: "trace" }, error.traceback || json(error)));
    }
    if (state.message && ENDED.includes(state.type)) {
      return h("section", { class: "card", id: "error" }, h("header", {}, h("h2", {}, LABEL[state.type]), h("span", { class: "muted" }, state.message)));
    }
    return null;
  }

  render(run, history, children) {
    const started = firstOf(history, "RUNNING");
    const ended = ENDED.includes(run.state.type) ? run.state.timestamp : null;
    const retries = history.filter((change) => change.name === "AwaitingRetry").length;
    const deliveries = history.filter((change) => change.type === "PENDING").length;
    const client = run.state.state_details?.client_id;
    const scheduled = run.state.state_details?.scheduled_time;
    // A run waiting for the run that computes its cache key names it in its state.
    const cacheOwner = run.state.type === "SCHEDULED" ? run.state.state_details?.cache_owner : null;

    const facts = h("dl", { class: "facts" },
      fact("Task key", h("a", { href: runsHref({ task_key: run.task_key }) }, run.task_key)),
      fact("State", badge(run.state.type, run.state.name), run.state.message ? h("span", { class: "sub" }, run.state.message) : null),
      fact("Created", formatTime(run.created), h("span", { class: "sub" }, since(run.created))),
      fact("Started", started ? formatTime(started.timestamp) : "—"),
      fact("Ended", ended ? formatTime(ended) : "—"),
      fact("Duration", started && ended ? formatDuration(Date.parse(ended) - Date.parse(started.timestamp)) : started ? "running" : "—"),
      fact("Attempts", `${num(run.run_count)}${retries ? ` (${retries} ${retries === 1 ? "retry" : "retries"})` : ""}`),
      // Every delivery to a worker is a PENDING state in the history; the run's own
      // delivery_count (the crash guard's) starts over with each attempt.
      fact("Deliveries", h("span", { id: "deliveries" }, num(deliveries)),
        run.delivery_count !== deliveries ? h("span", { class: "sub" }, `${num(run.delivery_count)} in this attempt`) : null),
      client ? fact("Worker", h("span", { class: "mono" }, client)) : null,
      scheduled ? fact("Scheduled for", formatTime(scheduled)) : null,
      fact("Parent run", run.parent_task_run_id ? h("a", { class: "mono", href: `#/runs/${encodeURIComponent(run.parent_task_run_id)}`, id: "parent-run" }, shortId(run.parent_task_run_id)) : "—"),
      run.detached ? fact("Detached", "yes: cancelling its parent leaves it running") : null,
      run.group_id ? fact("Run group", h("span", { class: "mono", id: "run-group" }, run.group_id)) : null,
      run.wait_for.length ? fact("Waits for", ...run.wait_for.map((id) => h("a", { class: "mono", href: `#/runs/${encodeURIComponent(id)}` }, `${shortId(id)} `))) : null,
      run.tags.length ? fact("Tags", h("span", { class: "keys" }, run.tags.map((tag) => h("span", { class: "chip" }, tag)))) : null,
      run.idempotency_key ? fact("Idempotency key", h("span", { class: "mono" }, run.idempotency_key)) : null,
      run.cache_key ? fact("Cache key", h("span", { class: "mono" }, run.cache_key),
        cacheOwner ? h("span", { class: "sub" }, "waits for ", h("a", { class: "mono", href: `#/runs/${encodeURIComponent(cacheOwner)}`, id: "cache-owner" }, shortId(cacheOwner))) : null) : null,
      fact("Serializer", run.serializer),
    );

    let previous = null;
    const historyRows = history.map((change) => {
      const gap = previous ? formatDuration(Date.parse(change.timestamp) - Date.parse(previous.timestamp)) : "";
      previous = change;
      return h("tr", {},
        h("td", {}, formatTime(change.timestamp)),
        h("td", {}, badge(change.type, change.name)),
        h("td", { class: "num muted" }, gap ? `+${gap}` : ""),
        h("td", { class: "wrap" }, change.message || ""));
    });

    const parameters = run.serializer === "pickle" && typeof run.parameters === "string"
      ? `(pickled, ${num(run.parameters.length)} characters of base64)` : json(run.parameters);

    fill(document.getElementById("view"), 
      h("div", { class: "page-head" },
        h("div", { class: "grow" },
          h("h1", { id: "run-name" }, run.name, " ", badge(run.state.type, run.state.name, true)),
          h("div", { class: "subtitle mono", id: "run-id" }, run.id)),
        this.actions(run)),
      h("section", { class: "card" }, facts),
      this.outcome(run),
      h("div", { class: "two" },
        h("section", { class: "card", id: "parameters" }, h("header", {}, h("h2", {}, "Parameters")), h("pre", { class: "json" }, parameters)),
        Object.keys(run.context || {}).length
          ? h("section", { class: "card" }, h("header", {}, h("h2", {}, "Context")), h("pre", { class: "json" }, json(run.context)))
          : h("section", { class: "card", id: "children-summary" }, h("header", {}, h("h2", {}, "Submitted from this run")),
            h("div", { class: "body muted" }, children.length ? `${this.childCount(children)}, below` : "None: runs that this run's task submits show here."))),
      h("section", { class: "card", id: "history" },
        h("header", {}, h("h2", {}, "State history"), h("span", { class: "muted" }, `${history.length} states`)),
        h("div", { class: "table-wrap" }, h("table", {},
          h("thead", {}, h("tr", {}, h("th", {}, "Time"), h("th", {}, "State"), h("th", { class: "num" }, "After"), h("th", {}, "Message"))),
          h("tbody", {}, historyRows)))),
      children.length ? h("section", { class: "card", id: "children" },
        h("header", {}, h("h2", {}, "Child runs"), h("span", { class: "muted", id: "children-count" }, `${this.childCount(children)}, submitted from inside this run`)),
        h("div", { class: "table-wrap" }, h("table", {},
          h("thead", {}, h("tr", {}, h("th", {}, "State"), h("th", {}, "Run"), h("th", {}, "Task key"), h("th", {}, "Created"))),
          h("tbody", {}, children.map((child) => h("tr", { "data-run-id": child.id },
            h("td", {}, badge(child.state.type, child.state.name)),
            h("td", {}, runLink(child), h("span", { class: "sub mono" }, shortId(child.id))),
            h("td", {}, child.task_key),
            h("td", {}, formatTime(child.created))))))),
        this.moreChildren ? h("div", { class: "body" }, h("button", { class: "btn", type: "button", id: "more-children", onclick: () => {
          this.childLimit += CHILD_PAGE;
          this.load();
        } }, `Show ${num(CHILD_PAGE)} more`)) : null) : null,
    );
  }

  // "N child runs", or "the first N of more child runs" while more are not shown yet.
  childCount(children) {
    const n = `${num(children.length)} child run${children.length === 1 ? "" : "s"}`;
    return this.moreChildren ? `the first ${n} of more` : n;
  }
}

// ---------------------------------------------------------------- routing

function parseHash() {
  const hash = location.hash.replace(/^#/, "") || "/";
  const [path, query = ""] = hash.split("?");
  return { path, params: new URLSearchParams(query) };
}

async function route() {
  if (app.signedOut) return;
  const { path, params } = parseHash();
  app.view?.dispose?.();
  let view;
  let nav = "overview";
  const runMatch = path.match(/^\/runs\/([^/]+)$/);
  if (runMatch) {
    view = new RunView(decodeURIComponent(runMatch[1]));
    nav = "runs";
  } else if (path === "/runs") {
    view = new RunsView(params);
    nav = "runs";
  } else {
    view = new OverviewView();
  }
  for (const link of document.querySelectorAll("[data-nav]")) {
    if (link.dataset.nav === nav) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  app.view = view;
  try {
    await view.show();
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) return;
    fill(document.getElementById("view"), h("div", { class: "card narrow" }, h("h1", {}, "Something went wrong"), h("p", { class: "error" }, error.message)));
  }
}

function start() {
  app.signedOut = false;
  delete document.body.dataset.locked;
  document.getElementById("login").hidden = true;
  document.getElementById("sign-out").hidden = !app.key;
  connectLive();
  route();
}

document.getElementById("login-form").addEventListener("submit", signIn);
document.getElementById("sign-out").addEventListener("click", signOut);
window.addEventListener("hashchange", route);
setInterval(tick, 1000);
start();
