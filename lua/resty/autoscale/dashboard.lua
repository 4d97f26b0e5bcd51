-- The dashboard: one self-contained page (no external assets, works offline) and the JSON it polls.
--
--     location = /autoscale/dashboard { content_by_lua_block { autoscale.dashboard_handler() } }
--
-- GET serves the page; GET with `?format=json` (what the page polls) serves the status of every upstream, or of
-- one with `&upstream=name`, plus the server's clock (`time`), from which the page computes rates. The page keeps the
-- last `history` seconds in the browser and draws its charts as inline SVG with its own small script.

local cjson = require "cjson.safe"
local status = require "resty.autoscale.status"
local events = require "resty.autoscale.events"

local ngx = ngx
local type = type
local error = error
local pairs = pairs
local ipairs = ipairs
local tostring = tostring
local floor = math.floor
local now = ngx.now
local update_time = ngx.update_time

local _M = {}

local PAGE -- the page, with "{{CONFIG}}" where the options go (defined at the end of this file)

local OPTIONS = {
    status_url = "string", -- URL the page polls (default: this location with ?format=json)
    interval = "number",   -- seconds between polls (0.2 to 60; default 1)
    history = "number",    -- seconds kept and drawn (10 to 3600; default 300)
    title = "string",      -- page title (default "resty.autoscale")
    max_lines = "number",  -- peers drawn per chart, the busiest first (1 to 100; default 12)
}

local function check(opts)
    opts = opts or {}
    if type(opts) ~= "table" then
        error("resty.autoscale.dashboard: options must be a table (got " .. type(opts) .. ")", 3)
    end
    for k, v in pairs(opts) do
        if OPTIONS[k] == nil then
            error("resty.autoscale.dashboard: unknown option " .. tostring(k), 3)
        end
        if type(v) ~= OPTIONS[k] then
            error("resty.autoscale.dashboard: " .. k .. " must be a " .. OPTIONS[k] .. " (got " .. type(v) .. ")", 3)
        end
    end
    local function range(v, lo, hi, d)
        if v == nil then
            return d
        end
        if v ~= v or v < lo or v > hi then
            error("resty.autoscale.dashboard: value out of range (" .. lo .. " to " .. hi .. "): " .. tostring(v), 4)
        end
        return v
    end
    return {
        status_url = opts.status_url,
        interval = range(opts.interval, 0.2, 60, 1),
        history = range(opts.history, 10, 3600, 300),
        title = opts.title or "resty.autoscale",
        max_lines = floor(range(opts.max_lines, 1, 100, 12)),
    }
end

-- body, err = dashboard.data(upstream_name?)
-- What the page polls: status.all() (or the same shape for one upstream) plus `time`, the server's clock (s).
function _M.data(name)
    local body
    if name then
        local u, err = status.upstream(name)
        if not u then
            return nil, err
        end
        local evs = {}
        for _, e in ipairs(events.recent(200)) do
            if e.upstream == name or e.upstream == nil then
                evs[#evs + 1] = e
            end
        end
        body = { region = status.region(), upstreams = { [name] = u }, events = evs }
    else
        body = status.all()
        if not body.region then
            return nil, "resty.autoscale is not configured"
        end
    end
    update_time()
    body.time = now()
    return body
end

-- autoscale.dashboard_handler(opts?), in content_by_lua*: the page, or with ?format=json its data.
function _M.handler(opts)
    local o = check(opts)
    local method = ngx.req.get_method()
    if method ~= "GET" and method ~= "HEAD" then
        ngx.header["Allow"] = "GET, HEAD"
        return ngx.exit(405)
    end
    local args = ngx.req.get_uri_args()
    local h = ngx.header
    h["Cache-Control"] = "no-store"
    h["X-Content-Type-Options"] = "nosniff"
    if args.format == "json" then
        local upstream = args.upstream
        if type(upstream) ~= "string" then
            upstream = nil
        end
        local body, err = _M.data(upstream)
        h["Content-Type"] = "application/json"
        if not body then
            ngx.status = upstream and 404 or 503
            body = { error = err }
        end
        local text = cjson.encode(body)
        h["Content-Length"] = #text
        if method == "GET" then
            ngx.print(text)
        end
        return
    end
    local config = cjson.encode(o) -- cjson escapes "/", so "</script>" cannot appear in it
    local page = PAGE:gsub("{{CONFIG}}", function() return config end, 1)
    h["Content-Type"] = "text/html; charset=utf-8"
    h["Content-Security-Policy"] = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        .. "connect-src 'self'; img-src 'self' data:"
    h["Content-Length"] = #page
    if method == "GET" then
        ngx.print(page)
    end
end

PAGE = [==[
<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>resty.autoscale</title>
<link rel="icon" href="data:,">
<style>
:root { --bg:#f6f7f9; --card:#fff; --ink:#1d2330; --dim:#6b7280; --line:#e3e6eb; --grid:#eef0f3;
        --healthy:#2e9d57; --ejected:#d64545; --half_open:#e0a21b; --draining:#6b7bd6; --gone:#b8bec8; }
* { box-sizing: border-box; }
body { margin: 0; font: 13px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; background: var(--bg);
       color: var(--ink); }
header { display: flex; align-items: baseline; gap: 16px; padding: 12px 20px; background: #1d2330; color: #fff; }
header h1 { font-size: 17px; margin: 0; font-weight: 600; }
header .meta { color: #b9c0cc; font-size: 12px; }
#live { margin-left: auto; font-size: 12px; padding: 2px 8px; border-radius: 10px; background: #3a4254; }
#live.ok { background: #2e9d57; } #live.stale { background: #d64545; }
main { padding: 14px 20px; display: grid; gap: 14px; }
section.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 12px 14px; }
.card h2 { font-size: 15px; margin: 0 0 2px; }
.card .sub { color: var(--dim); font-size: 12px; margin-bottom: 8px; }
.badge { display: inline-block; padding: 0 7px; border-radius: 9px; color: #fff; font-size: 11px; line-height: 17px; }
.badge.healthy { background: var(--healthy); } .badge.ejected { background: var(--ejected); }
.badge.half_open { background: var(--half_open); } .badge.draining { background: var(--draining); }
.badge.gone { background: var(--gone); } .badge.panic { background: var(--ejected); }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { text-align: right; padding: 3px 8px; border-bottom: 1px solid var(--grid); white-space: nowrap; }
th { color: var(--dim); font-weight: 500; font-size: 12px; }
th:first-child, td:first-child, th:nth-child(2), td:nth-child(2) { text-align: left; }
.sw { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin-right: 6px; vertical-align: -1px; }
.bar { display: inline-block; height: 8px; background: #7c8db5; border-radius: 2px; vertical-align: 0; }
.charts { display: grid; grid-template-columns: repeat(auto-fit, minmax(360px, 1fr)); gap: 10px; margin-top: 10px; }
.chart h3 { font-size: 12px; font-weight: 600; margin: 0 0 2px; color: #374151; }
.chart h3 span { color: var(--dim); font-weight: 400; }
svg { display: block; width: 100%; height: auto; overflow: visible; }
svg text { font-size: 10px; fill: var(--dim); }
.note { color: var(--dim); font-size: 11px; }
#events th, #events td { text-align: left; }
#events .ev-warn td:nth-child(3) { color: var(--ejected); font-weight: 600; }
details { margin-top: 8px; } summary { cursor: pointer; color: var(--dim); font-size: 12px; }
pre { background: var(--bg); padding: 8px; border-radius: 6px; overflow: auto; max-height: 240px; font-size: 11px; }
</style>
</head>
<body data-polls="0">
<header><h1 id="title">resty.autoscale</h1><span class="meta" id="meta">connecting…</span><span id="live">…</span></header>
<main>
  <div id="ups"></div>
  <section class="card" id="events"><h2>Decisions and events</h2>
    <div class="sub">state changes, ejections, panic mode, configuration and operator actions (newest first)</div>
    <svg id="timeline" data-chart="timeline" viewBox="0 0 1000 70"></svg>
    <table><thead><tr><th>time</th><th>upstream</th><th>event</th><th>peer</th><th>details</th></tr></thead>
    <tbody id="evrows"></tbody></table>
  </section>
</main>
<script id="cfg" type="application/json">{{CONFIG}}</script>
<script>
"use strict";
const CFG = JSON.parse(document.getElementById("cfg").textContent);
const HISTORY = CFG.history, INTERVAL = CFG.interval * 1000, MAXL = CFG.max_lines;
const RATE_SPAN = Math.max(2, CFG.interval); // seconds over which rates and shares are computed
const COLORS = ["#2f6fde", "#e8590c", "#2b9348", "#c2255c", "#7048e8", "#0c8599", "#b08900", "#5c677d",
                "#d6336c", "#37b24d", "#1c7ed6", "#f08c00"];
const STATES = ["healthy", "half_open", "ejected", "draining"];
const WARN = { ejected: 1, panic_on: 1, ejection_skipped: 1, fallback: 1 };
const params = new URLSearchParams(location.search);
const ONLY = params.get("upstream");
let URL_ = CFG.status_url || (location.pathname + "?format=json");
if (ONLY) URL_ += (URL_.indexOf("?") < 0 ? "?" : "&") + "upstream=" + encodeURIComponent(ONLY);
document.getElementById("title").textContent = CFG.title;
document.title = CFG.title;

const S = { ups: {}, events: [], seqs: new Set(), polls: 0, fails: 0, now: 0, first: null };

function esc(s) {
  return String(s).replace(/[&<>"']/g, c => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}
function arr(x) { return Array.isArray(x) ? x : []; }
function fmt(v, d) {
  if (v === null || v === undefined || !isFinite(v)) return "–";
  const a = Math.abs(v);
  if (a >= 1000) return (v / 1000).toFixed(1) + "k";
  if (a >= 100) return v.toFixed(0);
  if (a >= 10) return v.toFixed(d === undefined ? 1 : d);
  return v.toFixed(d === undefined ? 2 : d);
}
function clock(t) {
  const d = new Date(t * 1000);
  return [d.getHours(), d.getMinutes(), d.getSeconds()].map(x => String(x).padStart(2, "0")).join(":");
}

// ---- ingest one poll ----
function ingest(j) {
  const t = typeof j.time === "number" ? j.time : Date.now() / 1000;
  S.now = t;
  if (S.first === null) S.first = t;
  const ups = j.upstreams || (j.peers ? { [j.name]: j } : {});
  for (const name of Object.keys(ups)) {
    const u = ups[name];
    let U = S.ups[name];
    if (!U) U = S.ups[name] = { name, peers: {}, order: [], info: u, t: [] };
    U.info = u;
    U.t.push(t);
    const seen = {};
    let dsum = 0;
    const rows = [];
    for (const p of arr(u.peers)) {
      let P = U.peers[p.addr];
      if (!P) {
        P = U.peers[p.addr] = { addr: p.addr, color: COLORS[U.order.length % COLORS.length], s: [] };
        U.order.push(p.addr);
      }
      seen[p.addr] = true;
      const tot = p.totals || {};
      // rates from the all-time counters over the last RATE_SPAN seconds (server clock), else the window's
      let base = null;
      for (let k = P.s.length - 1; k >= 0; k--) {
        if (P.s[k].req > tot.requests) break; // counters went back: the record was reused
        base = P.s[k];
        if (t - base.t >= RATE_SPAN) break;
      }
      let rps, eps, dreq = null;
      if (base && t - base.t > 0.05) {
        const dt = t - base.t;
        dreq = tot.requests - base.req;
        rps = dreq / dt;
        eps = Math.max(0, tot.failures - base.fail) / dt;
      } else {
        rps = p.rps || 0;
        eps = p.window > 0 ? p.failures / p.window : 0;
      }
      if (dreq !== null) dsum += dreq;
      const smp = { t, p50: p.p50 == null ? null : p.p50 * 1000, p99: p.p99 == null ? null : p.p99 * 1000,
                    rps, eps, state: p.state, share: null, dreq, wshare: p.share, p: p,
                    req: tot.requests, fail: tot.failures };
      P.s.push(smp);
      rows.push(smp);
    }
    for (const smp of rows) {
      smp.share = 100 * (dsum > 0 && smp.dreq !== null ? smp.dreq / dsum : (smp.wshare || 0));
    }
    for (const addr of U.order) {
      const P = U.peers[addr];
      P.gone = !seen[addr];
      while (P.s.length && P.s[0].t < t - HISTORY) P.s.shift();
    }
    while (U.t.length && U.t[0] < t - HISTORY) U.t.shift();
  }
  for (const e of arr(j.events)) {
    if (e.seq === undefined || S.seqs.has(e.seq)) continue;
    S.seqs.add(e.seq);
    S.events.push(e);
  }
  S.events.sort((a, b) => a.seq - b.seq);
  while (S.events.length > 500) S.seqs.delete(S.events.shift().seq);
  const r = j.region || {};
  document.getElementById("meta").textContent =
    "workers " + (r.workers_attached ?? "?") + " · config epoch " + (r.config_epoch ?? "?") +
    " · window " + (r.window ? r.window.buckets * r.window.bucket : "?") + " s · updated " + clock(t);
}

// ---- charts ----
const W = 480, H = 150, L = 44, R = 8, T = 8, B = 20;
function nice(max) {
  if (!(max > 0)) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(max)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= max) return m * p;
  return 10 * p;
}
function axes(t0, t1, ymax, unit) {
  let g = "";
  for (let i = 0; i <= 4; i++) {
    const y = T + (H - T - B) * (1 - i / 4);
    g += `<line x1="${L}" x2="${W - R}" y1="${y}" y2="${y}" stroke="#eef0f3"/>` +
         `<text x="${L - 4}" y="${y + 3}" text-anchor="end">${fmt(ymax * i / 4)}${i === 4 ? esc(unit) : ""}</text>`;
  }
  for (let i = 0; i <= 4; i++) {
    const x = L + (W - L - R) * i / 4;
    g += `<text x="${x}" y="${H - 5}" text-anchor="${i === 0 ? "start" : i === 4 ? "end" : "middle"}">` +
         `${clock(t0 + (t1 - t0) * i / 4)}</text>`;
  }
  return g;
}
function markers(U, t0, t1) {
  let g = "";
  for (const e of S.events) {
    if (e.upstream !== U.name || e.time < t0 || e.time > t1) continue;
    const x = L + (W - L - R) * (e.time - t0) / (t1 - t0);
    g += `<line class="mark" data-event="${esc(e.event)}" x1="${x.toFixed(1)}" x2="${x.toFixed(1)}" y1="${T}" ` +
         `y2="${H - B}" stroke="${WARN[e.event] ? "#d64545" : "#9aa3b2"}" stroke-dasharray="3 3"><title>` +
         `${esc(clock(e.time) + " " + e.event + (e.peer ? " " + e.peer : ""))}</title></line>`;
  }
  return g;
}
// series: [{ P, key, dash }]; each sample s[key] (null = gap)
// minMax: the y axis reaches at least this; fixed: exactly this
function lineChart(U, kind, series, unit, t0, t1, minMax, fixed) {
  let ymax = minMax || 0;
  for (const sr of series) for (const s of sr.P.s) if (s[sr.key] != null && s[sr.key] > ymax) ymax = s[sr.key];
  ymax = fixed || nice(ymax * 1.05);
  const sx = t => L + (W - L - R) * (t - t0) / (t1 - t0);
  const sy = v => T + (H - T - B) * (1 - Math.min(v, ymax) / ymax);
  let g = axes(t0, t1, ymax, unit) + markers(U, t0, t1);
  for (const sr of series) {
    // one polyline per run of values; data-n, data-last and data-max describe it for tests and tools
    let pts = [], last = null, max = 0;
    const flush = () => {
      if (pts.length) g += `<polyline fill="none" stroke="${sr.P.color}" stroke-width="1.6" ` +
        `${sr.dash ? 'stroke-dasharray="4 3" ' : ""}data-peer="${esc(sr.P.addr)}" data-series="${sr.key}" ` +
        `data-n="${pts.length}" data-last="${last}" data-max="${max}" points="${pts.join(" ")}"/>`;
      pts = [];
      max = 0;
    };
    for (const s of sr.P.s) {
      if (s.t < t0) continue;
      const v = s[sr.key];
      if (v == null || !isFinite(v)) { flush(); continue; }
      pts.push(sx(s.t).toFixed(1) + "," + sy(v).toFixed(1));
      last = +v.toFixed(6);
      if (last > max) max = last;
    }
    flush();
  }
  return `<svg class="chart" data-chart="${kind}" data-upstream="${esc(U.name)}" viewBox="0 0 ${W} ${H}">${g}</svg>`;
}
function stateChart(U, peers, t0, t1) {
  const rowH = 14, h = T + rowH * peers.length + B;
  const sx = t => L + (W - L - R) * (t - t0) / (t1 - t0);
  let g = "";
  peers.forEach((P, i) => {
    const y = T + i * rowH;
    g += `<text x="${L - 4}" y="${y + 10}" text-anchor="end" fill="${P.color}">●</text>`;
    let start = null, st = null;
    const seg = (a, b) => {
      if (st === null) return;
      g += `<rect class="state" data-peer="${esc(P.addr)}" data-state="${esc(st)}" x="${sx(a).toFixed(1)}" ` +
           `y="${y + 1}" width="${Math.max(1, sx(b) - sx(a)).toFixed(1)}" height="${rowH - 3}" ` +
           `fill="var(--${STATES.includes(st) ? st : "gone"})"><title>${esc(P.addr + ": " + st)}</title></rect>`;
    };
    P.s.forEach((s, k) => {
      if (s.state !== st) { seg(start, s.t); start = s.t; st = s.state; }
      if (k === P.s.length - 1) seg(start, P.gone ? s.t : Math.max(s.t, S.now));
    });
  });
  for (let i = 0; i <= 4; i++) {
    const x = L + (W - L - R) * i / 4;
    g += `<text x="${x}" y="${h - 5}" text-anchor="${i === 0 ? "start" : i === 4 ? "end" : "middle"}">` +
         `${clock(t0 + (t1 - t0) * i / 4)}</text>`;
  }
  return `<svg class="chart" data-chart="state" data-upstream="${esc(U.name)}" viewBox="0 0 ${W} ${h}">${g}</svg>`;
}

// ---- page ----
function card(U) {
  let el = document.getElementById("up-" + U.name);
  if (!el) {
    el = document.createElement("section");
    el.className = "card";
    el.id = "up-" + U.name;
    el.dataset.upstream = U.name;
    el.innerHTML = `<h2></h2><div class="sub"></div><table><thead><tr><th>peer</th><th>state</th><th>weight</th>` +
      `<th>in flight</th><th>req/s</th><th>errors/s</th><th>p50 ms</th><th>p99 ms</th><th>EWMA ms</th><th>cost</th>` +
      `<th title="backend-reported load (age s; back-off s)">reported</th><th>share</th></tr></thead><tbody></tbody></table><div class="charts"></div><div class="note"></div>` +
      `<details><summary>configuration in force</summary><pre></pre></details>`;
    document.getElementById("ups").appendChild(el);
  }
  return el;
}
// a peer's reported load: value (age), agent state and back-off when there are any; empty without reports
function reported(r) {
  if (!r) return "";
  let t = r.load == null ? "none" : fmt(r.load, 3) + (r.age == null ? "" : ` (${fmt(r.age, 1)} s)`);
  if (r.agent_state && r.agent_state !== "up") t += " " + r.agent_state;
  if (r.agent_weight) t += ` ${r.agent_weight} %`;
  if (r.backoff > 0) t += ` back-off ${fmt(r.backoff, 1)} s`;
  return esc(t);
}
// scale to zero: requests held while no peer is ready, the fallbacks they got, the last cold start
function held(sc) {
  if (!sc || !sc.hold) return "";
  const h = sc.hold, cs = sc.cold_start || {};
  return ` · <span class="badge${h.held > 0 ? " panic" : ""}">${esc(h.held)} held</span> · ${esc(h.released)} released · ` +
    `${esc(h.timeouts + h.rejected)} fallback` + (cs.last != null ? ` · cold start ${fmt(cs.last * 1000)} ms` : "");
}
function render() {
  const names = Object.keys(S.ups).sort();
  // the time axis grows with the data (at least 10 s), up to `history`
  const t1 = S.now, t0 = Math.max(t1 - HISTORY, Math.min(S.first, t1 - 10));
  for (const name of names) {
    const U = S.ups[name], u = U.info, el = card(U);
    el.querySelector("h2").textContent = name;
    const sub = el.querySelector(".sub");
    sub.innerHTML = `${esc(u.balancer || "")} · ${arr(u.peers).length} peers · ${u.healthy ?? "?"} healthy · ` +
      `${u.ejected ?? 0} ejected · ${u.draining ?? 0} draining` + (u.panic ? ' <span class="badge panic">PANIC MODE</span>' : "") +
      held(u.scaling);
    const tb = el.querySelector("tbody");
    let rows = "";
    for (const addr of U.order) {
      const P = U.peers[addr], s = P.s[P.s.length - 1];
      if (!s) continue;
      const p = s.p, st = P.gone ? "gone" : s.state;
      rows += `<tr data-peer="${esc(addr)}"><td><span class="sw" style="background:${P.color}"></span>${esc(addr)}</td>` +
        `<td><span class="badge ${esc(st)}">${esc(st)}</span></td><td>${esc(p.weight)}</td><td>${esc(p.inflight)}</td>` +
        `<td>${fmt(s.rps)}</td><td>${fmt(s.eps)}</td><td>${fmt(s.p50)}</td><td>${fmt(s.p99)}</td>` +
        `<td>${fmt(p.ewma * 1000)}</td><td>${fmt(p.cost)}</td><td>${reported(p.reported)}</td>` +
        `<td><span class="bar" style="width:${Math.round(s.share * 0.6)}px"></span> ${fmt(s.share, 1)} %</td></tr>`;
    }
    tb.innerHTML = rows;
    // the busiest peers over the history get a line
    const busy = U.order.map(a => U.peers[a]).filter(P => P.s.length)
      .map(P => [P, P.s.reduce((x, s) => x + (s.dreq || 0), 0)]).sort((a, b) => b[1] - a[1]).map(x => x[0]);
    const shown = busy.slice(0, MAXL);
    el.querySelector(".note").textContent = busy.length > shown.length ?
      `charts show the ${shown.length} busiest of ${busy.length} peers` : "";
    const lat = [];
    for (const P of shown) { lat.push({ P, key: "p99" }); lat.push({ P, key: "p50", dash: true }); }
    el.querySelector(".charts").innerHTML =
      `<div class="chart"><h3>Latency <span>p99 solid, p50 dashed (ms, rolling window)</span></h3>` +
        lineChart(U, "latency", lat, "ms", t0, t1) + `</div>` +
      `<div class="chart"><h3>Throughput <span>(requests/s)</span></h3>` +
        lineChart(U, "rps", shown.map(P => ({ P, key: "rps" })), "/s", t0, t1) + `</div>` +
      `<div class="chart"><h3>Errors <span>(failed attempts/s)</span></h3>` +
        lineChart(U, "errors", shown.map(P => ({ P, key: "eps" })), "/s", t0, t1, 1) + `</div>` +
      `<div class="chart"><h3>Share of traffic <span>(%)</span></h3>` +
        lineChart(U, "share", shown.map(P => ({ P, key: "share" })), "%", t0, t1, 100, 100) + `</div>` +
      `<div class="chart"><h3>State <span>healthy · half-open · ejected · draining</span></h3>` +
        stateChart(U, shown, t0, t1) + `</div>`;
    const pre = el.querySelector("pre");
    if (!pre.dataset.set && u.config) { pre.textContent = JSON.stringify(u.config, null, 1); pre.dataset.set = 1; }
  }
  // events: timeline and table
  let g = "";
  const tw = 1000, tl = 10, tr = 10;
  for (let i = 0; i <= 4; i++) {
    const x = tl + (tw - tl - tr) * i / 4;
    g += `<line x1="${x}" x2="${x}" y1="8" y2="48" stroke="#eef0f3"/><text x="${x}" y="64" text-anchor="` +
         `${i === 0 ? "start" : i === 4 ? "end" : "middle"}">${clock(t0 + (t1 - t0) * i / 4)}</text>`;
  }
  g += `<line x1="${tl}" x2="${tw - tr}" y1="28" y2="28" stroke="#c9ced6"/>`;
  for (const e of S.events) {
    if (e.time < t0) continue;
    const x = tl + (tw - tl - tr) * (e.time - t0) / (t1 - t0);
    g += `<circle class="ev" data-event="${esc(e.event)}" cx="${x.toFixed(1)}" cy="28" r="5" ` +
         `fill="${WARN[e.event] ? "#d64545" : e.event === "healthy" || e.event === "enabled" ? "#2e9d57" : "#6b7bd6"}">` +
         `<title>${esc(clock(e.time) + " " + (e.upstream || "") + " " + e.event + " " + (e.peer || ""))}</title></circle>`;
  }
  document.getElementById("timeline").innerHTML = g;
  let rows = "";
  // "state" in an event is the peer's state when the event was read, not when it happened: not shown
  const skip = { seq: 1, time: 1, event: 1, upstream: 1, peer: 1, state: 1 };
  for (const e of S.events.slice(-100).reverse()) {
    const det = Object.keys(e).filter(k => !skip[k]).map(k => k + "=" + e[k]).join(" ");
    rows += `<tr class="${WARN[e.event] ? "ev-warn" : ""}" data-event="${esc(e.event)}"><td>${clock(e.time)}</td>` +
      `<td>${esc(e.upstream || "")}</td><td>${esc(e.event)}</td><td>${esc(e.peer || "")}</td><td>${esc(det)}</td></tr>`;
  }
  document.getElementById("evrows").innerHTML = rows;
}

function poll() {
  fetch(URL_, { cache: "no-store" })
    .then(r => { if (!r.ok) throw new Error("HTTP " + r.status); return r.json(); })
    .then(j => {
      ingest(j);
      render();
      S.polls++;
      document.body.dataset.polls = S.polls;
      const live = document.getElementById("live");
      live.textContent = "live";
      live.className = "ok";
    })
    .catch(err => {
      S.fails++;
      const live = document.getElementById("live");
      live.textContent = "no data: " + err.message;
      live.className = "stale";
    })
    .finally(() => setTimeout(poll, INTERVAL));
}
poll();
</script>
</body>
</html>
]==]

return _M
