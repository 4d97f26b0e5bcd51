-- Run-time changes: add, remove, re-weight, drain and enable peers, change an upstream's tunables. Each takes
-- effect in every worker at once (it goes through the same path as a reload: validated, all or nothing, statistics
-- kept) and becomes an event. Nothing is persisted: a reload or restart applies nginx.conf again.
--
-- Wrong use (an unknown upstream name) and bad values return nil and the reason; nothing changes then.

local ffi = require "ffi"
local config = require "resty.autoscale.config"
local spec = require "resty.autoscale.spec"

local type = type
local pairs = pairs
local tostring = tostring
local ipairs = ipairs

local LUA_ONLY = { "healthcheck", "fallback", "discovery", "scaling", "admission", "reports" }

local _M = {}

local lib, conf, index
local errbuf = ffi.new("char[512]")

function _M.init(library, configuration, upstream_index)
    lib, conf, index = library, configuration, upstream_index
end

local function upstream(name)
    if not lib then
        return nil, "resty.autoscale is not configured"
    end
    local idx = index[name]
    if not idx then
        return nil, "unknown upstream " .. tostring(name)
    end
    return idx
end

local function result(rc)
    if rc < 0 then
        return nil, ffi.string(errbuf), rc == lib.AUTOSCALE_ERR_BUSY
    end
    return rc
end

local function address(addr)
    if type(addr) ~= "string" then
        return nil, "address must be a string \"host:port\" (got " .. type(addr) .. ")"
    end
    return addr
end

-- ok, err = control.add_peer(name, addr, weight?)
function _M.add_peer(name, addr, weight)
    local idx, err = upstream(name)
    if not idx then return nil, err end
    addr, err = address(addr)
    if not addr then return nil, err end
    weight = weight == nil and 1 or weight
    if type(weight) ~= "number" or weight ~= weight or weight % 1 ~= 0 or weight < 1 or weight > 10000 then
        return nil, "weight must be an integer between 1 and 10000 (got " .. tostring(weight) .. ")"
    end
    local ok, busy
    ok, err, busy = result(lib.autoscale_admin_peer_add(idx, addr, #addr, weight, errbuf, 512))
    return ok and true, err, busy
end

-- n, err, busy = control.change_peers(name, changes): applies one change set { { addr =, weight = }, ... } in one
-- reconfiguration: an entry adds its peer, sets the weight of a peer already there, or with weight 0 removes it;
-- peers that stay keep their statistics. All or nothing. Returns how many peers changed; on failure nil, the reason
-- and busy = true when only another process changing the configuration was in the way (retry later).
local change_cap, change_specs = 0, nil
function _M.change_peers(name, changes)
    local idx, err = upstream(name)
    if not idx then return nil, err end
    if type(changes) ~= "table" then
        return nil, "changes must be a table (got " .. type(changes) .. ")"
    end
    local n = #changes
    if n > change_cap then
        change_cap = n
        change_specs = ffi.new("autoscale_peer_spec_t[?]", n)
    end
    for i, c in ipairs(changes) do
        if type(c) ~= "table" or type(c.addr) ~= "string" then
            return nil, "changes[" .. i .. "]: needs addr = \"host:port\""
        end
        local w = c.weight
        if type(w) ~= "number" or w ~= w or w % 1 ~= 0 or w < 0 or w > 10000 then
            return nil, "changes[" .. i .. "]: weight must be an integer between 0 and 10000 (got " .. tostring(w) .. ")"
        end
        local spec = change_specs[i - 1]
        spec.addr, spec.addr_len, spec.weight = c.addr, #c.addr, w
    end
    -- the specs point into the Lua strings of `changes`, which stays referenced until the call returns
    return result(lib.autoscale_admin_peers_change(idx, change_specs, n, errbuf, 512))
end

-- ok, err = control.remove_peer(name, addr)
function _M.remove_peer(name, addr)
    local idx, err = upstream(name)
    if not idx then return nil, err end
    addr, err = address(addr)
    if not addr then return nil, err end
    local ok, busy
    ok, err, busy = result(lib.autoscale_admin_peer_remove(idx, addr, #addr, errbuf, 512))
    return ok and true, err, busy
end

-- ok, err = control.set_weight(name, addr, weight)
function _M.set_weight(name, addr, weight)
    local idx, err = upstream(name)
    if not idx then return nil, err end
    addr, err = address(addr)
    if not addr then return nil, err end
    if type(weight) ~= "number" or weight ~= weight or weight % 1 ~= 0 or weight < 1 or weight > 10000 then
        return nil, "weight must be an integer between 1 and 10000 (got " .. tostring(weight) .. ")"
    end
    local ok, busy
    ok, err, busy = result(lib.autoscale_admin_peer_weight(idx, addr, #addr, weight, errbuf, 512))
    return ok and true, err, busy
end

local function drain(name, addr, on)
    local idx, err = upstream(name)
    if not idx then return nil, err end
    addr, err = address(addr)
    if not addr then return nil, err end
    local changed
    changed, err = result(lib.autoscale_admin_peer_drain(idx, addr, #addr, on and 1 or 0, errbuf, 512))
    if changed == nil then return nil, err end
    return changed == 1
end

-- changed, err = control.drain(name, addr): no new requests; in-flight ones finish
function _M.drain(name, addr)
    return drain(name, addr, true)
end

-- changed, err = control.enable(name, addr): a drained peer takes traffic again
function _M.enable(name, addr)
    return drain(name, addr, false)
end

-- ok, err = control.tune(name, options): the upstream's tunables become its nginx.conf options overridden by
-- `options` (any upstream option but `peers`), validated like configure().
function _M.tune(name, options)
    local idx, err = upstream(name)
    if not idx then return nil, err end
    if type(options) ~= "table" then
        return nil, "options must be a table (got " .. type(options) .. ")"
    end
    if options.peers ~= nil then
        return nil, "peers: use add_peer/remove_peer"
    end
    for _, k in ipairs(LUA_ONLY) do -- read by Lua at start only; changing them needs a reload
        if options[k] ~= nil then
            return nil, k .. ": cannot be changed at run time (change nginx.conf and reload)"
        end
    end
    local merged = {}
    for k, v in pairs(conf.raw.upstreams[name]) do merged[k] = v end
    for k, v in pairs(options) do merged[k] = v end
    local checked
    checked, err = config.validate { upstreams = { [name] = merged } }
    if not checked then
        return nil, err
    end
    local keep = {}
    local s = ffi.new("autoscale_upstream_spec_t")
    spec.fill(s, name, checked.upstreams[name], keep)
    local ok, busy
    ok, err, busy = result(lib.autoscale_admin_upstream_tune(idx, s, errbuf, 512))
    return ok and true, err, busy
end

return _M
