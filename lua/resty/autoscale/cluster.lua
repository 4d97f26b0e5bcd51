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
    ok, err = known("cluster.redis", r, { host = true, port = true, username = true, password = true, db = true,
                                          timeout = true, sentinels = true, master_name = true,
                                          sentinel_username = true, sentinel_password = true, ssl = true,
                                          ssl_verify = true, server_name = true })
    if not ok then
        return nil, err
    end
    out.redis = { host = r.host == nil and d.redis.host or r.host }
    if type(out.redis.host) ~= "string" or out.redis.host == "" then
        return fail("cluster.redis.host", "must be a host name or address (got %s)", show(r.host))
    end
    for _, k in ipairs { "username", "password", "sentinel_username", "sentinel_password" } do
        if r[k] ~= nil and (type(r[k]) ~= "string" or r[k] == "" or r[k]:find("[%c]")) then
            return fail("cluster.redis." .. k, "must be a non-empty string without control characters")
        end
        out.redis[k] = r[k]
    end
    for _, k in ipairs { "ssl", "ssl_verify" } do
        if r[k] ~= nil and type(r[k]) ~= "boolean" then
            return fail("cluster.redis." .. k, "must be true or false (got %s)", show(r[k]))
        end
    end
    out.redis.ssl, out.redis.ssl_verify = r.ssl == true, r.ssl_verify ~= false
    if r.server_name ~= nil and (type(r.server_name) ~= "string" or not r.server_name:find("^[%w%.%-]+$")) then
        return fail("cluster.redis.server_name", "must be a host name (got %s)", show(r.server_name))
    end
    out.redis.server_name = r.server_name
    if r.username and not r.password then
        return fail("cluster.redis.username", "needs a password")
    end
    if r.sentinel_username and not r.sentinel_password then
        return fail("cluster.redis.sentinel_username", "needs a sentinel_password")
    end
    for k, range in pairs { port = { 1, 65535, true }, db = { 0, 1000, true }, timeout = { 0.001, 10 } } do
        out.redis[k], err = number("cluster.redis." .. k, r[k] == nil and d.redis[k] or r[k], range[1], range[2],
                                   range[3])
        if not out.redis[k] then
            return nil, err
        end
    end
    if r.sentinels ~= nil or r.master_name ~= nil then
        if r.host ~= nil or r.port ~= nil then
            return fail("cluster.redis", "takes either host/port or sentinels/master_name, not both")
        end
        if type(r.master_name) ~= "string" or not r.master_name:find("^[%w_%.%-]+$") or #r.master_name > 100 then
            return fail("cluster.redis.master_name", "must be 1-100 of letters, digits, '_', '.', '-' (got %s)",
                        show(r.master_name))
        end
        if type(r.sentinels) ~= "table" or #r.sentinels == 0 or #r.sentinels > 16 then
            return fail("cluster.redis.sentinels", "must be a list of 1-16 \"host:port\" (got %s)",
                        type(r.sentinels) == "table" and #r.sentinels .. " entries" or show(r.sentinels))
        end
        out.redis.master_name, out.redis.sentinels = r.master_name, {}
        for i, a in ipairs(r.sentinels) do
            local host, port
            if type(a) == "string" then
                host, port = a:match("^%[?([^%s%[%]]-)%]?:(%d+)$")
            end
            port = tonumber(port)
            if not host or host == "" or not port or port < 1 or port > 65535 then
                return fail("cluster.redis.sentinels[" .. i .. "]", "must be \"host:port\" (got %s)", show(a))
            end
            out.redis.sentinels[i] = { host = host, port = port }
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

-- red, err = open(host, port, r, user, password, ssl): a connection (a fresh one over TLS when `ssl`, with the
-- certificate checked against nginx's lua_ssl_trusted_certificate unless r.ssl_verify is false, then authenticated
-- with `user`/`password`)
local function open(host, port, r, user, password, ssl)
    local redis = redis_client()
    local red = redis:new()
    red:set_timeout(floor(r.timeout * 1000)) -- (resty.redis 0.27 has no set_timeouts: an unknown method would
                                             -- become a Redis command)
    -- TLS connections are kept apart from plain ones, and by the name and check they were made with
    local pool = ssl and { pool = host .. ":" .. port .. ":tls:" .. (r.server_name or host) .. (r.ssl_verify and ":v" or "") }
    local ok, err = red:connect(host, port, pool)
    if not ok then
        return nil, "redis " .. host .. ":" .. port .. ": " .. tostring(err)
    end
    if ssl and (red:get_reused_times() or 0) == 0 then
        -- resty.redis 0.27 has no TLS option: the handshake on its cosocket, before any command
        ok, err = rawget(red, "_sock"):sslhandshake(nil, r.server_name or host, r.ssl_verify)
        if not ok then
            red:close()
            return nil, "redis " .. host .. ":" .. port .. " TLS: " .. tostring(err)
        end
    end
    if password and (red:get_reused_times() or 0) == 0 then
        if user then
            ok, err = red:auth(user, password)
        else
            ok, err = red:auth(password)
        end
        if not ok then
            red:close()
            return nil, "redis " .. host .. ":" .. port .. " auth: " .. tostring(err)
        end
    end
    return red
end

-- This worker's view of the master of each Sentinel-monitored configuration: { host =, port =, epoch =, at = }.
local masters = setmetatable({}, { __mode = "k" })

-- master, err = resolve(r): asks the Sentinels in turn (the last one that answered first) for the master of
-- `r.master_name` and its configuration epoch (which grows with every failover).
local function resolve(r)
    local n = #r.sentinels
    local first = r.sentinel_next or 1
    local errs = {}
    for k = 0, n - 1 do
        local i = (first + k - 1) % n + 1
        local s = r.sentinels[i]
        local red, err = open(s.host, s.port, r, r.sentinel_username, r.sentinel_password)
        local info
        if red then
            info, err = red:sentinel("master", r.master_name)
            if type(info) == "table" then
                red:set_keepalive(30000, 4)
            else
                red:close()
            end
        end
        if type(info) == "table" then
            local m = {}
            for j = 1, #info - 1, 2 do
                m[info[j]] = info[j + 1]
            end
            local port = tonumber(m.port)
            local flags = tostring(m.flags)
            if m.ip and port and not flags:find("o_down", 1, true) then
                r.sentinel_next = i
                ngx.update_time()
                return { host = m.ip, port = port, epoch = tonumber(m["config-epoch"]) or 0, at = ngx.now() }
            end
            err = "master " .. tostring(m.ip) .. ":" .. tostring(m.port) .. " is " .. flags
        end
        errs[#errs + 1] = "sentinel " .. s.host .. ":" .. s.port .. ": " .. tostring(err)
    end
    return nil, "no Sentinel names a master for " .. r.master_name .. " (" .. table.concat(errs, "; ") .. ")"
end

-- red, err, epoch = connect(c): a connection to Redis (with Sentinels: to the master they name, checked with ROLE on
-- every new connection, and asked again every lease or after any error; `epoch` is the master's configuration epoch,
-- 0 without Sentinels).
local function connect(c)
    local r = c.redis
    local host, port, epoch = r.host, r.port, 0
    local m
    if r.sentinels then
        ngx.update_time()
        m = masters[r]
        if not m or ngx.now() - m.at >= c.lease then
            local err
            m, err = resolve(r)
            if not m then
                masters[r] = nil
                return nil, err
            end
            masters[r] = m
        end
        host, port, epoch = m.host, m.port, m.epoch
    end
    local red, err = open(host, port, r, r.username, r.password, r.ssl)
    if not red then
        masters[r] = nil
        return nil, err
    end
    local ok
    if m and (red:get_reused_times() or 0) == 0 then
        local role
        role, err = red:role()
        if type(role) ~= "table" or role[1] ~= "master" then
            red:close()
            masters[r] = nil
            return nil, "redis " .. host .. ":" .. port .. " is not the master of " .. r.master_name .. " ("
                        .. tostring(type(role) == "table" and role[1] or err) .. ")"
        end
    end
    if r.db ~= 0 then
        ok, err = red:select(r.db)
        if not ok then
            red:close()
            return nil, "redis select: " .. tostring(err)
        end
    end
    return red, nil, epoch
end

-- Forgets this worker's master after an error, so that the next exchange asks the Sentinels again.
local function failed(c, red, err)
    red:close()
    masters[c.redis] = nil
    return nil, "redis: " .. tostring(err)
end

-- view, err = cluster.exchange(c, name, demand)
-- Publishes this gateway's demand for service `name`, takes or renews the service's lease, and returns
-- { leader = bool, token = fencing token, holder = gateway id of the leader, demands = { every live gateway's
-- demand } (leader only), desired = the leader's last published decision (a table) or nil }. Any Redis error
-- returns nil, err: the caller then decides locally.
function _M.exchange(c, name, demand)
    local red, err, epoch = connect(c)
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
        return failed(c, red, err)
    end
    for i = 1, #res do
        if type(res[i]) == "table" and res[i][1] == false then
            return failed(c, red, res[i][2]) -- READONLY from a demoted master, NOAUTH, ...
        end
    end
    local lease, gateways, desired = res[4], res[5], res[6]
    -- With Sentinels the token is epoch * 1e9 + the counter: the counter may lose its last increments in a failover
    -- (replication is asynchronous), the epoch only grows, so a leader under a new master has a larger token than
    -- any leader before the failover.
    local view = { leader = lease[1] == 1, token = epoch * 1e9 + (tonumber(lease[2]) or 0),
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
            return failed(c, red, err)
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
        return failed(c, red, err)
    end
    red:set_keepalive(30000, 4)
    return true
end

return _M
