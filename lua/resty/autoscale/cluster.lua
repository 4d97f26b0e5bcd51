-- Several gateways, one decision per service, through Redis (docs/scaling.md, "Several gateways"):
-- every gateway publishes its demand for each service under a key that expires; one leader per service holds a lease
-- (a key with an expiry, renewed every tick) that carries a fencing token (INCR, so each new leadership has a
-- larger one); the leader sums the demand of every live gateway, decides, and alone calls the actuator, sending its
-- token. Followers show the leader's decision. Only the scaler's background timer talks to Redis, with short
-- timeouts; no request ever waits on it.

local cjson = require "cjson.safe"
local config = require "resty.autoscale.config"

local ngx = ngx
local fail, number, known, show = config.fail, config.number, config.known, config.show
local floor = math.floor
local tostring = tostring
local ipairs = ipairs
local pairs = pairs
local tonumber = tonumber
local unpack = unpack

local _M = {}

_M.defaults = { lease = 3, demand_ttl = 3, actuate_without_redis = false, prefix = "autoscale:",
                redis = { host = "127.0.0.1", port = 6379, db = 0, timeout = 0.2 } }

local redis_mod
local function redis_client()
    if not redis_mod then
        local ok, m = pcall(require, "resty.redis")
        if not ok then
            ok, m = pcall(require, "nginx.redis") -- Debian's lua-nginx-redis installs resty.redis under this name
        end
        redis_mod = ok and m or false
    end
    return redis_mod or nil
end

local function hostname()
    local f = io.open("/proc/sys/kernel/hostname")
    local h = f and f:read("*l")
    if f then
        f:close()
    end
    return h or "gateway"
end

-- out, err = cluster.validate(v): false when v is nil (a single gateway).
function _M.validate(v)
    if v == nil then
        return false
    end
    if type(v) ~= "table" then
        return fail("cluster", "must be a table (got %s)", type(v))
    end
    local d = _M.defaults
    local ok, err = known("cluster", v, { redis = true, gateway_id = true, lease = true, demand_ttl = true,
                                          actuate_without_redis = true, prefix = true })
    if not ok then
        return nil, err
    end
    local out = {}
    for _, k in ipairs { "lease", "demand_ttl" } do
        out[k], err = number("cluster." .. k, v[k] == nil and d[k] or v[k], 0.1, 3600)
        if not out[k] then
            return nil, err
        end
    end
    out.actuate_without_redis = v.actuate_without_redis
    if out.actuate_without_redis == nil then
        out.actuate_without_redis = d.actuate_without_redis
    end
    if type(out.actuate_without_redis) ~= "boolean" then
        return fail("cluster.actuate_without_redis", "must be true or false (got %s)", show(v.actuate_without_redis))
    end
    out.prefix = v.prefix == nil and d.prefix or v.prefix
    if type(out.prefix) ~= "string" or out.prefix:find("%s") then
        return fail("cluster.prefix", "must be a string without spaces (got %s)", show(v.prefix))
    end
    out.gateway_id = v.gateway_id == nil and hostname() or v.gateway_id
    if type(out.gateway_id) ~= "string" or not out.gateway_id:find("^[%w_%.%-:]+$") or #out.gateway_id > 100 then
        return fail("cluster.gateway_id", "must be 1-100 of letters, digits, '_', '.', '-', ':' (got %s)",
                    show(v.gateway_id))
    end
    local r = v.redis
    if type(r) ~= "table" then
        return fail("cluster.redis", "must be a table { host =, port =, password =, db =, timeout = } (got %s)",
                    type(r))
    end
    ok, err = known("cluster.redis", r, { host = true, port = true, password = true, db = true, timeout = true })
    if not ok then
        return nil, err
    end
    out.redis = { host = r.host == nil and d.redis.host or r.host, password = r.password }
    if type(out.redis.host) ~= "string" or out.redis.host == "" then
        return fail("cluster.redis.host", "must be a host name or address (got %s)", show(r.host))
    end
    if r.password ~= nil and type(r.password) ~= "string" then
        return fail("cluster.redis.password", "must be a string")
    end
    for k, range in pairs { port = { 1, 65535, true }, db = { 0, 1000, true }, timeout = { 0.001, 10 } } do
        out.redis[k], err = number("cluster.redis." .. k, r[k] == nil and d.redis[k] or r[k], range[1], range[2],
                                   range[3])
        if not out.redis[k] then
            return nil, err
        end
    end
    if not redis_client() then
        return fail("cluster.redis", "needs resty.redis (Debian package lua-nginx-redis)")
    end
    return out
end

-- Takes or renews the lease atomically: {1, token} for the holder (a new holder gets a new token), else
-- {0, token, holder}.
local LEASE = [[
local v = redis.call('GET', KEYS[1])
if v then
  local gw, tok = string.match(v, '^(.*)/(%d+)$')
  if gw == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return {1, tonumber(tok)}
  end
  return {0, tonumber(tok) or 0, gw or ''}
end
local tok = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. '/' .. tok, 'PX', ARGV[2])
return {1, tok}
]]

local function connect(c)
    local redis = redis_client()
    local red = redis:new()
    local ms = floor(c.redis.timeout * 1000)
    red:set_timeout(ms) -- (resty.redis 0.27 has no set_timeouts: an unknown method would become a Redis command)
    local ok, err = red:connect(c.redis.host, c.redis.port)
    if not ok then
        return nil, "redis " .. c.redis.host .. ":" .. c.redis.port .. ": " .. tostring(err)
    end
    if c.redis.password and (red:get_reused_times() or 0) == 0 then
        ok, err = red:auth(c.redis.password)
        if not ok then
            red:close()
            return nil, "redis auth: " .. tostring(err)
        end
    end
    if c.redis.db ~= 0 then
        ok, err = red:select(c.redis.db)
        if not ok then
            red:close()
            return nil, "redis select: " .. tostring(err)
        end
    end
    return red
end

-- view, err = cluster.exchange(c, name, demand)
-- Publishes this gateway's demand for service `name`, takes or renews the service's lease, and returns
-- { leader = bool, token = fencing token, holder = gateway id of the leader, demands = { every live gateway's
-- demand } (leader only), desired = the leader's last published decision (a table) or nil }. Any Redis error
-- returns nil, err: the caller then decides locally.
function _M.exchange(c, name, demand)
    local red, err = connect(c)
    if not red then
        return nil, err
    end
    local p = c.prefix .. name
    local now_ms = floor(ngx.now() * 1000)
    local ttl = floor(c.demand_ttl * 1000)
    red:init_pipeline()
    red:set(p .. ":demand:" .. c.gateway_id, cjson.encode(demand), "PX", ttl)
    red:zadd(p .. ":gateways", now_ms, c.gateway_id)
    red:zremrangebyscore(p .. ":gateways", "-inf", now_ms - 10 * ttl)
    red:eval(LEASE, 2, p .. ":lease", p .. ":fence", c.gateway_id, floor(c.lease * 1000))
    red:zrange(p .. ":gateways", 0, -1)
    red:get(p .. ":desired")
    local res
    res, err = red:commit_pipeline()
    if not res then
        red:close()
        return nil, "redis: " .. tostring(err)
    end
    for i = 1, #res do
        if type(res[i]) == "table" and res[i][1] == false then
            red:close()
            return nil, "redis: " .. tostring(res[i][2])
        end
    end
    local lease, gateways, desired = res[4], res[5], res[6]
    local view = { leader = lease[1] == 1, token = tonumber(lease[2]) or 0,
                   desired = desired ~= ngx.null and cjson.decode(desired) or nil }
    view.holder = view.leader and c.gateway_id or lease[3]
    if view.leader and #gateways > 0 then
        local keys = {}
        for i, gw in ipairs(gateways) do
            keys[i] = p .. ":demand:" .. gw
        end
        local vals
        vals, err = red:mget(unpack(keys))
        if not vals then
            red:close()
            return nil, "redis: " .. tostring(err)
        end
        view.demands = {}
        for i, v in ipairs(vals) do
            local dm = v ~= ngx.null and cjson.decode(v)
            if dm then
                dm.gateway = gateways[i]
                view.demands[#view.demands + 1] = dm
            end
        end
    end
    red:set_keepalive(30000, 4)
    return view
end

-- ok, err = cluster.publish(c, name, decision): the leader's decision, for the followers (expires after 10 leases).
function _M.publish(c, name, decision)
    local red, err = connect(c)
    if not red then
        return nil, err
    end
    local ok
    ok, err = red:set(c.prefix .. name .. ":desired", cjson.encode(decision), "PX", floor(c.lease * 10000))
    if not ok then
        red:close()
        return nil, "redis: " .. tostring(err)
    end
    red:set_keepalive(30000, 4)
    return true
end

return _M
