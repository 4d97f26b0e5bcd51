-- Scaling decisions per upstream (service), made in a background timer by one worker at a time (the upstream's
-- lease in shared memory, the same that active health checks use), from the statistics every worker shares:
-- in-flight requests, request rate, a latency percentile, the error rate, and optionally a number fetched from a
-- Prometheus server. The rules are in rust-core/src/scaling.rs; this module gathers the signals, coordinates with
-- other gateways (resty.autoscale.cluster), records every decision, calls the actuator (resty.autoscale.actuator)
-- or only publishes the desired count, and answers `pending(name)` while new capacity is awaited.
-- State that every worker must see lives in `lua_shared_dict autoscale_scaling`. See docs/scaling.md.

local ffi = require "ffi"
local cjson = require "cjson.safe"
local config = require "resty.autoscale.config"
local actuator = require "resty.autoscale.actuator"
local cluster = require "resty.autoscale.cluster"
local events = require "resty.autoscale.events"
local http = require "resty.autoscale.http"
local hold = require "resty.autoscale.hold"

local ngx = ngx
local ngx_log = ngx.log
local ngx_ERR = ngx.ERR
local ngx_WARN = ngx.WARN
local ngx_NOTICE = ngx.NOTICE
local fail, number, known, show = config.fail, config.number, config.known, config.show
local format = string.format
local concat = table.concat
local floor = math.floor
local huge = math.huge
local pairs = pairs
local ipairs = ipairs
local tostring = tostring
local tonumber = tonumber
local sort = table.sort

local _M = {}

local DICT = "autoscale_scaling"
local MAX_PROMETHEUS_BODY = 1024 * 1024 -- the largest query answer read; a larger one is a failed query
local NAN = 0 / 0
local SIGNAL_NAMES = { [0] = "utilization", "rps", "latency", "error_rate", "external", "reported" }
local REASONS = { [0] = "steady", "scale_up", "scale_down", "holding", "up_window", "stabilizing", "cooldown", "panic",
                  "bounded", "no_data" }
local PERCENTILES = { p50 = true, p90 = true, p99 = true, p999 = true }

_M.defaults = {
    interval = 0.5, min = 1, max = 100, tolerance = 0.1, scale_up_window = 1, scale_down_window = 300,
    panic_threshold = 2.0, panic_window = 6, cooldown = 5, max_scale_up_rate = 2.0, max_step_up = 4,
    max_scale_down_rate = 2.0, provision_timeout = 60, decisions = 100, idle_window = 300,
    utilization = { target = 0.7, hold = 0 },
    rps = { hold = 0 },
    latency = { percentile = "p99", hold = 0 },
    error_rate = { hold = 0 },
    external = { hold = 0, interval = 5, timeout = 2 },
    reported = { metric = "utilization", hold = 0 },
    forecast = { alpha = 0.5, beta = 0.3 },
}

local RANGES = {
    interval = { 0.05, 60 }, min = { 0, 100000, true }, max = { 1, 100000, true }, tolerance = { 0, 10 },
    scale_up_window = { 0, 3600 }, scale_down_window = { 0, 3600 }, panic_threshold = { 1, 1000 },
    panic_window = { 0, 3600 }, cooldown = { 0, 3600 }, max_scale_up_rate = { 1, 1000 },
    max_step_up = { 0, 100000, true }, max_scale_down_rate = { 1, 1000 }, provision_timeout = { 0.1, 86400 },
    decisions = { 1, 10000, true }, idle_window = { 1, 86400 },
}

-- Options of each signal: name = { range } (a string range lists the allowed values).
local SIGNAL_FIELDS = {
    utilization = { capacity = { 0.001, 1e9 }, target = { 0.01, 100 }, hold = { 0, 3600 } },
    rps = { target = { 0.001, 1e9 }, hold = { 0, 3600 } },
    latency = { target = { 0.000001, 3600 }, hold = { 0, 3600 }, percentile = "percentile" },
    error_rate = { target = { 0.0001, 1 }, hold = { 0, 3600 } },
    external = { target = { 1e-9, 1e12 }, hold = { 0, 3600 }, interval = { 0.1, 3600 }, timeout = { 0.01, 60 },
                 url = "url", query = "string" },
    reported = { target = { 1e-9, 1e12 }, hold = { 0, 3600 }, metric = "string" },
}
-- The option each signal cannot do without.
local REQUIRED = { utilization = "capacity", rps = "target", latency = "target", error_rate = "target",
                   external = "target", reported = "target" }

local function signal(path, name, v)
    if v == nil then
        return false
    end
    if type(v) ~= "table" then
        return fail(path, "must be a table (got %s)", type(v))
    end
    local fields = SIGNAL_FIELDS[name]
    local ok, err = known(path, v, fields)
    if not ok then
        return nil, err
    end
    local out = {}
    for k, d in pairs(_M.defaults[name]) do
        out[k] = d
    end
    for k, spec in pairs(fields) do
        local x = v[k]
        if x ~= nil then
            if spec == "percentile" then
                if not PERCENTILES[x] then
                    return fail(path .. "." .. k, "must be \"p50\", \"p90\", \"p99\" or \"p999\" (got %s)", show(x))
                end
                out[k] = x
            elseif spec == "url" then
                local u
                u, err = http.parse_url(x)
                if not u then
                    return fail(path .. "." .. k, "%s (got %s)", err, show(x))
                end
                out[k] = x:gsub("/+$", "")
            elseif spec == "string" then
                if type(x) ~= "string" or x == "" then
                    return fail(path .. "." .. k, "must be a non-empty string (got %s)", show(x))
                end
                out[k] = x
            else
                out[k], err = number(path .. "." .. k, x, spec[1], spec[2], spec[3])
                if not out[k] then
                    return nil, err
                end
            end
        end
    end
    if out[REQUIRED[name]] == nil then
        return fail(path .. "." .. REQUIRED[name], "is required")
    end
    if name == "external" and (not out.url or not out.query) then
        return fail(path, "needs url (a Prometheus server) and query (a PromQL expression)")
    end
    return out
end

-- out, err = scaler.validate(path, v): a complete copy with defaults filled in, false when v is nil.
function _M.validate(path, v)
    if v == nil then
        return false
    end
    if type(v) ~= "table" then
        return fail(path, "must be a table (got %s)", type(v))
    end
    local allowed = { actuator = true, forecast = true, hold = true }
    for k in pairs(RANGES) do
        allowed[k] = true
    end
    for k in pairs(SIGNAL_FIELDS) do
        allowed[k] = true
    end
    local ok, err = known(path, v, allowed)
    if not ok then
        return nil, err
    end
    local out = {}
    for k, r in pairs(RANGES) do
        out[k], err = number(path .. "." .. k, v[k] == nil and _M.defaults[k] or v[k], r[1], r[2], r[3])
        if not out[k] then
            return nil, err
        end
    end
    if out.min > out.max then
        return fail(path .. ".min", "must not be above max (%s > %s)", out.min, out.max)
    end
    local any = false
    for name in pairs(SIGNAL_FIELDS) do
        out[name], err = signal(path .. "." .. name, name, v[name])
        if out[name] == nil then
            return nil, err
        end
        any = any or out[name] ~= false
    end
    if not any then
        return fail(path, "needs at least one signal: utilization, rps, latency, error_rate, external or reported")
    end
    if v.forecast ~= nil then
        if type(v.forecast) ~= "table" then
            return fail(path .. ".forecast", "must be a table (got %s)", type(v.forecast))
        end
        ok, err = known(path .. ".forecast", v.forecast, { lead_time = true, alpha = true, beta = true })
        if not ok then
            return nil, err
        end
        if not out.rps then
            return fail(path .. ".forecast", "forecasts the request rate: needs the rps signal")
        end
        out.forecast = {}
        for k, r in pairs { lead_time = { 0.001, 3600 }, alpha = { 0.01, 1 }, beta = { 0.01, 1 } } do
            local x = v.forecast[k]
            if x == nil then
                x = _M.defaults.forecast[k]
            end
            if x == nil then
                return fail(path .. ".forecast." .. k, "is required")
            end
            out.forecast[k], err = number(path .. ".forecast." .. k, x, r[1], r[2])
            if not out.forecast[k] then
                return nil, err
            end
        end
    else
        out.forecast = false
    end
    out.actuator, err = actuator.validate(path .. ".actuator", v.actuator)
    if out.actuator == nil then
        return nil, err
    end
    if v.idle_window ~= nil and out.min > 0 then
        return fail(path .. ".idle_window", "scales to zero: needs min = 0 (got min = %s)", out.min)
    end
    out.hold, err = hold.validate(path .. ".hold", v.hold, out.min == 0)
    if out.hold == nil then
        return nil, err
    end
    return out
end

_M.validate_cluster = cluster.validate

----------------------------------------------------------------------------------------------------------------------

local lib, conf, index, dict
local services = {} -- name -> this worker's state of the service (engine handle, counters of the last tick)
local params, sig, dec -- FFI out-parameters, made by init

local function finite(v)
    if v == nil or v ~= v or v == huge or v == -huge then
        return nil
    end
    return v
end

-- scaler.init(lib, conf, index), from configure (init_by_lua*): raises when scaling is configured without its
-- shared dict.
function _M.init(library, configuration, upstream_index)
    lib, conf, index = library, configuration, upstream_index
    actuator.init(library)
    local any = false
    for _, u in pairs(conf.upstreams) do
        any = any or (u.scaling and true)
    end
    if not any then
        return true
    end
    params = ffi.new("autoscale_scaling_params_t")
    sig = ffi.new("autoscale_scaling_signals_t")
    dec = ffi.new("autoscale_scaling_decision_t")
    dict = ngx.shared[DICT]
    if not dict then
        return nil, "scaling needs `lua_shared_dict " .. DICT .. " 1m;` in the http block"
    end
    dict:add("boot", floor(ngx.now()))
    return true
end

local function new_engine(s)
    -- zero is reached by the idle rule only (scaler.tick), never by the signals
    params.min_instances, params.max_instances = math.max(1, s.min), s.max
    params.capacity = s.utilization and s.utilization.capacity or 0
    local targets = {
        s.utilization and s.utilization.target or 0,
        s.rps and s.rps.target or 0,
        s.latency and s.latency.target * 1e6 or 0,
        s.error_rate and s.error_rate.target or 0,
        s.external and s.external.target or 0,
        s.reported and s.reported.target or 0,
    }
    for i, name in ipairs { "utilization", "rps", "latency", "error_rate", "external", "reported" } do
        params.targets[i - 1] = targets[i]
        params.hold_ms[i - 1] = s[name] and floor(s[name].hold * 1000) or 0
    end
    params.up_window_ms = floor(s.scale_up_window * 1000)
    params.down_window_ms = floor(s.scale_down_window * 1000)
    params.panic_window_ms = floor(s.panic_window * 1000)
    params.cooldown_ms = floor(s.cooldown * 1000)
    params.max_step_up = s.max_step_up
    params.forecast_lead_ms = s.forecast and floor(s.forecast.lead_time * 1000) or 0
    params.tolerance = s.tolerance
    params.panic_threshold = s.panic_threshold
    params.max_up_rate = s.max_scale_up_rate
    params.max_down_rate = s.max_scale_down_rate
    params.forecast_alpha = s.forecast and s.forecast.alpha or 0.5
    params.forecast_beta = s.forecast and s.forecast.beta or 0.3
    local out = ffi.new("autoscale_scaler_t*[1]")
    local rc = lib.autoscale_scaler_new(params, out)
    if rc ~= 0 then
        return nil, "autoscale_scaler_new failed (code " .. rc .. ")"
    end
    return ffi.gc(out[0], lib.autoscale_scaler_free)
end

-- This gateway's demand for service `name`: what its peers show now.
local function measure(name, svc, s)
    local st = require("resty.autoscale.status").upstream(name)
    local d = { ready = 0, inflight = 0, requests = 0, failures = 0, held = s.hold and hold.held(name) or 0 }
    if not st then
        return d
    end
    local total, lat, lat_weight = 0, 0, 0
    local pct = s.latency and s.latency.percentile
    for _, p in ipairs(st.peers) do
        if p.state ~= "draining" and p.state ~= "retired" then
            d.ready = d.ready + 1
        end
        d.inflight = d.inflight + p.inflight
        d.requests = d.requests + p.requests
        d.failures = d.failures + p.failures
        total = total + p.totals.requests
        if pct and p[pct] and p.requests > 0 then
            lat = lat + p[pct] * p.requests
            lat_weight = lat_weight + p.requests
        end
    end
    ngx.update_time()
    local now = ngx.now()
    if svc.last_total and total >= svc.last_total and now > svc.last_t then
        d.rps = (total - svc.last_total) / (now - svc.last_t)
    end
    svc.last_total, svc.last_t = total, now
    d.latency = lat_weight > 0 and lat / lat_weight or nil
    d.error_rate = d.requests > 0 and d.failures / d.requests or nil
    if svc.external and now - svc.external_t <= 3 * s.external.interval then
        d.external = svc.external
    end
    -- Backend-reported load: the sum over the healthy peers with a usable report (this gateway's view of the same
    -- backends every gateway sees, so it is not added up across gateways).
    local rep = s.reported and st.reported
    if rep then
        if s.reported.metric == "utilization" then
            d.reported = rep.count > 0 and rep.sum or nil
        else
            d.reported = rep.named_count > 0 and rep.named_sum or nil
        end
    end
    return d
end

-- The whole cluster's demand from the demands of every live gateway.
local function aggregate(own, demands)
    local a = { ready = own.ready, external = own.external, reported = own.reported, inflight = 0, requests = 0, failures = 0,
                gateways = 0, held = 0 }
    local rps, lat
    for _, d in ipairs(demands) do
        a.gateways = a.gateways + 1
        a.inflight = a.inflight + (d.inflight or 0)
        a.requests = a.requests + (d.requests or 0)
        a.failures = a.failures + (d.failures or 0)
        a.held = a.held + (tonumber(d.held) or 0)
        if d.rps then
            rps = (rps or 0) + d.rps
        end
        if d.latency and (not lat or d.latency > lat) then
            lat = d.latency
        end
    end
    a.rps, a.latency = rps, lat
    a.error_rate = a.requests > 0 and a.failures / a.requests or nil
    return a
end

local function why(r)
    local reason = r.reason
    if reason == "scale_up" or reason == "scale_down" then
        local unit = r.signal == "latency" and " s" or ""
        return format("%s %.4g%s vs target %.4g%s%s", r.signal or "bounds", r.value or 0, unit, r.target or 0, unit,
                      r.panic and " (panic)" or "")
    end
    return ({
        steady = "no change: every signal within tolerance of its target",
        holding = "no change: " .. tostring(r.signal) .. " is off target for less than its hold time",
        up_window = "no change: the scale-up window still holds a lower recommendation",
        stabilizing = "no change: a recommendation of at least the current count is within the scale-down window",
        cooldown = "no change yet: cooldown after the last action",
        panic = "no change: no scale-down while panicking",
        bounded = "no change: min/max instances or the step limits",
        no_data = "no change: no signal has data",
        follower = "decided by the leader " .. tostring(r.leader),
        zero = "no change: scaled to zero and nothing held",
        idle = "no request for idle_window: scale to zero",
        activate = "requests held (or external demand) with no ready peer: scale from zero",
        held = "requests held: more instances than the signals ask for",
    })[reason] or reason
end

local function record(name, s, r)
    local seq = dict:incr("decseq:" .. name, 1, 0)
    r.seq = seq
    dict:set(format("dec:%s:%d", name, seq % s.decisions), cjson.encode(r) or "{}")
    dict:incr("decisions:" .. name, 1, 0)
    local state = {
        service = name, desired = r.desired, current = r.current, ready = r.ready, mode = r.mode,
        leader = r.leader, fencing_token = r.fencing_token, panic = r.panic, reason = r.reason, why = r.why,
        time = r.time, seq = seq,
    }
    dict:set("state:" .. name, cjson.encode(state) or "{}")
end

-- Scale-from-zero episodes: one `activating` event when the first instance is asked for, then `activated` (with the
-- time from the first held request to the first ready peer) or `activation_failed`, each once across all workers
-- (the episode key is taken by whoever ends it first): events of the library's ring (the event log,
-- autoscale.events(), the dashboard, autoscale_events_total). The last MAX_EPISODES, with more detail, are kept for
-- the status.
local MAX_EPISODES = 20
local EPISODE_KINDS = { activating = { 0, "desired", "held" }, activated = { 1, "cold_start", "ready" },
                        activation_failed = { 2, "attempts", "retry_in" } }

local function episode_event(name, e)
    e.service = name
    local seq = dict:incr("episeq:" .. name, 1, 0)
    dict:set(format("episode:%s:%d", name, seq % MAX_EPISODES), cjson.encode(e))
    local k = EPISODE_KINDS[e.event]
    lib.autoscale_event_activation(index[name], k[1], tonumber(e[k[2]]) or 0, tonumber(e[k[3]]) or 0)
end

-- Ends the open episode of `name` with `event`; true for the one caller that ended it.
local function episode_end(name, event, extra)
    local t0 = dict:get("episode:" .. name)
    if not t0 or not dict:add(format("episode_end:%s:%.3f", name, t0), true, 3600) then
        return false
    end
    dict:delete("episode:" .. name)
    ngx.update_time()
    local e = extra or {}
    e.event, e.started = event, t0
    if event == "activated" then
        e.cold_start = ngx.now() - t0
        dict:set("cold_start_last:" .. name, e.cold_start)
        dict:incr("cold_start_count:" .. name, 1, 0)
        dict:incr("cold_start_sum_ms:" .. name, floor(e.cold_start * 1000 + 0.5), 0)
    else
        dict:incr("activation_failures:" .. name, 1, 0)
    end
    episode_event(name, e)
    return true
end

-- scaler.activated(name, ready): called when a peer of `name` is ready (hold's watcher, the tick); ends an open
-- scale-from-zero episode with its `activated` event.
function _M.activated(name, ready)
    if dict and dict:get("episode:" .. name) then
        episode_end(name, "activated", { ready = ready })
    end
end

-- Runs the actuator for one decision in its own timer (the tick goes on meanwhile).
local function actuate(premature, name, s, call)
    if premature then
        return
    end
    local ok, err, attempts, unreachable = actuator.call(s.actuator, call)
    -- a refusal (4xx: a stale fencing token, a broken contract) is an answer; unreachable or 5xx opens an episode
    events.dependency(index[name], "actuator", ok or not unreachable)
    if ok then
        ngx_log(ngx_NOTICE, "resty.autoscale scaling: ", cjson.encode { event = "actuated", service = name,
                desired = call.desired, decision_id = call.decision_id, attempts = attempts })
    else
        dict:incr("failures:" .. name, 1, 0)
        -- nothing is coming: decide again from what serves once the cooldown has passed (not at every tick), and
        -- call the actuator again only then, even if the load grows meanwhile (a refused token stays refused)
        local wait = math.max(s.cooldown, s.interval)
        dict:set("pending:" .. name, call.desired, wait)
        dict:set("failed:" .. name, true, wait)
        ngx_log(ngx_ERR, "resty.autoscale scaling: ", cjson.encode { event = "actuator_failed", service = name,
                desired = call.desired, decision_id = call.decision_id, attempts = attempts, error = err })
        if call.current == 0 then -- held requests time out into the fallback; the tick tries again after `wait`
            episode_end(name, "activation_failed", { decision_id = call.decision_id, attempts = attempts,
                                                     error = err, retry_in = wait })
        end
    end
end

-- The action of decision `r` (r.action true): counted, one scale event, the pending capacity, the actuator call in
-- its own timer; or suppressed (the actuator failed less than the cooldown ago, or Redis is unreachable).
local function act(name, s, r, current, ready, mode, c, now)
    if r.action and r.reason == "activate" and not dict:add("activate_claim:" .. name, true, 1) then
        r.action, r.suppressed = false, "an activation is under way (another worker)"
    end
    if r.action then
        -- every gateway's discovery believes an empty answer at once after a decision for zero (discovery.lua)
        if r.desired == 0 then
            dict:set("to_zero:" .. name, true)
        else
            dict:delete("to_zero:" .. name)
        end
        local boot = dict:get("boot") or 0
        local seq = dict:incr("seq", 1, 0)
        r.decision_id = format("%s-%s-%d-%d", r.gateway or "gw", name, boot, seq)
        r.idempotency_key = format("%s-%d-%d-%d", name, r.fencing_token or 0, boot, seq)
        local may_act = mode == "local" or mode == "leader" or c.actuate_without_redis
        local up = r.desired > current
        if may_act and dict:get("failed:" .. name) then
            r.suppressed = "the actuator failed less than the cooldown ago"
            dict:incr("suppressed:" .. name, 1, 0)
        elseif may_act then
            dict:incr("actions:" .. name .. (up and ":up" or ":down"), 1, 0)
            -- one scale_up/scale_down event: the event log, autoscale.events() and the dashboard's timeline
            lib.autoscale_event_scale(index[name], current, r.desired, ready, r.panic and 1 or 0)
            dict:set("pending:" .. name, r.desired, s.provision_timeout)
            dict:set("pending_from:" .. name, ready, s.provision_timeout)
            if current == 0 and up then
                dict:add("episode:" .. name, now, s.provision_timeout) -- the first held request may have opened it
                episode_event(name, { event = "activating", desired = r.desired, held = r.inputs.held,
                                      decision_id = r.decision_id, since = dict:get("episode:" .. name) })
            end
            if s.actuator then
                local call = { service = name, current = current, desired = r.desired, reason = r.why,
                               decision_id = r.decision_id, idempotency_key = r.idempotency_key,
                               gateway = r.gateway or "gateway", fencing_token = r.fencing_token or 0, ts = now }
                local ok, terr = ngx.timer.at(0, actuate, name, s, call)
                if not ok then
                    ngx_log(ngx_ERR, "resty.autoscale scaling of ", name, ": cannot start the actuator: ", terr)
                end
            end
        else
            r.suppressed = "Redis unreachable and cluster.actuate_without_redis is false"
            dict:incr("suppressed:" .. name, 1, 0)
        end
    end
end

-- Instances wanted for `held` requests: at least one, more when they exceed what one instance carries
-- (utilization.capacity).
local function for_held(s, held)
    local cap = s.utilization and s.utilization.capacity
    return math.min(s.max, math.max(1, cap and math.ceil(held / cap) or 1))
end

-- The rules of scale to zero and of held demand, before the signals: true when they decided `r`.
local function zero_rule(name, s, r, demand, current, pending, now)
    local held = demand.held or 0
    r.inputs.held = held
    if s.min == 0 then
        -- the external signal (a queue's depth, say) is demand too: it keeps the service up and wakes it
        local ext = s.external and demand.external and demand.external > 0 and demand.external or 0
        if held > 0 or ext > 0 or (demand.inflight or 0) > 0 or (demand.rps or 0) > 0
                or not dict:get("active_at:" .. name) then
            dict:set("active_at:" .. name, now)
        end
        if current == 0 then
            local want = held > 0 and for_held(s, held) or 0
            if ext > 0 then
                want = math.max(want, math.min(s.max, math.ceil(ext / s.external.target)))
            end
            r.desired, r.action, r.reason = want, want > 0, want > 0 and "activate" or "zero"
            return true
        end
        if held == 0 and not pending and now - dict:get("active_at:" .. name) >= s.idle_window then
            r.desired, r.action, r.reason = 0, true, "idle"
            return true
        end
    end
    if held > 0 and for_held(s, held) > current then
        r.desired, r.action, r.reason = for_held(s, held), true, "held"
        return true
    end
    return false
end

local function tick(name, s, svc)
    local idx = index[name]
    if lib.autoscale_check_lease(idx, floor(math.max(3 * s.interval, 1) * 1000)) ~= 1 then
        svc.holder = false
        return
    end
    svc.holder = true
    if not svc.engine then
        local err
        svc.engine, err = new_engine(s)
        if not svc.engine then
            ngx_log(ngx_ERR, "resty.autoscale scaling of ", name, ": ", err)
            return
        end
    end
    local own = measure(name, svc, s)
    local c = conf.cluster
    local mode, view, demand, err = "local", nil, own, nil
    if c then
        -- while Redis fails, ask it again after 0.5, 1, 2, 2, ... s rather than every tick (each failure is a
        -- line in the error log)
        local ask = (svc.redis_retry or 0) <= ngx.now()
        if ask then
            view, err = cluster.exchange(c, name, own)
        else
            err = svc.redis_err
        end
        if ask then
            events.dependency(index[name], "redis", view ~= nil) -- one dependency_down/up event per episode
        end
        if view then
            svc.redis_failures, svc.redis_retry = 0, nil
        elseif ask then
            svc.redis_failures = (svc.redis_failures or 0) + 1
            svc.redis_err = err
            svc.redis_retry = ngx.now() + math.min(2, 0.25 * 2 ^ svc.redis_failures)
        end
        if view then
            mode = view.leader and "leader" or "follower"
            if view.leader then
                demand = aggregate(own, view.demands or { own })
            end
        else
            mode = "no_redis"
            if svc.mode ~= "no_redis" then
                ngx_log(ngx_WARN, "resty.autoscale scaling of ", name, ": deciding locally, ",
                        c.actuate_without_redis and "acting" or "not acting", ": ", err)
            end
        end
    end
    svc.mode = mode
    dict:set("mode:" .. name, mode, 3 * s.interval + 1) -- for scaler.wake in the other workers
    if view then
        dict:set("token:" .. name, view.token or 0, 3 * s.interval + 1)
    end
    if own.ready > 0 then
        _M.activated(name, own.ready)
    end

    -- Capacity asked for and not there yet counts as current until it comes or provision_timeout passes.
    local pending = dict:get("pending:" .. name)
    local from = dict:get("pending_from:" .. name) or pending
    if pending and ((pending >= from and own.ready >= pending) or (pending < from and own.ready <= pending)) then
        dict:delete("pending:" .. name)
        pending = nil
    end
    local current = pending or own.ready
    ngx.update_time()
    local now = ngx.now()
    local r = {
        time = now, service = name, mode = mode, gateway = c and c.gateway_id or nil, ready = own.ready,
        current = current, inputs = { inflight = demand.inflight, rps = finite(demand.rps),
        latency = finite(demand.latency), error_rate = finite(demand.error_rate), external = finite(demand.external),
        reported = finite(demand.reported), gateways = demand.gateways },
        leader = view and view.holder or nil, fencing_token = view and view.token or nil,
    }
    if mode == "follower" then
        local d = view.desired
        r.desired = d and d.desired or current
        r.reason, r.panic = "follower", d and d.panic or false
        r.why = why(r)
        record(name, s, r)
        return
    end

    if (s.hold or s.min == 0) and zero_rule(name, s, r, demand, current, pending, now) then
        r.why = why(r)
        act(name, s, r, current, own.ready, mode, c, now)
        if r.action or r.reason ~= svc.last_reason then
            ngx_log(r.action and ngx_WARN or ngx_NOTICE, "resty.autoscale scaling: ", cjson.encode(r))
        end
        svc.last_reason = r.reason
        record(name, s, r)
        if mode == "leader" then
            cluster.publish(c, name, { desired = r.desired, panic = false, seq = r.seq })
        end
        return
    end
    sig.current, sig.ready = current, own.ready
    sig.values[0] = s.utilization and demand.inflight or NAN
    sig.values[1] = s.rps and demand.rps or NAN
    sig.values[2] = s.latency and demand.latency and demand.latency * 1e6 or NAN
    sig.values[3] = s.error_rate and demand.error_rate or NAN
    sig.values[4] = s.external and demand.external or NAN
    sig.values[5] = s.reported and demand.reported or NAN
    local rc = lib.autoscale_scaler_decide(svc.engine, now * 1000, sig, dec)
    if rc ~= 0 then
        ngx_log(ngx_ERR, "resty.autoscale scaling of ", name, ": decide failed (code ", rc, ")")
        return
    end
    r.desired, r.action, r.reason = dec.desired, dec.action == 1, REASONS[dec.reason]
    r.signal = SIGNAL_NAMES[dec.signal]
    r.value, r.target = finite(dec.value), finite(dec.target)
    if r.signal == "latency" then
        r.value, r.target = r.value and r.value / 1e6, r.target and r.target / 1e6
    end
    r.recommendation, r.panic, r.forecast_rps = dec.recommendation, dec.panic == 1, finite(dec.forecast_rps)
    r.per_signal = {}
    for i = 0, 5 do
        if dec.per_signal[i] > 0 then
            r.per_signal[SIGNAL_NAMES[i]] = dec.per_signal[i]
        end
    end
    r.why = why(r)

    act(name, s, r, current, own.ready, mode, c, now)
    if r.action then
        ngx_log(ngx_WARN, "resty.autoscale scaling: ", cjson.encode(r))
    elseif r.reason ~= svc.last_reason then
        ngx_log(ngx_NOTICE, "resty.autoscale scaling: ", cjson.encode(r))
    end
    svc.last_reason = r.reason
    record(name, s, r)
    if mode == "leader" then
        local ok, perr = cluster.publish(c, name, { desired = r.desired, panic = r.panic, seq = r.seq })
        if not ok then
            ngx_log(ngx_WARN, "resty.autoscale scaling of ", name, ": ", perr)
        end
    end
end

-- Coming capacity: a pending action for at least one instance (a pending scale-down to 0 is not).
local function coming(name)
    local p = dict:get("pending:" .. name)
    return p and p > 0
end

-- The wake-up: a scale-from-zero decision made at once in the worker of the first held request (a zero-delay timer),
-- not at the scaler's next tick. Acts as the tick would: locally, or as the Redis leader; a follower leaves it to the
-- leader, which gets this gateway's held demand with its next exchange.
local function activate(premature, name)
    if premature then
        return
    end
    local s = conf.upstreams[name].scaling
    local c = conf.cluster
    local mode = c and dict:get("mode:" .. name) or "local"
    if not (mode == "local" or mode == "leader" or (mode == "no_redis" and c.actuate_without_redis)) then
        return
    end
    if coming(name) or hold.ready(name) > 0 then
        return
    end
    ngx.update_time()
    local now = ngx.now()
    local held = hold.held(name)
    local r = { time = now, service = name, mode = mode, gateway = c and c.gateway_id or nil, ready = 0, current = 0,
                inputs = { held = held }, wake = true, leader = mode == "leader" and c.gateway_id or nil,
                fencing_token = c and dict:get("token:" .. name) or nil }
    r.desired, r.action, r.reason = for_held(s, held), true, "activate"
    r.why = why(r)
    act(name, s, r, 0, 0, mode, c, now)
    ngx_log(ngx_WARN, "resty.autoscale scaling: ", cjson.encode(r))
    record(name, s, r)
    if mode == "leader" and r.action then
        cluster.publish(c, name, { desired = r.desired, panic = false, seq = r.seq })
    end
end

-- scaler.wake(name): from hold.wait, for every held request; the first one (no capacity coming, no recent failure)
-- opens the scale-from-zero episode and starts `activate` at once.
function _M.wake(name)
    if not dict then
        return
    end
    ngx.update_time()
    -- a held request is activity: the idle rule starts its window again (between two ticks it would not see it)
    dict:set("active_at:" .. name, ngx.now())
    if coming(name) or dict:get("failed:" .. name) then
        return
    end
    dict:add("episode:" .. name, ngx.now(), conf.upstreams[name].scaling.provision_timeout)
    if dict:add("waking:" .. name, true, 1) then
        local ok, err = ngx.timer.at(0, activate, name)
        if not ok then
            ngx_log(ngx_ERR, "resty.autoscale scaling of ", name, ": cannot wake the scaler: ", err)
        end
    end
end

-- v = scaler.external_value(body): the value of the first sample of a Prometheus instant-query answer
-- (`{"data":{"result":[{"value":[t,"v"]}]}}`), a finite number; nil for any other body.
function _M.external_value(body)
    local data = type(body) == "string" and cjson.decode(body)
    local result = type(data) == "table" and type(data.data) == "table" and data.data.result
    local v = type(result) == "table" and type(result[1]) == "table" and type(result[1].value) == "table"
              and tonumber(result[1].value[2])
    return v and finite(v) and v or nil
end

-- The external signal: one Prometheus instant query, its first sample's value.
local function fetch_external(name, s, svc)
    if not svc.holder then
        return
    end
    local e = s.external
    local status, body = http.request { url = e.url .. "/api/v1/query?query=" .. ngx.escape_uri(e.query),
                                        timeout = e.timeout, max_body = MAX_PROMETHEUS_BODY }
    local v = status == 200 and _M.external_value(body)
    events.dependency(index[name], "prometheus", status ~= nil)
    if v then
        ngx.update_time()
        svc.external, svc.external_t = v, ngx.now()
    else
        ngx_log(ngx_WARN, "resty.autoscale scaling of ", name, ": external query failed: ",
                tostring(status), " ", tostring(body):sub(1, 200))
    end
end

local function every(interval, fn, label)
    local busy = false
    return ngx.timer.every(interval, function(premature)
        if premature or busy then
            return
        end
        busy = true
        local ok, err = pcall(fn)
        busy = false
        if not ok then
            ngx_log(ngx_ERR, "resty.autoscale scaling: ", label, ": ", err)
        end
    end)
end

-- ok, err = scaler.start(): in every worker (init_worker); one timer per upstream with `scaling`.
function _M.start()
    if not dict then
        return true
    end
    for name, u in pairs(conf.upstreams) do
        local s = u.scaling
        if s then
            local svc = {}
            services[name] = svc
            local ok, err = every(s.interval, function() tick(name, s, svc) end, name)
            if ok and s.external then
                ok, err = every(s.external.interval, function() fetch_external(name, s, svc) end, name .. " external")
            end
            if not ok then
                return nil, err
            end
        end
    end
    return true
end

-- pending = scaler.pending(name): true while an action for upstream `name` is in flight or its new capacity is
-- awaited (until the serving peers reach the desired count or provision_timeout passes). Cheap: one shared-dict
-- read, usable in any phase.
-- Whether the last scaling decision for `name` was for zero instances: its sources' empty answer is then what was
-- asked for, not a registry's hiccup (discovery believes it without `empty_grace`).
function _M.scaled_to_zero(name)
    return dict ~= nil and dict:get("to_zero:" .. name) == true
end

function _M.pending(name)
    return dict ~= nil and dict:get("pending:" .. name) ~= nil
end

-- st = scaler.state(name): the latest decision state of upstream `name` (nil without scaling or before one).
function _M.state(name)
    local u = conf and conf.upstreams[name]
    if not (u and u.scaling and dict) then
        return nil
    end
    local st = cjson.decode(dict:get("state:" .. name) or "null")
    if type(st) ~= "table" then
        st = { service = name }
    end
    st.pending = _M.pending(name)
    st.decisions_total = dict:get("decisions:" .. name) or 0
    st.actions = { up = dict:get("actions:" .. name .. ":up") or 0, down = dict:get("actions:" .. name .. ":down") or 0 }
    st.actuator_failures = dict:get("failures:" .. name) or 0
    st.suppressed = dict:get("suppressed:" .. name) or 0
    if u.scaling.hold then
        -- held requests of this gateway (a KEDA metrics-api trigger can scale from zero on `held`)
        st.hold = hold.state(name)
        st.held = st.hold.held
        local n = dict:get("cold_start_count:" .. name) or 0
        st.cold_start = { last = dict:get("cold_start_last:" .. name), count = n,
                          sum = (dict:get("cold_start_sum_ms:" .. name) or 0) / 1000,
                          failures = dict:get("activation_failures:" .. name) or 0 }
        st.episodes = {}
        local last = dict:get("episeq:" .. name) or 0
        for seq = math.max(1, last - MAX_EPISODES + 1), last do
            st.episodes[#st.episodes + 1] = cjson.decode(dict:get(format("episode:%s:%d", name, seq % MAX_EPISODES))
                                                         or "null")
        end
    end
    st.actuator = u.scaling.actuator and u.scaling.actuator.type or "publish"
    return st
end

-- list = scaler.decisions(name, max): the most recent decisions (with their inputs), oldest first.
function _M.decisions(name, max)
    local u = conf and conf.upstreams[name]
    if not (u and u.scaling and dict) then
        return {}
    end
    local size = u.scaling.decisions
    local last = dict:get("decseq:" .. name) or 0
    local out = {}
    for seq = math.max(1, last - math.min(max or size, size) + 1), last do
        local r = cjson.decode(dict:get(format("dec:%s:%d", name, seq % size)) or "null")
        if type(r) == "table" and r.seq == seq then
            out[#out + 1] = r
        end
    end
    return out
end

local function names()
    local out = {}
    for name, u in pairs(conf and conf.upstreams or {}) do
        if u.scaling then
            out[#out + 1] = name
        end
    end
    sort(out)
    return out
end

-- autoscale.scaling_handler(), in content_by_lua*: the desired instances per service as JSON, for KEDA's
-- metrics-api scaler (valueLocation "desired" with ?service=name) or anyone else. `?decisions=n` adds the last n
-- decisions.
function _M.handler()
    local args = ngx.req.get_uri_args()
    local n = tonumber(args.decisions)
    local function one(name)
        local st = _M.state(name)
        if n then
            st.decisions = _M.decisions(name, n)
        end
        return st
    end
    local body
    ngx.header["Content-Type"] = "application/json"
    ngx.header["Cache-Control"] = "no-store"
    if args.service then
        if type(args.service) ~= "string" or not _M.state(args.service) then
            ngx.status = 404
            ngx.say(cjson.encode { error = "no service with scaling named " .. tostring(args.service) })
            return
        end
        body = one(args.service)
    else
        body = { services = {} }
        for _, name in ipairs(names()) do
            body.services[name] = one(name)
        end
    end
    -- actuator errors kept in decisions may quote a URL with its credentials
    ngx.say(cjson.encode(require("resty.autoscale.redact").value(body)))
end

-- The hold and scale-from-zero families of the services with scaling.hold, in Prometheus' text format.
local function hold_families(list)
    local sts = {}
    for _, name in ipairs(list) do
        local st = _M.state(name)
        if st.hold then
            sts[#sts + 1] = st
        end
    end
    if #sts == 0 then
        return ""
    end
    local out = {}
    local function family(metric, kind, help, fn)
        out[#out + 1] = format("# HELP %s %s\n# TYPE %s %s\n", metric, help, metric, kind)
        for _, st in ipairs(sts) do
            fn('upstream="' .. st.service .. '"', st.hold, st.cold_start)
        end
    end
    family("autoscale_hold_requests_total", "counter", "Held requests by outcome (released to a peer, timed out "
           .. "into the fallback, rejected at once: queue full).", function(l, h)
        for _, k in ipairs { "released", "timeouts", "rejected" } do
            out[#out + 1] = format("autoscale_hold_requests_total{%s,outcome=\"%s\"} %d\n", l, k, h[k])
        end
    end)
    family("autoscale_hold_seconds", "histogram", "Time requests were held.", function(l, h)
        local cum = 0
        for _, b in ipairs(h.histogram) do
            cum = cum + b.count
            out[#out + 1] = format("autoscale_hold_seconds_bucket{%s,le=\"%s\"} %d\n", l, tostring(b.le), cum)
        end
        out[#out + 1] = format("autoscale_hold_seconds_bucket{%s,le=\"+Inf\"} %d\nautoscale_hold_seconds_sum{%s} "
                               .. "%.3f\nautoscale_hold_seconds_count{%s} %d\n", l, h.seconds_count, l, h.seconds_sum,
                               l, h.seconds_count)
    end)
    family("autoscale_scaling_cold_start_seconds", "summary", "Time from the first held request to the first ready "
           .. "peer, per scale-from-zero episode.", function(l, _, cs)
        out[#out + 1] = format("autoscale_scaling_cold_start_seconds_sum{%s} %.3f\n"
                               .. "autoscale_scaling_cold_start_seconds_count{%s} %d\n", l, cs.sum, l, cs.count)
    end)
    family("autoscale_scaling_activation_failures_total", "counter", "Scale-from-zero episodes whose actuator "
           .. "failed.", function(l, _, cs)
        out[#out + 1] = format("autoscale_scaling_activation_failures_total{%s} %d\n", l, cs.failures)
    end)
    return concat(out)
end

-- text = scaler.prometheus(): the scaling families in Prometheus' text format ("" without scaling).
function _M.prometheus()
    local list = names()
    if #list == 0 or not dict then
        return ""
    end
    local families = {
        { "autoscale_scaling_desired_instances", "gauge", "Instances the service should have (for an HPA external metric: target averageValue 1).", "desired" },
        { "autoscale_scaling_current_instances", "gauge", "Instances asked for (serving, or being provisioned).", "current" },
        { "autoscale_scaling_ready_instances", "gauge", "Peers of the service taking traffic.", "ready" },
        { "autoscale_scaling_pending", "gauge", "1 while an action is in flight or its capacity is awaited.", "pending" },
        { "autoscale_scaling_panic", "gauge", "1 while the service is in the panic window.", "panic" },
        { "autoscale_scaling_leader", "gauge", "1 when this gateway decides for the service (the Redis leader, or alone).", "leader" },
        { "autoscale_scaling_decisions_total", "counter", "Decisions made (including no change).", "decisions_total" },
        { "autoscale_scaling_actions_total", "counter", "Scaling actions decided, by direction.", "actions" },
        { "autoscale_scaling_actuator_failures_total", "counter", "Actions whose actuator failed after all retries.", "actuator_failures" },
        { "autoscale_hold_requests", "gauge", "Requests held now while the service has no ready peer.", "held" },
    }
    local out = {}
    for _, f in ipairs(families) do
        out[#out + 1] = format("# HELP %s %s\n# TYPE %s %s\n", f[1], f[3], f[1], f[2])
        for _, name in ipairs(list) do
            local st = _M.state(name)
            local l = 'upstream="' .. name .. '"'
            local v = st[f[4]]
            if f[4] == "actions" then
                out[#out + 1] = format("%s{%s,direction=\"up\"} %d\n%s{%s,direction=\"down\"} %d\n", f[1], l, v.up,
                                       f[1], l, v.down)
            else
                if f[4] == "leader" then
                    v = st.mode == nil or st.mode == "local" or st.mode == "leader" or st.mode == "no_redis"
                end
                if type(v) == "boolean" then
                    v = v and 1 or 0
                end
                if v ~= nil then
                    out[#out + 1] = format("%s{%s} %s\n", f[1], l, tostring(v))
                end
            end
        end
    end
    out[#out + 1] = hold_families(list)
    return concat(out)
end

return _M
