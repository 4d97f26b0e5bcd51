-- Backend-reported load (docs/reports.md): per upstream, a load report read from a response header of each attempt
-- (ORCA `endpoint-load-metrics` in TEXT or JSON form, or a plain value such as `X-Load: 0.73`), `Retry-After`
-- back-pressure on 429 and 503, and agent answers polled by the active health check's worker. Parsing, storage and
-- the cost they give are in the library; this module validates the options, hands them over, and reads the headers
-- in the log phase.

local ffi = require "ffi"
local config = require "resty.autoscale.config"

local var = ngx.var
local type = type
local pairs = pairs
local tonumber = tonumber
local tostring = tostring
local band = bit.band
local floor = math.floor
local fail, number, known, show = config.fail, config.number, config.known, config.show

local _M = {}

_M.defaults = {
    header = "endpoint-load-metrics",
    format = nil, -- "orca" for endpoint-load-metrics, else "value"
    metric = "utilization",
    blackout = 10,
    expiry = 180,
    scale = 100,
    smoothing = 0.5,
    error_penalty = 1.0,
    retry_after = true,
    retry_after_max = 1,
    backpressure_penalty = 1000,
}

local RANGES = {
    blackout = { 0, 3600 }, smoothing = { 0, 3600 }, expiry = { 0.001, 86400 }, scale = { 0, 1e6 }, error_penalty = { 0, 1e6 },
    retry_after_max = { 0, 3600 }, backpressure_penalty = { 1, 1e12 },
}

local FIELDS = { header = true, format = true, metric = true, retry_after = true, poll = true }

local POLL_DEFAULTS = { path = "/load", format = "agent", interval = 2, timeout = 1 }
local POLL_FORMATS = { agent = 0, json = 1, prometheus = 2 }
local MAX_BODY = 65536

-- The `poll` section: a load endpoint (or agent) on every peer, polled by the worker holding the upstream's lease.
local function poll(path, v)
    if v == nil or v == false then
        return false
    end
    if type(v) ~= "table" then
        return fail(path, "must be a table or false (got %s)", type(v))
    end
    local ok, err = known(path, v, { path = true, format = true, field = true, interval = true, timeout = true,
                                     port = true })
    if not ok then
        return nil, err
    end
    local out = {}
    for k, d in pairs(POLL_DEFAULTS) do
        out[k] = v[k] == nil and d or v[k]
    end
    out.field, out.port = v.field, v.port
    for k, r in pairs { interval = { 0.05, 3600 }, timeout = { 0.001, 60 } } do
        local x
        x, err = number(path .. "." .. k, out[k], r[1], r[2])
        if x == nil then
            return nil, err
        end
    end
    if out.timeout >= out.interval then
        return fail(path .. ".timeout", "must be shorter than interval (%s >= %s)", out.timeout, out.interval)
    end
    if out.port ~= nil then
        local x
        x, err = number(path .. ".port", out.port, 1, 65535, true)
        if x == nil then
            return nil, err
        end
    end
    if type(out.path) ~= "string" or out.path:sub(1, 1) ~= "/" or out.path:find("[%s%c]") then
        return fail(path .. ".path", "must be an absolute path without spaces (got %s)", show(out.path))
    end
    if POLL_FORMATS[out.format] == nil then
        return fail(path .. ".format", "must be \"agent\", \"json\" or \"prometheus\" (got %s)", show(out.format))
    end
    if out.format ~= "agent" and (type(out.field) ~= "string" or out.field == "" or #out.field > 200) then
        return fail(path .. ".field", "is required for format %s: the JSON field (a.b.c) or metric to read (got %s)",
                    out.format, show(out.field))
    end
    out.field = out.field or ""
    return out
end
for k in pairs(RANGES) do
    FIELDS[k] = true
end

-- The nginx variable of a response header: $upstream_http_<name, lower case, '-' as '_'>.
local function header_var(name)
    return "upstream_http_" .. name:lower():gsub("-", "_")
end

-- out, err = reports.validate(path, v): `v` as given under `upstreams.<name>.reports` (nil/false: off).
function _M.validate(path, v)
    if v == nil or v == false then
        return false
    end
    if type(v) ~= "table" then
        return fail(path, "must be a table or false (got %s)", type(v))
    end
    local ok, err = known(path, v, FIELDS)
    if not ok then
        return nil, err
    end
    local out = {}
    for k, d in pairs(_M.defaults) do
        out[k] = v[k] == nil and d or v[k]
    end
    for k, r in pairs(RANGES) do
        local x
        x, err = number(path .. "." .. k, out[k], r[1], r[2])
        if x == nil then
            return nil, err
        end
    end
    if out.header ~= false and (type(out.header) ~= "string" or not out.header:match("^[%w%-_]+$")
            or #out.header > 64) then
        return fail(path .. ".header", "must be a header name of letters, digits, '-' and '_' or false (got %s)",
                    show(out.header))
    end
    if type(out.retry_after) ~= "boolean" then
        return fail(path .. ".retry_after", "must be true or false (got %s)", show(out.retry_after))
    end
    if out.format == nil then
        out.format = (out.header and out.header:lower() == "endpoint-load-metrics") and "orca" or "value"
    end
    if out.format ~= "orca" and out.format ~= "value" then
        return fail(path .. ".format", "must be \"orca\" or \"value\" (got %s)", show(out.format))
    end
    if type(out.metric) ~= "string" or not out.metric:match("^[%w_%.%-]+$") or #out.metric > 63 then
        return fail(path .. ".metric", "must be \"utilization\" or a named metric (got %s)", show(out.metric))
    end
    if out.format == "value" and out.metric ~= "utilization" then
        return fail(path .. ".metric", "needs format \"orca\" (a plain value has no named metrics)")
    end
    out.poll, err = poll(path .. ".poll", v.poll)
    if out.poll == nil then
        return nil, err
    end
    if not out.header and not out.retry_after and not out.poll then
        return fail(path, "reads nothing: set header, retry_after or poll")
    end
    out.var = out.header and header_var(out.header)
    return out
end

local lib
local by_index = {} -- upstream index -> validated reports table
local spec = ffi.new("autoscale_reports_spec_t")
local REPORT_FINISHED

local function ms(s)
    return floor(s * 1000 + 0.5)
end

-- Hands every upstream's settings to the library (off for those without `reports`); returns whether any reads them.
function _M.init(library, conf, index)
    lib = library
    REPORT_FINISHED = lib.AUTOSCALE_REPORT_FINISHED
    by_index = {}
    local any = false
    for name, u in pairs(conf.upstreams) do
        local r, idx = u.reports, index[name]
        if r then
            any = true
            by_index[idx] = r
            spec.enabled = (r.header or (r.poll and r.poll.format ~= "agent")) and 1 or 0
            spec.backpressure = r.retry_after and 1 or 0
            spec.agent = (r.poll and r.poll.format == "agent") and 1 or 0
            spec.kind = r.format == "value" and 2 or (r.metric == "utilization" and 0 or 1)
            spec.blackout_ms, spec.expiry_ms, spec.backpressure_max_ms = ms(r.blackout), ms(r.expiry), ms(r.retry_after_max)
            spec.smoothing_ms = ms(r.smoothing)
            spec.backpressure_penalty, spec.scale, spec.error_penalty = r.backpressure_penalty, r.scale, r.error_penalty
            -- The named metric read: the one the cost uses, else the one scaling uses.
            local sr = u.scaling and u.scaling.reported
            local named = r.metric ~= "utilization" and r.metric or (sr and sr.metric ~= "utilization" and sr.metric) or ""
            spec.named, spec.named_len = named, #named
            lib.autoscale_upstream_reports(idx, spec)
        else
            lib.autoscale_upstream_reports(idx, nil)
        end
    end
    return any
end

-- In the log phase (called by balancer.log only when some upstream reads reports): hands the load header and the
-- Retry-After of the last attempt to the library. Returns true when the library finished the request itself.
function _M.log(r, status)
    local idx = lib.autoscale_request_upstream(r)
    local rep = by_index[idx]
    if not rep then
        return false
    end
    local h = rep.var and var[rep.var]
    if type(h) ~= "string" then
        h = nil
    end
    local ra
    if rep.retry_after and (status == 429 or status == 503) then
        ra = var.upstream_http_retry_after
        if type(ra) ~= "string" then
            ra = nil
        end
    end
    if not h and not ra then
        return false
    end
    local rc = lib.autoscale_log_report(r, status, h, h and #h or 0, ra, ra and #ra or 0)
    return rc > 0 and band(rc, REPORT_FINISHED) ~= 0
end

-- One poll of one peer: GET path, the body of a 2xx answer (at most MAX_BODY bytes), else nil and why.
local function fetch(host, port, p)
    local sock = ngx.socket.tcp()
    sock:settimeout(p.timeout * 1000)
    local ok, err = sock:connect(host, p.port or port)
    if not ok then
        return nil, err
    end
    local bracket = host:find(":", 1, true) and ("[" .. host .. "]") or host
    ok, err = sock:send("GET " .. p.path .. " HTTP/1.0\r\nHost: " .. bracket
                        .. "\r\nUser-Agent: resty.autoscale load poll\r\nConnection: close\r\n\r\n")
    local line = ok and sock:receive("*l")
    local status = line and tonumber(line:match("^HTTP/%d%.%d (%d%d%d)"))
    if not status or status < 200 or status > 299 then
        sock:close()
        return nil, "status " .. tostring(status or err)
    end
    repeat
        line, err = sock:receive("*l")
    until not line or line == ""
    if not line then
        sock:close()
        return nil, err
    end
    local parts, size = {}, 0
    while size <= MAX_BODY do
        local chunk, rerr, partial = sock:receive(4096)
        chunk = chunk or partial
        if chunk and #chunk > 0 then
            parts[#parts + 1] = chunk
            size = size + #chunk
        end
        if rerr then
            break
        end
    end
    sock:close()
    if size > MAX_BODY then
        return nil, "body over " .. MAX_BODY .. " bytes"
    end
    return table.concat(parts)
end

local function poll_round(idx, p)
    local format = POLL_FORMATS[p.format]
    require("resty.autoscale.healthcheck").each_peer(idx, p.interval * 3, fetch, p, function(slot, gen, ok, body)
        if ok and body then
            lib.autoscale_poll_result(slot, gen, format, body, #body, p.field, #p.field)
        end
    end)
end

-- Starts a polling timer per upstream that has `reports.poll`; called in each worker (by healthcheck.start).
function _M.start(conf, index)
    local hc = require "resty.autoscale.healthcheck"
    for name, u in pairs(conf.upstreams) do
        local p = u.reports and u.reports.poll
        if p then
            local ok, err = hc.every(p.interval, "load poll", name, poll_round, index[name], p)
            if not ok then
                return nil, err
            end
        end
    end
    return true
end

local peer_report = ffi.new("autoscale_peer_report_t")

local function num(x)
    if x ~= x then
        return nil -- NaN: not reported
    end
    return x
end

local AGENT_STATES = { [1] = "up", [2] = "drain", [3] = "maint" }

-- The reported values of peer record `slot` for status (nil when its upstream reads no reports).
function _M.peer(upstream_idx, slot)
    if not by_index[upstream_idx] or lib.autoscale_peer_report(slot, peer_report) ~= 0 then
        return nil
    end
    local p = peer_report
    return {
        load = num(p.load),
        cpu_utilization = num(p.cpu_utilization),
        application_utilization = num(p.application_utilization),
        rps_fractional = num(p.rps_fractional),
        eps = num(p.eps),
        named = num(p.named),
        age = p.age >= 0 and p.age or nil,
        used = p.usable == 1,
        backoff = p.backoff,
        reports = tonumber(p.reports),
        malformed = tonumber(p.malformed),
        backpressure = tonumber(p.backpressure),
        agent_state = AGENT_STATES[p.agent_state],
        agent_weight = p.agent_weight > 0 and p.agent_weight or nil,
    }
end

local upstream_reported = ffi.new("autoscale_upstream_reported_t")

-- The upstream's reported load at the last upkeep: mean, sum and count over its healthy peers with a usable report,
-- and the named metric's sum and count (nil when the upstream reads no reports).
function _M.upstream(upstream_idx)
    if not by_index[upstream_idx] or lib.autoscale_upstream_reported(upstream_idx, upstream_reported) ~= 0 then
        return nil
    end
    local u = upstream_reported
    return {
        mean = u.mean >= 0 and u.mean or nil,
        sum = u.sum,
        count = tonumber(u.count),
        named_sum = u.named_sum,
        named_count = tonumber(u.named_count),
    }
end

return _M
