-- Validation of the configuration table given to autoscale.configure().
--
-- Every value is checked before anything is applied; an error names the field path and the reason, e.g.
-- `upstreams.api.retries: must be an integer between 0 and 100 (got 1.5)`. Unknown fields are errors too, so that a
-- typo never silently falls back to a default. Peer addresses are checked by the library itself (one parser for all).

local type = type
local pairs = pairs
local next = next
local ipairs = ipairs
local tostring = tostring
local format = string.format
local floor = math.floor
local sort = table.sort
local tonumber = tonumber
local concat = table.concat

local _M = {}

-- Defaults, documented in README.md ("Options").
_M.defaults = {
    max_upstreams = 64,
    max_peers = 256,
    max_workers = 64,
    admission_rate_slots = 4096,
    window = { buckets = 10, bucket = 1 },
    upstream = {
        balancer = "peak_ewma",
        retries = 2,
        ewma_decay = 10,
        default_rtt = 0.03,
        slow_start = 10,
        slow_start_aggression = 1.0,
        slow_start_min_weight = 0.1,
        failure_penalty = 2.0,
        slow_peer_factor = 3.0,
        slow_peer_penalty = 10.0,
    },
    -- Envoy's outlier-detection defaults (times in seconds); 0 switches a trigger off.
    outlier = {
        consecutive_5xx = 5,
        consecutive_gateway_failures = 5,
        consecutive_timeouts = 3,
        base_ejection_time = 30,
        max_ejection_time = 300,
        ejection_jitter = 0,
        max_ejection_percent = 10,
        interval = 10,
        success_rate_stdev = 1.9,
        success_rate_min_hosts = 5,
        success_rate_request_volume = 100,
        failure_percentage = 0,
        failure_percentage_min_hosts = 5,
        failure_percentage_request_volume = 50,
        half_open_probes = 1,
        half_open_successes = 2,
        panic_threshold = 50,
    },
    healthcheck = {
        path = "/",
        interval = 2,
        timeout = 1,
        healthy = 2,
        unhealthy = 2,
        statuses = "200-399",
    },
    fallback = {
        status = 503,
        retry_after = 5,
    },
}

local OUTLIER_RANGES = {
    consecutive_5xx = { 0, 1000, true },
    consecutive_gateway_failures = { 0, 1000, true },
    consecutive_timeouts = { 0, 1000, true },
    base_ejection_time = { 0.001, 86400 },
    max_ejection_time = { 0.001, 86400 },
    ejection_jitter = { 0, 3600 },
    max_ejection_percent = { 0, 100, true },
    interval = { 0.01, 3600 },
    success_rate_stdev = { 0, 100 },
    success_rate_min_hosts = { 1, 65536, true },
    success_rate_request_volume = { 1, 1e9, true },
    failure_percentage = { 0, 100, true },
    failure_percentage_min_hosts = { 1, 65536, true },
    failure_percentage_request_volume = { 1, 1e9, true },
    half_open_probes = { 1, 1000, true },
    half_open_successes = { 1, 1000, true },
    panic_threshold = { 0, 100, true },
}

_M.balancers = { peak_ewma = 0, round_robin = 1, random = 2 }

local function fail(path, msg, ...)
    return nil, path .. ": " .. format(msg, ...)
end

local function show(v)
    if type(v) == "string" then
        return format("%q", v)
    end
    return tostring(v)
end

local function number(path, v, min, max, integer)
    if type(v) ~= "number" or v ~= v then
        return fail(path, "must be a number (got %s %s)", type(v), show(v))
    end
    if integer and floor(v) ~= v then
        return fail(path, "must be an integer between %s and %s (got %s)", min, max, show(v))
    end
    if v < min or v > max then
        return fail(path, "must be between %s and %s (got %s)", min, max, show(v))
    end
    return v
end

local function known(path, t, allowed)
    for k in pairs(t) do
        if allowed[k] == nil then
            local names = {}
            for name in pairs(allowed) do
                names[#names + 1] = name
            end
            sort(names)
            return fail(path .. "." .. tostring(k), "unknown option (valid: %s)", concat(names, ", "))
        end
    end
    return true
end

local TOP_NUMBERS = {
    max_upstreams = { 1, 4096 }, max_peers = { 1, 65536 }, max_workers = { 1, 1024 },
    admission_rate_slots = { 64, 1048576 },
}

local NUMBER_FIELDS = {
    retries = { 0, 100, true },
    ewma_decay = { 0.001, 3600 },
    default_rtt = { 0.000001, 60 },
    slow_start = { 0, 3600 },
    slow_start_aggression = { 0.01, 100 },
    slow_start_min_weight = { 0, 1 },
    failure_penalty = { 1, 1000 },
    slow_peer_penalty = { 1, 1e6 },
}

local UPSTREAM_FIELDS = {
    peers = true, balancer = true, retries = true, ewma_decay = true, default_rtt = true, slow_start = true,
    slow_start_aggression = true, slow_start_min_weight = true, failure_penalty = true, outlier = true,
    slow_peer_factor = true, slow_peer_penalty = true,
    failure_statuses = true, healthcheck = true, fallback = true, discovery = true, scaling = true,
    admission = true, reports = true,
}

-- A list of HTTP statuses: numbers and "lo-hi" ranges, e.g. { 500, "502-504" } or "500-599".
local function statuses(path, v)
    if type(v) ~= "table" then
        v = { v }
    end
    local out, set = {}, {}
    for i, item in ipairs(v) do
        local lo, hi
        if type(item) == "number" then
            lo, hi = item, item
        elseif type(item) == "string" then
            local a, b = item:match("^%s*(%d+)%s*%-%s*(%d+)%s*$")
            lo, hi = tonumber(a or item:match("^%s*(%d+)%s*$")), tonumber(b)
            hi = hi or lo
        end
        if not lo or floor(lo) ~= lo or floor(hi) ~= hi or lo < 100 or hi > 639 or lo > hi then
            return fail(format("%s[%d]", path, i), "must be an HTTP status (100-639) or a range \"lo-hi\" (got %s)",
                        show(item))
        end
        for st = lo, hi do
            if not set[st] then
                set[st] = true
                out[#out + 1] = st
            end
        end
    end
    if #out == 0 then
        return fail(path, "must list at least one status")
    end
    sort(out)
    return out
end
_M.statuses = statuses
_M.fail, _M.number, _M.known, _M.show = fail, number, known, show -- for the validators of other modules

local function section(path, v, defaults, ranges)
    if type(v) ~= "table" then
        return fail(path, "must be a table (got %s)", type(v))
    end
    local allowed = {}
    for k in pairs(defaults) do
        allowed[k] = true
    end
    local ok, err = known(path, v, allowed)
    if not ok then
        return nil, err
    end
    local out = {}
    for k, d in pairs(defaults) do
        local x = v[k]
        if x == nil then
            out[k] = d
        elseif ranges and ranges[k] then
            out[k], err = number(path .. "." .. k, x, ranges[k][1], ranges[k][2], ranges[k][3])
            if out[k] == nil then
                return nil, err
            end
        else
            out[k] = x
        end
    end
    return out
end

local function outlier(path, v)
    local d = _M.defaults.outlier
    if v == false then -- every trigger off; panic mode is kept
        local out = {}
        for k, x in pairs(d) do
            out[k] = x
        end
        out.consecutive_5xx, out.consecutive_gateway_failures, out.consecutive_timeouts = 0, 0, 0
        out.success_rate_stdev, out.failure_percentage = 0, 0
        return out
    end
    local out, err = section(path, v == nil and {} or v, d, OUTLIER_RANGES)
    if not out then
        return nil, err
    end
    if out.max_ejection_time < out.base_ejection_time then
        return fail(path .. ".max_ejection_time", "must not be less than base_ejection_time (%s < %s)",
                    out.max_ejection_time, out.base_ejection_time)
    end
    return out
end

local function healthcheck(path, v)
    if v == nil or v == false then
        return false
    end
    local out, err = section(path, v, _M.defaults.healthcheck, {
        interval = { 0.05, 3600 }, timeout = { 0.001, 60 }, healthy = { 1, 100, true }, unhealthy = { 1, 100, true },
    })
    if not out then
        return nil, err
    end
    if type(out.path) ~= "string" or out.path:sub(1, 1) ~= "/" or out.path:find("[%s%c]") then
        return fail(path .. ".path", "must be an absolute path without spaces (got %s)", show(out.path))
    end
    if out.timeout >= out.interval then
        return fail(path .. ".timeout", "must be shorter than interval (%s >= %s)", out.timeout, out.interval)
    end
    local list
    list, err = statuses(path .. ".statuses", out.statuses)
    if not list then
        return nil, err
    end
    out.statuses = list -- for display
    out.pass = {}        -- for lookup
    for _, st in ipairs(list) do
        out.pass[st] = true
    end
    return out
end

local function fallback(path, v)
    if v == nil then
        return { status = _M.defaults.fallback.status, retry_after = _M.defaults.fallback.retry_after }
    end
    if type(v) ~= "table" then
        return fail(path, "must be a table (got %s)", type(v))
    end
    local ok, err = known(path, v, { status = true, headers = true, body = true, upstream = true, retry_after = true })
    if not ok then
        return nil, err
    end
    local out = { upstream = v.upstream, body = v.body, headers = {} }
    out.status, err = number(path .. ".status", v.status or _M.defaults.fallback.status, 200, 599, true)
    if not out.status then
        return nil, err
    end
    out.retry_after, err = number(path .. ".retry_after", v.retry_after or _M.defaults.fallback.retry_after, 0, 86400,
                                  true)
    if not out.retry_after then
        return nil, err
    end
    if v.body ~= nil and type(v.body) ~= "string" then
        return fail(path .. ".body", "must be a string (got %s)", type(v.body))
    end
    if v.upstream ~= nil and type(v.upstream) ~= "string" then
        return fail(path .. ".upstream", "must be the name of another upstream (got %s)", type(v.upstream))
    end
    if v.headers ~= nil then
        if type(v.headers) ~= "table" then
            return fail(path .. ".headers", "must be a table of name = value (got %s)", type(v.headers))
        end
        for name, value in pairs(v.headers) do
            if type(name) ~= "string" or not name:find("^[%w%-]+$") then
                return fail(path .. ".headers", "header names are letters, digits and '-' (got %s)", show(name))
            end
            if type(value) ~= "string" or value:find("[\r\n]") then
                return fail(path .. ".headers." .. name, "must be a one-line string")
            end
            out.headers[name] = value
        end
    end
    return out
end

local function peer(path, p)
    if type(p) == "string" then
        return { addr = p, weight = 1 }
    end
    if type(p) ~= "table" then
        return fail(path, "must be \"host:port\" or { addr = \"host:port\", weight = n } (got %s)", type(p))
    end
    local ok, err = known(path, p, { addr = true, weight = true })
    if not ok then
        return nil, err
    end
    if type(p.addr) ~= "string" then
        return fail(path .. ".addr", "must be a string \"host:port\" (got %s)", type(p.addr))
    end
    local w = 1
    if p.weight ~= nil then
        w, err = number(path .. ".weight", p.weight, 1, 10000, true)
        if not w then
            return nil, err
        end
    end
    return { addr = p.addr, weight = w }
end

-- errs, check = collector(): check(v, err) keeps err when v is nil and returns v, so that validation goes on.
local function collector()
    local errs = {}
    return errs, function(v, err)
        if v == nil then
            errs[#errs + 1] = err
        end
        return v
    end
end

local function upstream(path, u)
    if type(u) ~= "table" then
        return fail(path, "must be a table (got %s)", type(u))
    end
    -- Every section is checked, so that one run names every wrong field (errs: one line each).
    local errs, check = collector()
    check(known(path, u, UPSTREAM_FIELDS))
    local d = _M.defaults.upstream
    local out = {}
    local balancer = u.balancer == nil and d.balancer or u.balancer
    if _M.balancers[balancer] == nil then
        check(fail(path .. ".balancer", "must be \"peak_ewma\", \"round_robin\" or \"random\" (got %s)", show(balancer)))
    end
    out.balancer = balancer
    local spf = u.slow_peer_factor
    if spf == nil then
        out.slow_peer_factor = d.slow_peer_factor
    elseif spf == 0 then
        out.slow_peer_factor = 0
    else
        local v, err = number(path .. ".slow_peer_factor", spf, 1.1, 1000)
        out.slow_peer_factor = check(v, err and err .. " (or 0 to switch the rule off)")
    end
    for _, field in ipairs { "retries", "ewma_decay", "default_rtt", "slow_start", "slow_start_aggression",
                             "slow_start_min_weight", "failure_penalty", "slow_peer_penalty" } do
        local spec = NUMBER_FIELDS[field]
        local v = u[field]
        if v == nil then
            out[field] = d[field]
        else
            out[field] = check(number(path .. "." .. field, v, spec[1], spec[2], spec[3]))
        end
    end
    out.outlier = check(outlier(path .. ".outlier", u.outlier))
    out.failure_statuses = check(statuses(path .. ".failure_statuses", u.failure_statuses or "500-599"))
    out.healthcheck = check(healthcheck(path .. ".healthcheck", u.healthcheck))
    out.fallback = check(fallback(path .. ".fallback", u.fallback))
    out.discovery = check(require("resty.autoscale.discovery").validate(path .. ".discovery", u.discovery, u.peers))
    out.admission = check(require("resty.autoscale.admission").validate(path .. ".admission", u.admission))
    out.scaling = check(require("resty.autoscale.scaler").validate(path .. ".scaling", u.scaling))
    out.reports = check(require("resty.autoscale.reports").validate(path .. ".reports", u.reports))
    local sr = out.scaling and out.scaling.reported
    if sr and out.reports ~= nil then
        if not out.reports or not out.reports.header then
            check(fail(path .. ".scaling.reported", "needs reports (a load header to read)"))
        elseif sr.metric ~= "utilization" and (out.reports.format ~= "orca"
                or (out.reports.metric ~= "utilization" and out.reports.metric ~= sr.metric)) then
            check(fail(path .. ".scaling.reported.metric", "%s is not a named metric the reports read (reports.metric %s)",
                       show(sr.metric), show(out.reports.metric)))
        end
    end
    if out.scaling and out.scaling.hold and out.fallback and out.fallback.upstream then
        -- the balancer sends a request with no peer to the fallback upstream at once: nothing is left to hold
        if type(u.scaling) == "table" and u.scaling.hold ~= nil then
            check(fail(path .. ".scaling.hold", "cannot hold requests that fallback.upstream takes at once (remove one)"))
        else
            out.scaling.hold = false
        end
    end
    if out.scaling and out.scaling.actuator and out.scaling.actuator.type == "standby" and out.discovery ~= nil
            and not (out.discovery and out.discovery.standby) then
        check(fail(path .. ".scaling.actuator.type", "\"standby\" needs discovery.standby (the pool it activates)"))
    end
    if type(u.peers) ~= "table" or #u.peers == 0 then
        check(fail(path .. ".peers", "must be a non-empty list of peers"))
    else
        local listed = true
        for k in pairs(u.peers) do
            if type(k) ~= "number" or k < 1 or k > #u.peers or floor(k) ~= k then
                check(fail(path .. ".peers", "must be a list (found key %s)", show(k)))
                listed = false
                break
            end
        end
        if listed then
            out.peers = {}
            for i, p in ipairs(u.peers) do
                out.peers[i] = check(peer(format("%s.peers[%d]", path, i), p))
            end
        end
    end
    if #errs > 0 then
        return nil, concat(errs, "\n")
    end
    return out
end

-- conf, err = config.validate(conf)
-- Returns a new, complete table (defaults filled in), or nil and the reason: every wrong field found, one line each
-- ("<field path>: <reason>"), so that one run names them all.
function _M.validate(conf)
    if type(conf) ~= "table" then
        return fail("configuration", "must be a table (got %s)", type(conf))
    end
    local errs, check = collector()
    local ok, err = known("configuration", conf, {
        upstreams = true, max_upstreams = true, max_peers = true, max_workers = true, window = true, lib_path = true,
        event_log = true, cluster = true, admission_rate_slots = true,
    })
    if not ok then
        check(nil, (err:gsub("^configuration%.", "")))
    end
    local d = _M.defaults
    local out = {}
    for _, field in ipairs { "max_upstreams", "max_peers", "max_workers", "admission_rate_slots" } do
        local spec = TOP_NUMBERS[field]
        local v = conf[field]
        if v == nil then
            out[field] = d[field]
        else
            out[field] = check(number(field, v, spec[1], spec[2], true))
        end
    end
    local slots, p2 = out.admission_rate_slots, 64
    if slots then
        while p2 < slots do
            p2 = p2 * 2
        end
        if p2 ~= slots then
            check(fail("admission_rate_slots", "must be a power of two (got %s)", tostring(slots)))
        end
    end
    if conf.lib_path ~= nil and type(conf.lib_path) ~= "string" then
        check(fail("lib_path", "must be a string (got %s)", type(conf.lib_path)))
    end
    out.lib_path = conf.lib_path
    out.raw = conf -- what the user wrote, for control.tune
    if conf.event_log ~= nil and (type(conf.event_log) ~= "string" or conf.event_log == "") then
        check(fail("event_log", "must be a file path (got %s)", show(conf.event_log)))
    end
    out.event_log = conf.event_log
    out.cluster = check(require("resty.autoscale.scaler").validate_cluster(conf.cluster))
    local w = conf.window or {}
    out.window = {}
    if type(w) ~= "table" then
        check(fail("window", "must be a table (got %s)", type(w)))
    elseif check(known("window", w, { buckets = true, bucket = true })) then
        out.window.buckets = check(number("window.buckets", w.buckets or d.window.buckets, 1, 600, true))
        out.window.bucket = check(number("window.bucket", w.bucket or d.window.bucket, 0.01, 60))
    end
    if type(conf.upstreams) ~= "table" or next(conf.upstreams) == nil then
        check(fail("upstreams", "must be a table of at least one upstream, keyed by name"))
    else
        out.upstreams = {}
        local names = {}
        for name in pairs(conf.upstreams) do
            names[#names + 1] = name
        end
        sort(names, function(a, b) return tostring(a) < tostring(b) end)
        local valid = true
        for _, name in ipairs(names) do
            local u = conf.upstreams[name]
            if type(name) ~= "string" or #name == 0 or #name > 63 or name:find("[^%w_%-%.]") then
                check(fail("upstreams." .. tostring(name),
                           "upstream names are 1 to 63 characters of letters, digits, '_', '-' and '.'"))
                valid = false
            else
                out.upstreams[name] = check(upstream("upstreams." .. name, u))
                valid = valid and out.upstreams[name] ~= nil
            end
        end
        if valid then
            for _, name in ipairs(names) do
                local fb = out.upstreams[name].fallback.upstream
                if fb ~= nil and (fb == name or not out.upstreams[fb]) then
                    check(fail("upstreams." .. name .. ".fallback.upstream",
                               "must name another configured upstream (got %s)", show(fb)))
                end
            end
        end
    end
    if #errs > 0 then
        return nil, concat(errs, "\n")
    end
    return out
end

return _M
