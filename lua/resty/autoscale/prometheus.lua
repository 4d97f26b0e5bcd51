-- Prometheus exposition (text format 0.0.4) of the shared statistics: per upstream and peer, and the region.
--
-- Everything comes from shared memory through resty.autoscale.status, so any worker answers with the same numbers.
-- One pass over the peers appends each sample to the buffer of its metric family; the families are then joined
-- under their HELP/TYPE lines (the format wants a family's samples together). Counters are the all-time totals of
-- the core; gauges are the balancer's view now (percentiles over the rolling window, peak-EWMA, cost, share).
--
--     location = /metrics { content_by_lua_block { autoscale.prometheus_handler() } }

local status = require "resty.autoscale.status"
local config = require "resty.autoscale.config"

local ngx = ngx
local type = type
local pairs = pairs
local ipairs = ipairs
local tostring = tostring
local tonumber = tonumber
local concat = table.concat
local sort = table.sort
local find = string.find
local gsub = string.gsub
local huge = math.huge
local now = ngx.now
local update_time = ngx.update_time

local _M = {}

local YIELD_EVERY = 200

-- name, type, help; the order of output.
local FAMILIES = {
    { "autoscale_peer_requests_total", "counter", "Attempts sent to the peer (all time)." },
    { "autoscale_peer_failures_total", "counter",
      "Failed attempts by kind: http_5xx (a failure status), gateway (no valid response), connect, timeout." },
    { "autoscale_peer_aborted_total", "counter", "Attempts aborted by the client (all time)." },
    { "autoscale_peer_latency_seconds", "histogram",
      "Latency of attempts, from peer choice to the end of the attempt (all time)." },
    { "autoscale_peer_window_latency_seconds", "summary",
      "Latency quantiles over the rolling window (relative error <= 1.96 %; none without samples); sum and count all time." },
    { "autoscale_peer_window_requests", "gauge", "Attempts in the rolling window." },
    { "autoscale_peer_window_failures", "gauge", "Failed attempts in the rolling window." },
    { "autoscale_peer_ewma_seconds", "gauge", "Peak-EWMA latency estimate used by the balancer." },
    { "autoscale_peer_cost", "gauge",
      "Balancer cost of the peer (lower is preferred): EWMA x (in flight + 1) / weight; with reports see docs/reports.md." },
    { "autoscale_peer_weight", "gauge", "Configured weight of the peer." },
    { "autoscale_peer_slow_start_ratio", "gauge", "Slow-start factor applied to the weight (1 when fully ramped)." },
    { "autoscale_peer_traffic_share_ratio", "gauge", "Share of the upstream's attempts in the rolling window." },
    { "autoscale_peer_in_flight_requests", "gauge", "Attempts in flight now, all workers." },
    { "autoscale_peer_state", "gauge", "1 for the peer's current state (healthy, ejected, half_open, draining)." },
    { "autoscale_peer_ejections_total", "counter", "Times the peer was ejected (all time)." },
    { "autoscale_peer_reported_load", "gauge",
      "Backend-reported load the balancer uses (smoothed utilization, named metric or plain value; upstreams with reports)." },
    { "autoscale_peer_reported_metric", "gauge", "Fields of the peer's last load report, by field (ORCA names)." },
    { "autoscale_peer_report_age_seconds", "gauge", "Age of the peer's last load report." },
    { "autoscale_peer_report_used", "gauge", "1 while the peer's report enters its cost (past the blackout, not expired)." },
    { "autoscale_peer_backoff_seconds", "gauge", "Back-pressure (Retry-After) time left; the peer's cost is raised meanwhile." },
    { "autoscale_peer_reports_total", "counter", "Load reports taken from the peer (all time)." },
    { "autoscale_peer_reports_malformed_total", "counter", "Load headers or polled answers of the peer refused as malformed." },
    { "autoscale_peer_backpressure_total", "counter", "Responses of the peer with Retry-After on 429/503 (all time)." },
    { "autoscale_peer_agent_weight_ratio", "gauge", "Weight the peer's agent set, as a fraction of its configured weight." },
    { "autoscale_upstream_reported_load", "gauge",
      "Reported load over the upstream's healthy peers with a usable report, by aggregate (mean, sum) and peers counted." },
    { "autoscale_upstream_peers", "gauge", "Peers of the upstream." },
    { "autoscale_upstream_healthy_peers", "gauge", "Peers of the upstream in the healthy state." },
    { "autoscale_upstream_ejected_peers", "gauge", "Peers of the upstream that are ejected." },
    { "autoscale_upstream_draining_peers", "gauge", "Peers of the upstream that are draining." },
    { "autoscale_upstream_panic", "gauge", "1 while the upstream is in panic mode (too few healthy peers; all take traffic)." },
    { "autoscale_upstream_window_requests", "gauge", "Attempts of the upstream in the rolling window." },
    { "autoscale_upstream_balancer_info", "gauge", "1, labelled with the upstream's balancer in force." },
    { "autoscale_upstream_option", "gauge",
      "Numeric options of the upstream in force, from shared memory, so run-time changes show (times in seconds)." },
    { "autoscale_region_bytes", "gauge", "Size of the shared-memory region." },
    { "autoscale_region_peer_slots", "gauge", "Peer records of the region (max_peers)." },
    { "autoscale_workers_attached", "gauge", "Worker processes attached to the region." },
    { "autoscale_config_epoch", "gauge", "Configuration generation (bumped by every configure)." },
    { "autoscale_events_total", "counter", "Events written since the start, by kind (state changes and decisions)." },
    { "autoscale_library_call_seconds", "summary",
      "Time inside the library's balancer and log calls, over the calls timed (one in 64 per worker), all workers." },
    { "autoscale_dropped_samples_total", "counter", "Samples dropped by the core (should stay 0)." },
    { "autoscale_evicted_requests_total", "counter", "Requests evicted from a worker's request table (should stay 0)." },
    { "autoscale_exporter_render_seconds", "gauge", "Time this scrape took to render, up to this line." },
}

local FAMILY = {}
for i, f in ipairs(FAMILIES) do
    FAMILY[f[1]] = i
end

local STATES, KINDS, QUANTILES = {}, {}, {}
for i, s in ipairs { "healthy", "ejected", "half_open", "draining" } do
    STATES[i] = { s, ',state="' .. s .. '"' }
end
for i, k in ipairs { "http_5xx", "gateway", "connect", "timeout" } do
    KINDS[i] = { "fail_" .. k, ',kind="' .. k .. '"' }
end
for i, q in ipairs { { "0.5", "p50" }, { "0.9", "p90" }, { "0.99", "p99" }, { "0.999", "p999" } } do
    QUANTILES[i] = { q[2], ',quantile="' .. q[1] .. '"' }
end
local REPORT_FIELDS = {}
for i, f in ipairs { "cpu_utilization", "application_utilization", "rps_fractional", "eps", "named" } do
    REPORT_FIELDS[i] = { f, ',field="' .. f .. '"' }
end
local LE_INF = ',le="+Inf"'
local LE -- { ',le="0.001"', ... }: the library's bounds, read once

local function le_labels()
    if not LE then
        local bounds = status.latency_bounds()
        if #bounds == 0 then
            return {}
        end
        LE = {}
        for i, b in ipairs(bounds) do
            LE[i] = ',le="' .. string.format("%.6g", b) .. '"'
        end
    end
    return LE
end

-- The numeric options of an upstream, as { name, label }; outlier options are named outlier.<name>.
local OPTIONS, OUTLIER_OPTIONS = {}, {}
for _, name in ipairs { "retries", "ewma_decay", "default_rtt", "slow_start", "slow_start_aggression",
                        "slow_start_min_weight", "slow_peer_factor", "slow_peer_penalty", "failure_penalty" } do
    OPTIONS[#OPTIONS + 1] = { name, ',option="' .. name .. '"' }
end
for name in pairs(config.defaults.outlier) do
    OUTLIER_OPTIONS[#OUTLIER_OPTIONS + 1] = { name, ',option="outlier.' .. name .. '"' }
end
sort(OUTLIER_OPTIONS, function(a, b) return a[1] < b[1] end)

-- A sample value in the exposition format (Lua's "inf"/"nan" are not).
local function num(v)
    if type(v) == "boolean" then
        return v and "1" or "0"
    end
    if v ~= v then
        return "NaN"
    end
    if v == huge then
        return "+Inf"
    end
    if v == -huge then
        return "-Inf"
    end
    return tostring(v)
end

local function escape(s)
    s = tostring(s)
    if find(s, '[\\"\n]') then
        s = gsub(gsub(gsub(s, "\\", "\\\\"), '"', '\\"'), "\n", "\\n")
    end
    return s
end

-- The output under construction: one buffer of pieces per family, joined at the end under HELP/TYPE lines.
local function new_output()
    local bufs, lens = {}, {}
    for i = 1, #FAMILIES do
        bufs[i], lens[i] = {}, 0
    end
    -- One sample: family{labels extra} value, e.g. autoscale_peer_failures_total{upstream="a",peer="b",kind="c"} 0.
    -- `labels` is the text inside the braces ("" for none), `extra` more labels starting with a comma, `suffix` the
    -- histogram suffix. A nil value adds nothing.
    local function add(family, labels, value, extra, suffix)
        if value == nil then
            return
        end
        local i = FAMILY[family]
        local b, n = bufs[i], lens[i]
        b[n + 1] = family
        b[n + 2] = suffix or ""
        if labels ~= "" then
            b[n + 3] = "{"
            b[n + 4] = labels
            b[n + 5] = extra or ""
            b[n + 6] = "} "
        else
            b[n + 3], b[n + 4], b[n + 5], b[n + 6] = "", "", "", " "
        end
        b[n + 7] = num(value)
        b[n + 8] = "\n"
        lens[i] = n + 8
    end
    local function text()
        local out = {}
        for i, f in ipairs(FAMILIES) do
            if lens[i] > 0 then
                out[#out + 1] = "# HELP " .. f[1] .. " " .. f[3] .. "\n# TYPE " .. f[1] .. " " .. f[2] .. "\n"
                out[#out + 1] = concat(bufs[i], "", 1, lens[i])
            end
        end
        return concat(out)
    end
    return add, text
end

local function peer_samples(add, ul, p)
    local l = ul .. ',peer="' .. escape(p.addr) .. '"'
    local t = p.totals
    add("autoscale_peer_requests_total", l, t.requests)
    for _, k in ipairs(KINDS) do
        add("autoscale_peer_failures_total", l, t[k[1]], k[2])
    end
    add("autoscale_peer_aborted_total", l, t.aborted)
    local counts = p.slot and status.latency_buckets(p.slot)
    if counts then
        local requests = t.requests
        for i, label in ipairs(le_labels()) do
            local c = tonumber(counts[i - 1])
            add("autoscale_peer_latency_seconds", l, c < requests and c or requests, label, "_bucket")
        end
    end
    add("autoscale_peer_latency_seconds", l, t.requests, LE_INF, "_bucket")
    add("autoscale_peer_latency_seconds", l, t.latency_sum, nil, "_sum")
    add("autoscale_peer_latency_seconds", l, t.requests, nil, "_count")
    for _, q in ipairs(QUANTILES) do
        add("autoscale_peer_window_latency_seconds", l, p[q[1]], q[2])
    end
    add("autoscale_peer_window_latency_seconds", l, t.latency_sum, nil, "_sum")
    add("autoscale_peer_window_latency_seconds", l, t.requests, nil, "_count")
    add("autoscale_peer_window_requests", l, p.requests)
    add("autoscale_peer_window_failures", l, p.failures)
    add("autoscale_peer_ewma_seconds", l, p.ewma)
    add("autoscale_peer_cost", l, p.cost)
    add("autoscale_peer_weight", l, p.weight)
    add("autoscale_peer_slow_start_ratio", l, p.slow_start)
    add("autoscale_peer_traffic_share_ratio", l, p.share)
    add("autoscale_peer_in_flight_requests", l, p.inflight)
    for _, s in ipairs(STATES) do
        add("autoscale_peer_state", l, p.state == s[1] and 1 or 0, s[2])
    end
    add("autoscale_peer_ejections_total", l, p.ejections)
    local r = p.reported
    if r then
        add("autoscale_peer_reported_load", l, r.load)
        for _, f in ipairs(REPORT_FIELDS) do
            add("autoscale_peer_reported_metric", l, r[f[1]], f[2])
        end
        add("autoscale_peer_report_age_seconds", l, r.age)
        add("autoscale_peer_report_used", l, r.used)
        add("autoscale_peer_backoff_seconds", l, r.backoff)
        add("autoscale_peer_reports_total", l, r.reports)
        add("autoscale_peer_reports_malformed_total", l, r.malformed)
        add("autoscale_peer_backpressure_total", l, r.backpressure)
        add("autoscale_peer_agent_weight_ratio", l, r.agent_weight and r.agent_weight / 100)
    end
end

local function upstream_samples(add, name, u)
    local l = 'upstream="' .. escape(name) .. '"'
    add("autoscale_upstream_peers", l, #u.peers)
    add("autoscale_upstream_healthy_peers", l, u.healthy)
    add("autoscale_upstream_ejected_peers", l, u.ejected)
    add("autoscale_upstream_draining_peers", l, u.draining)
    add("autoscale_upstream_panic", l, u.panic)
    add("autoscale_upstream_window_requests", l, u.requests)
    local c = u.config
    add("autoscale_upstream_balancer_info", l, 1, ',balancer="' .. escape(c.balancer) .. '"')
    for _, o in ipairs(OPTIONS) do
        add("autoscale_upstream_option", l, c[o[1]], o[2])
    end
    for _, o in ipairs(OUTLIER_OPTIONS) do
        add("autoscale_upstream_option", l, c.outlier[o[1]], o[2])
    end
    local rep = u.reported
    if rep then
        add("autoscale_upstream_reported_load", l, rep.mean, ',aggregate="mean"')
        add("autoscale_upstream_reported_load", l, rep.sum, ',aggregate="sum"')
        add("autoscale_upstream_reported_load", l, rep.count, ',aggregate="peers"')
    end
    return l
end

local function region_samples(add, r)
    add("autoscale_region_bytes", "", r.size_bytes)
    add("autoscale_region_peer_slots", "", r.max_peers)
    add("autoscale_workers_attached", "", r.workers_attached)
    add("autoscale_config_epoch", "", r.config_epoch)
    local kinds = {}
    for k in pairs(r.event_totals) do
        kinds[#kinds + 1] = k
    end
    sort(kinds)
    for _, k in ipairs(kinds) do
        add("autoscale_events_total", 'kind="' .. k .. '"', r.event_totals[k])
    end
    for _, phase in ipairs { "balancer", "log" } do
        local c = r.library_cost and r.library_cost[phase]
        if c then
            add("autoscale_library_call_seconds", 'phase="' .. phase .. '"', c.seconds, nil, "_sum")
            add("autoscale_library_call_seconds", 'phase="' .. phase .. '"', c.calls, nil, "_count")
        end
    end
    add("autoscale_dropped_samples_total", "", r.dropped_samples)
    add("autoscale_evicted_requests_total", "", r.evicted_requests)
end

-- text, err = prometheus.render(opts)
-- The whole exposition as one string. With `opts.yield` (handler: on) it yields (sleeps 1 ms) after every
-- `YIELD_EVERY` peers, so that the worker serves its other requests in between; only where yielding is allowed.
function _M.render(opts)
    local yield = opts and opts.yield
    update_time()
    local started = now()
    local all = status.all()
    if not all.region then
        return nil, "resty.autoscale is not configured"
    end
    local add, text = new_output()
    region_samples(add, all.region)
    local names = {}
    for name in pairs(all.upstreams) do
        names[#names + 1] = name
    end
    sort(names)
    local done = 0
    for _, name in ipairs(names) do
        local u = all.upstreams[name]
        local ul = upstream_samples(add, name, u)
        for _, p in ipairs(u.peers) do
            peer_samples(add, ul, p)
            done = done + 1
            if yield and done % YIELD_EVERY == 0 then
                ngx.sleep(0.001) -- sleep(0) needs OpenResty's delayed-events patch
            end
        end
    end
    update_time()
    add("autoscale_exporter_render_seconds", "", now() - started)
    return text() .. require("resty.autoscale.scaler").prometheus() .. require("resty.autoscale.discovery").prometheus()
        .. require("resty.autoscale.admission").prometheus()
end

-- autoscale.prometheus_handler(), in content_by_lua*: answers the exposition (GET or HEAD).
function _M.handler()
    local method = ngx.req.get_method()
    if method ~= "GET" and method ~= "HEAD" then
        ngx.header["Allow"] = "GET, HEAD"
        return ngx.exit(405)
    end
    local body, err = _M.render { yield = true }
    if not body then
        ngx.status = 503
        ngx.header["Content-Type"] = "text/plain; charset=utf-8"
        ngx.say(err)
        return
    end
    ngx.header["Content-Type"] = "text/plain; version=0.0.4; charset=utf-8"
    ngx.header["Cache-Control"] = "no-store"
    ngx.header["Content-Length"] = #body
    if method == "GET" then
        ngx.print(body)
    end
end

return _M
