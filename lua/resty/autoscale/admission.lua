-- Admission in front of an upstream (access_by_lua*): priority classes, rate limits and an adaptive concurrency
-- limit, all in shared memory (the algorithms are in rust-core/src/admission.rs; docs/admission.md).
--
--     access_by_lua_block { require("resty.autoscale").admit("api") }
--
-- A request is classified (route, consumer, header), checked against the rate rules that apply to it (token buckets
-- per key), then against the upstream's concurrency limit. Over a limit it gets 503 (concurrency) or 429 (rate) with
-- Retry-After and a small JSON body, after waiting up to `queue` seconds for a slot when that is set. The log phase
-- (autoscale.log) ends the admitted request. A timer in every worker moves the limit, tightens the rate limits while
-- the upstream is overloaded or a scale-up is awaited (`scaler.pending`) and applies scheduled rules.

local ffi = require "ffi"
local base = require "resty.core.base"
local config = require "resty.autoscale.config"
local cjson = require "cjson.safe"
require "resty.core.misc" -- declares ngx_http_lua_ffi_get_resp_status

local C = ffi.C

local ngx = ngx
local var = ngx.var
local ngx_log = ngx.log
local ngx_ERR = ngx.ERR
local ngx_sleep = ngx.sleep
local ngx_now = ngx.now
local update_time = ngx.update_time
local get_request = base.get_request
local type = type
local pairs = pairs
local ipairs = ipairs
local pcall = pcall
local tostring = tostring
local tonumber = tonumber
local find = string.find
local match = string.match
local gsub = string.gsub
local lower = string.lower
local ceil = math.ceil
local min = math.min
local format = string.format
local decode_base64 = ngx.decode_base64

local fail, number, known, show = config.fail, config.number, config.known, config.show

local _M = {}

_M.defaults = {
    concurrency = {
        algorithm = "gradient", min = 3, max = 1000, initial = 20, buffer = 0.25, min_rtt_interval = 60,
        min_rtt_requests = 50, min_concurrency = 3, backoff = 0.9, tolerance = 1.5, interval = 0.1,
    },
    tighten = 0.5,
    relax_after = 10,
    queue = 0,
    status = 503,
    rate_status = 429,
}

local ALGORITHMS = { fixed = 0, gradient = 1, aimd = 2 }
local CONCURRENCY_RANGES = {
    min = { 1, 1e6 }, max = { 1, 1e6 }, initial = { 1, 1e6 }, buffer = { 0, 10 }, min_rtt_interval = { 0, 86400 },
    min_rtt_requests = { 1, 1e6, true }, min_concurrency = { 1, 1e6 }, backoff = { 0.01, 1 }, tolerance = { 1, 100 },
    interval = { 0.01, 60 },
}
local MAX_CLASSES, MAX_RULES = 4, 8
local REASON = { concurrency = 0, rate = 1, queue_timeout = 2 }

local lib, index
local ups = {}          -- upstream name -> compiled admission settings
local any = false       -- whether any upstream has admission
local retry = ffi.new("double[1]")
local stats = ffi.new("autoscale_admission_stats_t")
local ADMIT, SHED, OFF
local scaler            -- resty.autoscale.scaler when it is installed
local unknown_logged = {}

-- "HH:MM" (daily) or "YYYY-MM-DD HH:MM" (once) -> a matcher description, or nil and the reason.
local function when(path, v)
    if type(v) ~= "string" then
        return fail(path, "must be \"HH:MM\" or \"YYYY-MM-DD HH:MM\" (got %s)", show(v))
    end
    local y, mo, d, h, mi = match(v, "^(%d%d%d%d)%-(%d%d)%-(%d%d) (%d%d):(%d%d)$")
    if not y then
        h, mi = match(v, "^(%d%d):(%d%d)$")
    end
    h, mi = tonumber(h), tonumber(mi)
    if not h or h > 23 or mi > 59 then
        return fail(path, "must be \"HH:MM\" or \"YYYY-MM-DD HH:MM\" (got %s)", show(v))
    end
    if y then
        return { stamp = format("%s-%s-%s %02d:%02d", y, mo, d, h, mi) }
    end
    return { minute = h * 60 + mi }
end

local function pattern(path, v)
    if v == nil then
        return true
    end
    if type(v) ~= "string" or not pcall(find, "", v) then
        return fail(path, "must be a Lua pattern (got %s)", show(v))
    end
    return v
end

local function header_var(name)
    return "http_" .. gsub(lower(name), "-", "_")
end

local function header_name(path, v)
    if type(v) ~= "string" or not find(v, "^[%w%-_]+$") then
        return fail(path, "must be a header name (letters, digits, '-', '_') (got %s)", show(v))
    end
    return v
end

local function class(path, c, i)
    if type(c) ~= "table" then
        return fail(path, "must be a table (got %s)", type(c))
    end
    local ok, err = known(path, c, { name = true, share = true, route = true, header = true, value = true,
                                     consumer = true })
    if not ok then
        return nil, err
    end
    if type(c.name) ~= "string" or not find(c.name, "^[%w_%-]+$") then
        return fail(path .. ".name", "must be a name of letters, digits, '_' and '-' (got %s)", show(c.name))
    end
    local out = { name = c.name, index = i - 1, value = c.value, consumer = c.consumer }
    out.share, err = number(path .. ".share", c.share or 0, 0, 1)
    if not out.share then
        return nil, err
    end
    if c.route ~= nil then
        out.route, err = pattern(path .. ".route", c.route)
        if not out.route then
            return nil, err
        end
    end
    if c.header ~= nil then
        local h
        h, err = header_name(path .. ".header", c.header)
        if not h then
            return nil, err
        end
        out.header = header_var(h)
        if type(c.value) ~= "string" then
            return fail(path .. ".value", "must be the header value that selects the class (got %s)", show(c.value))
        end
    elseif c.value ~= nil then
        return fail(path .. ".value", "needs header")
    end
    if c.consumer ~= nil and type(c.consumer) ~= "string" then
        return fail(path .. ".consumer", "must be a string (got %s)", show(c.consumer))
    end
    return out
end

local function rule(path, r, consumer_var)
    if type(r) ~= "table" then
        return fail(path, "must be a table (got %s)", type(r))
    end
    local ok, err = known(path, r, { key = true, rate = true, burst = true, route = true, from = true, to = true })
    if not ok then
        return nil, err
    end
    local out = {}
    out.rate, err = number(path .. ".rate", r.rate, 0.001, 1e6)
    if not out.rate then
        return nil, err
    end
    out.burst, err = number(path .. ".burst", r.burst or math.max(1, out.rate), 1, 1e6)
    if not out.burst then
        return nil, err
    end
    local key = r.key or "upstream"
    if key == "upstream" then
        out.key = "upstream"
    elseif key == "ip" then
        out.key, out.var = "var", "remote_addr"
    elseif key == "route" then
        out.key, out.var = "var", "uri"
    elseif key == "consumer" then
        if not consumer_var then
            return fail(path .. ".key", "\"consumer\" needs admission.consumer_header")
        end
        out.key, out.var = "var", consumer_var
    elseif type(key) == "string" and find(key, "^header:[%w%-_]+$") then
        out.key, out.var = "var", header_var(key:sub(8))
    elseif type(key) == "string" and find(key, "^jwt:[%w_%-%.]+$") then
        out.key, out.claim = "jwt", key:sub(5)
    else
        return fail(path .. ".key", "must be \"upstream\", \"ip\", \"route\", \"consumer\", \"header:<name>\" or "
                    .. "\"jwt:<claim>\" (got %s)", show(key))
    end
    if r.route ~= nil then
        out.route, err = pattern(path .. ".route", r.route)
        if not out.route then
            return nil, err
        end
    end
    if (r.from == nil) ~= (r.to == nil) then
        return fail(path .. (r.from == nil and ".from" or ".to"), "from and to go together")
    end
    if r.from ~= nil then
        out.from, err = when(path .. ".from", r.from)
        if not out.from then
            return nil, err
        end
        out.to, err = when(path .. ".to", r.to)
        if not out.to then
            return nil, err
        end
        if (out.from.stamp == nil) ~= (out.to.stamp == nil) then
            return fail(path .. ".to", "must have the same form as from")
        end
    end
    return out
end

-- a, err = admission.validate(path, v): the admission section of an upstream (false/nil: off)
function _M.validate(path, v)
    if v == nil or v == false then
        return false
    end
    if type(v) ~= "table" then
        return fail(path, "must be a table (got %s)", type(v))
    end
    local d = _M.defaults
    local ok, err = known(path, v, { concurrency = true, classes = true, default_class = true, consumer_header = true,
                                     rate_limits = true, tighten = true, relax_after = true, queue = true,
                                     status = true, rate_status = true })
    if not ok then
        return nil, err
    end
    local out = {}
    for field, spec in pairs { tighten = { 0.01, 1 }, relax_after = { 0, 86400 }, queue = { 0, 60 },
                               status = { 400, 599, true }, rate_status = { 400, 599, true } } do
        out[field], err = number(path .. "." .. field, v[field] == nil and d[field] or v[field], spec[1], spec[2],
                                 spec[3])
        if not out[field] then
            return nil, err
        end
    end
    local c = v.concurrency
    if c == false then
        c = { algorithm = "fixed", initial = 1e6, max = 1e6 }
    elseif c == nil then
        c = {}
    elseif type(c) ~= "table" then
        return fail(path .. ".concurrency", "must be a table or false (got %s)", type(c))
    end
    local cpath = path .. ".concurrency"
    local dc = {}
    for k, x in pairs(d.concurrency) do
        dc[k] = x
    end
    ok, err = known(cpath, c, dc)
    if not ok then
        return nil, err
    end
    out.concurrency = {}
    for k, x in pairs(dc) do
        local given = c[k]
        if k == "algorithm" then
            given = given == nil and x or given
            if ALGORITHMS[given] == nil then
                return fail(cpath .. ".algorithm", "must be \"gradient\", \"aimd\" or \"fixed\" (got %s)", show(given))
            end
            out.concurrency.algorithm = given
        else
            out.concurrency[k], err = number(cpath .. "." .. k, given == nil and x or given,
                                             CONCURRENCY_RANGES[k][1], CONCURRENCY_RANGES[k][2], CONCURRENCY_RANGES[k][3])
            if not out.concurrency[k] then
                return nil, err
            end
        end
    end
    local oc = out.concurrency
    if oc.max < oc.min then
        return fail(cpath .. ".max", "must not be less than min (%s < %s)", oc.max, oc.min)
    end
    if c.initial == nil then
        oc.initial = math.max(oc.min, math.min(oc.max, oc.initial))
    elseif oc.initial < oc.min or oc.initial > oc.max then
        return fail(cpath .. ".initial", "must be between min and max (got %s)", show(oc.initial))
    end
    if v.consumer_header ~= nil then
        local h
        h, err = header_name(path .. ".consumer_header", v.consumer_header)
        if not h then
            return nil, err
        end
        out.consumer_var = header_var(h)
    end
    local classes = v.classes or { { name = "default" } }
    if type(classes) ~= "table" or #classes == 0 or #classes > MAX_CLASSES then
        return fail(path .. ".classes", "must be a list of 1 to %d classes, most important first", MAX_CLASSES)
    end
    out.classes, out.class_index = {}, {}
    local shares = 0
    for i, cl in ipairs(classes) do
        out.classes[i], err = class(format("%s.classes[%d]", path, i), cl, i)
        if not out.classes[i] then
            return nil, err
        end
        if out.class_index[cl.name] then
            return fail(format("%s.classes[%d].name", path, i), "is used twice (%s)", show(cl.name))
        end
        if out.classes[i].consumer and not out.consumer_var then
            return fail(format("%s.classes[%d].consumer", path, i), "needs admission.consumer_header")
        end
        out.class_index[cl.name] = out.classes[i]
        shares = shares + out.classes[i].share
    end
    if shares > 1 + 1e-9 then
        return fail(path .. ".classes", "the shares add up to %s (at most 1)", shares)
    end
    local dflt = v.default_class or classes[#classes].name
    if not out.class_index[dflt] then
        return fail(path .. ".default_class", "must name one of the classes (got %s)", show(dflt))
    end
    out.default_class = out.class_index[dflt]
    local rules = v.rate_limits or {}
    if type(rules) ~= "table" or #rules > MAX_RULES then
        return fail(path .. ".rate_limits", "must be a list of at most %d rules", MAX_RULES)
    end
    out.rules = {}
    for i, r in ipairs(rules) do
        out.rules[i], err = rule(format("%s.rate_limits[%d]", path, i), r, out.consumer_var)
        if not out.rules[i] then
            return nil, err
        end
    end
    return out
end

local function spec_of(a)
    local c = a.concurrency
    local s = ffi.new("autoscale_admission_spec_t", {
        algorithm = ALGORITHMS[c.algorithm], min_rtt_requests = c.min_rtt_requests,
        min_rtt_interval_ms = c.min_rtt_interval * 1000, relax_after_ms = a.relax_after * 1000,
        interval_ms = c.interval * 1000, min_limit = c.min, max_limit = c.max, initial_limit = c.initial,
        buffer = c.buffer, min_concurrency = c.min_concurrency, backoff = c.backoff, tolerance = c.tolerance,
        tighten = a.tighten,
    })
    for _, cl in ipairs(a.classes) do
        s.shares[cl.index] = cl.share
    end
    return s
end

-- Local time as minutes of the day and "YYYY-MM-DD HH:MM".
local function clock()
    local t = ngx.localtime() -- "yyyy-mm-dd hh:mm:ss"
    local h, m = match(t, " (%d%d):(%d%d)")
    return tonumber(h) * 60 + tonumber(m), t:sub(1, 16)
end

local function within(r, minute, stamp)
    if r.from.stamp then
        return stamp >= r.from.stamp and stamp < r.to.stamp
    end
    local a, b = r.from.minute, r.to.minute
    if a <= b then
        return minute >= a and minute < b
    end
    return minute >= a or minute < b -- across midnight
end

-- Sets the rate of every rule in shared memory (scheduled ones only while their time has come).
local function apply_rules(name, a)
    local minute, stamp = clock()
    for i, r in ipairs(a.rules) do
        local active = not r.from or within(r, minute, stamp)
        if active ~= r.active then
            r.active = active
            lib.autoscale_admission_rule(index[name], i - 1, active and r.rate or 0, r.burst)
        end
    end
end

-- Called by autoscale.configure in init_by_lua*: applies every upstream's admission settings to shared memory.
function _M.init(library, conf, upstream_index)
    lib, index = library, upstream_index
    ADMIT, SHED, OFF = lib.AUTOSCALE_ADMIT, lib.AUTOSCALE_SHED, lib.AUTOSCALE_ADMISSION_OFF
    ups, any = {}, false
    local errbuf = ffi.new("char[256]")
    for name, u in pairs(conf.upstreams) do
        local a = u.admission
        if a then
            local rc = lib.autoscale_admission_configure(index[name], spec_of(a), errbuf, 256)
            if rc ~= 0 then
                error("resty.autoscale: upstreams." .. name .. ".admission: " .. ffi.string(errbuf), 0)
            end
            for _, r in ipairs(a.rules) do
                r.active = nil
            end
            apply_rules(name, a)
            a.idx = index[name]
            a.name_json = cjson.encode(name)
            ups[name] = a
            any = true
        else
            lib.autoscale_admission_configure(index[name], nil, nil, 0)
        end
    end
    local ok, mod = pcall(require, "resty.autoscale.scaler")
    scaler = ok and type(mod) == "table" and type(mod.pending) == "function" and mod or nil
end

local function pending(name)
    if not scaler then
        return false
    end
    local ok, p = pcall(scaler.pending, name)
    return ok and p and true or false
end

local timer_started = false

-- Starts this worker's admission timer (idempotent): limit updates, rate tightening/relaxing, scheduled rules.
function _M.start()
    if timer_started or not any then
        return true
    end
    local interval, last_rules = 60, 0
    for _, a in pairs(ups) do
        interval = min(interval, a.concurrency.interval)
    end
    local ok, err = ngx.timer.every(interval, function(premature)
        if premature then
            return
        end
        local now = ngx_now()
        local rules_due = now - last_rules >= 1
        if rules_due then
            last_rules = now
        end
        for name, a in pairs(ups) do
            lib.autoscale_admission_update(a.idx, pending(name) and 1 or 0)
            if rules_due then
                apply_rules(name, a)
            end
        end
    end)
    if not ok then
        return nil, err
    end
    timer_started = true
    return true
end

-- The value of a JWT claim from "Authorization: Bearer <jwt>" (not verified: a key for rate limits only).
local function jwt_claim(claim)
    local auth = var.http_authorization
    local payload = auth and match(auth, "^[Bb]earer%s+[%w%-_]+%.([%w%-_]+)%.")
    if not payload then
        return nil
    end
    payload = gsub(gsub(payload, "-", "+"), "_", "/")
    payload = payload .. ("="):rep((4 - #payload % 4) % 4)
    local json = decode_base64(payload)
    local t = json and cjson.decode(json)
    local v = type(t) == "table" and t[claim]
    if type(v) == "string" or type(v) == "number" then
        return tostring(v)
    end
    return nil
end

local function classify(a)
    local classes = a.classes
    if #classes == 1 then
        return classes[1]
    end
    local uri
    for i = 1, #classes do
        local c = classes[i]
        if c.route or c.header or c.consumer then
            local ok = true
            if c.route then
                uri = uri or var.uri or ""
                ok = find(uri, c.route) ~= nil
            end
            if ok and c.header then
                ok = var[c.header] == c.value
            end
            if ok and c.consumer then
                ok = var[a.consumer_var] == c.consumer
            end
            if ok then
                return c
            end
        end
    end
    return a.default_class
end

local function reject(a, cl, why, status, seconds)
    lib.autoscale_admission_shed(a.idx, cl.index, REASON[why])
    local wait = ceil(seconds)
    if wait < 1 or wait ~= wait then
        wait = 1
    elseif wait > 3600 then
        wait = 3600
    end
    ngx.status = status
    local h = ngx.header
    h["Retry-After"] = wait
    h["Content-Type"] = "application/json"
    local body = '{"error":"' .. (why == "rate" and "rate limited" or "overloaded") .. '","reason":"' .. why
        .. '","upstream":' .. a.name_json .. ',"class":"' .. cl.name .. '","retry_after":' .. wait .. '}\n'
    h["Content-Length"] = #body
    ngx.print(body)
    return ngx.exit(status)
end

-- rank = admission.rank(name): the priority of the current request's admission class for upstream `name` (1 = the
-- most important class), 1 without admission. Classifies again from the request (route, headers), so it also works
-- after an internal redirect (the fallback location, where held requests wait).
function _M.rank(name)
    local a = ups[name]
    return a and classify(a).index + 1 or 1
end

-- ok = autoscale.admit(upstream_name, opts?), in access_by_lua*: returns true when the request may go on; otherwise
-- answers it (503/429) and ends it. opts.class names the class instead of classifying.
function _M.admit(name, opts)
    local a = ups[name]
    if not a then
        if not (index and index[name]) and not unknown_logged[tostring(name)] then
            unknown_logged[tostring(name)] = true
            ngx_log(ngx_ERR, "resty.autoscale.admit: unknown upstream ", tostring(name), " (admitted)")
        end
        return true
    end
    local cl = opts and opts.class and a.class_index[opts.class] or classify(a)
    local rules = a.rules
    for i = 1, #rules do
        local r = rules[i]
        if r.active and (not r.route or find(var.uri or "", r.route)) then
            local key
            if r.key == "upstream" then
                key = ""
            elseif r.key == "var" then
                key = var[r.var]
            else
                key = jwt_claim(r.claim)
            end
            -- a request without the key (no such header, no token) is not limited by this rule
            if key and lib.autoscale_admission_rate(a.idx, i - 1, key, #key, retry) == SHED then
                return reject(a, cl, "rate", a.rate_status, retry[0])
            end
        end
    end
    local r = get_request()
    local rc = lib.autoscale_admission_admit(r, a.idx, cl.index, retry)
    if rc ~= SHED then
        if rc < 0 then
            ngx_log(ngx_ERR, "resty.autoscale.admit: ", name, ": code ", rc, " (admitted)")
        end
        return true
    end
    if a.queue > 0 then
        lib.autoscale_admission_wait(r, a.idx, 1)
        update_time()
        local deadline = ngx_now() + a.queue
        repeat
            ngx_sleep(min(0.005, a.queue))
            rc = lib.autoscale_admission_admit(r, a.idx, cl.index, retry)
            update_time()
        until rc ~= SHED or ngx_now() >= deadline
        lib.autoscale_admission_wait(r, a.idx, -1)
        if rc ~= SHED then
            return true
        end
        return reject(a, cl, "queue_timeout", a.status, retry[0])
    end
    return reject(a, cl, "concurrency", a.status, retry[0])
end

-- In log_by_lua* (called by autoscale.log): ends the admitted request.
function _M.log()
    if any then
        local r = get_request()
        lib.autoscale_admission_done(r, C.ngx_http_lua_ffi_get_resp_status(r))
    end
end

-- st = admission.status(name): the upstream's admission state, or nil when it has none.
function _M.status(name)
    local a = ups[name]
    if not a or lib.autoscale_admission_stats(a.idx, stats) ~= 0 then
        return nil
    end
    local classes = {}
    for _, c in ipairs(a.classes) do
        local i = c.index
        classes[c.name] = {
            share = c.share, in_flight = stats.class_inflight[i], admitted = tonumber(stats.admitted[i]),
            shed = { concurrency = tonumber(stats.shed[i * 3]), rate = tonumber(stats.shed[i * 3 + 1]),
                     queue_timeout = tonumber(stats.shed[i * 3 + 2]) },
        }
    end
    local rules = {}
    for i, r in ipairs(a.rules) do
        rules[i] = { rate = r.rate, burst = r.burst, active = r.active or false,
                     effective_rate = (r.active and r.rate or 0) * stats.rate_factor,
                     overflow = tonumber(stats.rate_overflow[i - 1]) }
    end
    return {
        algorithm = a.concurrency.algorithm, limit = stats.limit, min_rtt = stats.min_rtt,
        sample_rtt = stats.sample_rtt, rate_factor = stats.rate_factor, in_flight = stats.inflight,
        waiting = stats.waiting, measuring_min_rtt = stats.measuring == 1, classes = classes, rate_limits = rules,
    }
end

-- The names of the upstreams with admission, sorted.
local function names()
    local list = {}
    for name in pairs(ups) do
        list[#list + 1] = name
    end
    table.sort(list)
    return list
end

local FAMILIES = {
    { "autoscale_admission_limit", "gauge", "Concurrency limit of the upstream now." },
    { "autoscale_admission_in_flight_requests", "gauge", "Admitted requests in flight, by class." },
    { "autoscale_admission_waiting_requests", "gauge", "Requests waiting in the admission queue." },
    { "autoscale_admission_min_rtt_seconds", "gauge", "Minimum round-trip time the limit is measured against." },
    { "autoscale_admission_sample_rtt_seconds", "gauge", "Mean latency of the last interval's admitted requests." },
    { "autoscale_admission_rate_factor", "gauge", "Multiplier on the rate limits (below 1 while tightened)." },
    { "autoscale_admission_admitted_total", "counter", "Requests admitted, by class." },
    { "autoscale_admission_shed_total", "counter", "Requests shed, by class and reason (concurrency, rate, queue_timeout)." },
    { "autoscale_admission_rate_overflow_total", "counter",
      "Requests whose key found no bucket of its own (table full) and took the rule's shared overflow bucket." },
}

-- text = admission.prometheus(): the admission families (empty without admission), for the exporter.
function _M.prometheus()
    local list = names()
    if #list == 0 then
        return ""
    end
    local samples = {}
    for _, f in ipairs(FAMILIES) do
        samples[f[1]] = {}
    end
    local function add(family, labels, v)
        local t = samples[family]
        t[#t + 1] = format("%s{%s} %.17g\n", family, labels, v)
    end
    for _, name in ipairs(list) do
        local st = _M.status(name)
        if st then
            local l = 'upstream="' .. name .. '"'
            add("autoscale_admission_limit", l, st.limit)
            add("autoscale_admission_waiting_requests", l, st.waiting)
            add("autoscale_admission_min_rtt_seconds", l, st.min_rtt)
            add("autoscale_admission_sample_rtt_seconds", l, st.sample_rtt)
            add("autoscale_admission_rate_factor", l, st.rate_factor)
            for i, rl in ipairs(st.rate_limits) do
                add("autoscale_admission_rate_overflow_total", l .. ',rule="' .. i .. '"', rl.overflow)
            end
            for _, c in ipairs(ups[name].classes) do
                local cl = l .. ',class="' .. c.name .. '"'
                local cs = st.classes[c.name]
                add("autoscale_admission_in_flight_requests", cl, cs.in_flight)
                add("autoscale_admission_admitted_total", cl, cs.admitted)
                for _, why in ipairs { "concurrency", "rate", "queue_timeout" } do
                    add("autoscale_admission_shed_total", cl .. ',reason="' .. why .. '"', cs.shed[why])
                end
            end
        end
    end
    local out = {}
    for _, f in ipairs(FAMILIES) do
        out[#out + 1] = "# HELP " .. f[1] .. " " .. f[3] .. "\n# TYPE " .. f[1] .. " " .. f[2] .. "\n"
        out[#out + 1] = table.concat(samples[f[1]])
    end
    return table.concat(out)
end

return _M
