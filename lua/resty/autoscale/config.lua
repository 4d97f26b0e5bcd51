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
local concat = table.concat

local _M = {}

-- Defaults, documented in README.md ("Options").
_M.defaults = {
    max_upstreams = 64,
    max_peers = 256,
    max_workers = 64,
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
    },
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

local UPSTREAM_FIELDS = {
    peers = true, balancer = true, retries = true, ewma_decay = true, default_rtt = true, slow_start = true,
    slow_start_aggression = true, slow_start_min_weight = true, failure_penalty = true,
}

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

local function upstream(path, u)
    if type(u) ~= "table" then
        return fail(path, "must be a table (got %s)", type(u))
    end
    local ok, err = known(path, u, UPSTREAM_FIELDS)
    if not ok then
        return nil, err
    end
    local d = _M.defaults.upstream
    local out = {}
    local balancer = u.balancer == nil and d.balancer or u.balancer
    if _M.balancers[balancer] == nil then
        return fail(path .. ".balancer", "must be \"peak_ewma\", \"round_robin\" or \"random\" (got %s)", show(balancer))
    end
    out.balancer = balancer
    for field, spec in pairs {
        retries = { 0, 100, true },
        ewma_decay = { 0.001, 3600 },
        default_rtt = { 0.000001, 60 },
        slow_start = { 0, 3600 },
        slow_start_aggression = { 0.01, 100 },
        slow_start_min_weight = { 0, 1 },
        failure_penalty = { 1, 1000 },
    } do
        local v = u[field]
        if v == nil then
            out[field] = d[field]
        else
            out[field], err = number(path .. "." .. field, v, spec[1], spec[2], spec[3])
            if out[field] == nil then
                return nil, err
            end
        end
    end
    if type(u.peers) ~= "table" or #u.peers == 0 then
        return fail(path .. ".peers", "must be a non-empty list of peers")
    end
    for k in pairs(u.peers) do
        if type(k) ~= "number" or k < 1 or k > #u.peers or floor(k) ~= k then
            return fail(path .. ".peers", "must be a list (found key %s)", show(k))
        end
    end
    out.peers = {}
    for i, p in ipairs(u.peers) do
        out.peers[i], err = peer(format("%s.peers[%d]", path, i), p)
        if not out.peers[i] then
            return nil, err
        end
    end
    return out
end

-- conf, err = config.validate(conf)
-- Returns a new, complete table (defaults filled in), or nil and the reason.
function _M.validate(conf)
    if type(conf) ~= "table" then
        return fail("configuration", "must be a table (got %s)", type(conf))
    end
    local ok, err = known("configuration", conf, {
        upstreams = true, max_upstreams = true, max_peers = true, max_workers = true, window = true, lib_path = true,
    })
    if not ok then
        return nil, (err:gsub("^configuration%.", ""))
    end
    local d = _M.defaults
    local out = {}
    for field, spec in pairs {
        max_upstreams = { 1, 4096 }, max_peers = { 1, 65536 }, max_workers = { 1, 1024 },
    } do
        local v = conf[field]
        if v == nil then
            out[field] = d[field]
        else
            out[field], err = number(field, v, spec[1], spec[2], true)
            if not out[field] then
                return nil, err
            end
        end
    end
    if conf.lib_path ~= nil and type(conf.lib_path) ~= "string" then
        return fail("lib_path", "must be a string (got %s)", type(conf.lib_path))
    end
    out.lib_path = conf.lib_path
    local w = conf.window or {}
    if type(w) ~= "table" then
        return fail("window", "must be a table (got %s)", type(w))
    end
    ok, err = known("window", w, { buckets = true, bucket = true })
    if not ok then
        return nil, err
    end
    out.window = {}
    out.window.buckets, err = number("window.buckets", w.buckets or d.window.buckets, 1, 600, true)
    if not out.window.buckets then
        return nil, err
    end
    out.window.bucket, err = number("window.bucket", w.bucket or d.window.bucket, 0.01, 60)
    if not out.window.bucket then
        return nil, err
    end
    if type(conf.upstreams) ~= "table" or next(conf.upstreams) == nil then
        return fail("upstreams", "must be a table of at least one upstream, keyed by name")
    end
    out.upstreams = {}
    for name, u in pairs(conf.upstreams) do
        if type(name) ~= "string" or #name == 0 or #name > 63 or name:find("[^%w_%-%.]") then
            return fail("upstreams." .. tostring(name),
                        "upstream names are 1 to 63 characters of letters, digits, '_', '-' and '.'")
        end
        out.upstreams[name], err = upstream("upstreams." .. name, u)
        if not out.upstreams[name] then
            return nil, err
        end
    end
    return out
end

return _M
