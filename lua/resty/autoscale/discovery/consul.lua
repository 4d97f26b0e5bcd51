-- Consul discovery source: the instances of one service from Consul's health API (`GET /v1/health/service/<name>`),
-- read with blocking queries: the first request reads the current set and its `X-Consul-Index`; each later one
-- passes `index=<that index>&wait=<wait>s` and Consul answers when the set changes (or after `wait` plus up to 1/16
-- of it). The index rules of Consul's "Blocking Queries" documentation are followed: an index that goes backwards
-- resets it to 0 (a fresh, non-blocking read), an index of 0 is taken as 1, and requests are spaced by at least
-- MIN_GAP so that a misbehaving server cannot cause a tight loop; errors back off (see discovery.lua).
--
-- An instance's address is `Service.Address`, or `Node.Address` when that is empty; its weight is
-- `Service.Weights.Passing`, or `Service.Weights.Warning` while its worst check is `warning` (a soft signal: Consul's
-- own weighting); an instance with a `critical` check (maintenance mode included) is left out, and so is a warning
-- one whose Warning weight is 0. With `passing = false` health is ignored and every instance keeps its Passing
-- weight. The ACL token (option `token`, or the environment variable named by `token_env`) goes in `X-Consul-Token`;
-- it is never logged and shows as "[redacted]" in the status.

local cjson = require "cjson.safe"
local config = require "resty.autoscale.config"
local addr = require "resty.autoscale.discovery.addr"
local http = require "resty.autoscale.http"

local ngx = ngx
local escape_uri = ngx.escape_uri
local type = type
local ipairs = ipairs
local pairs = pairs
local tostring = tostring
local tonumber = tonumber
local next = next
local floor = math.floor
local fail, number, known, show = config.fail, config.number, config.known, config.show

local _M = { watch = true }

local MAX_BODY = 8 * 1024 * 1024 -- the largest answer read (thousands of instances with their checks)
local MIN_GAP = 0.1 -- s between two requests, whatever the server answers
local ENV_TOKENS = {} -- token_env -> value, read in the master (workers' environments are cleared by nginx)

_M.defaults = {
    passing = true,
    wait = 10,
    timeout = 2,
    retry = 1,
}

local WORST = { passing = 0, warning = 1, critical = 2, maintenance = 2 }

-- out, err = consul.validate(path, v)
function _M.validate(path, v)
    if type(v) ~= "table" then
        return fail(path, "must be a table (got %s)", type(v))
    end
    local ok, err = known(path, v, { address = true, service = true, tag = true, dc = true, token = true,
                                     token_env = true, passing = true, wait = true, timeout = true, retry = true })
    if not ok then
        return nil, err
    end
    local u
    u, err = http.parse_url(v.address)
    if not u or u.path ~= "/" then
        return fail(path .. ".address", "must be Consul's \"http://host:port\" or \"https://host:port\" (%s; got %s)",
                    err or "has a path", show(v.address))
    end
    local out = { address = v.address:gsub("/$", "") }
    for _, k in ipairs { "service", "tag", "dc" } do
        local x = v[k]
        if x ~= nil or k == "service" then
            if type(x) ~= "string" or x == "" or #x > 256 or x:find("[%c%s/?#&]") then
                return fail(path .. "." .. k, "must be a %s name without spaces, '/', '?', '#' or '&' (got %s)",
                            k == "dc" and "datacenter" or k, show(x))
            end
            out[k] = x
        end
    end
    if v.passing ~= nil and type(v.passing) ~= "boolean" then
        return fail(path .. ".passing", "must be true or false (got %s)", show(v.passing))
    end
    out.passing = v.passing == nil and _M.defaults.passing or v.passing
    for field, range in pairs { wait = { 1, 600 }, timeout = { 0.1, 60 }, retry = { 0.05, 60 } } do
        out[field], err = number(path .. "." .. field, v[field] == nil and _M.defaults[field] or v[field], range[1],
                                 range[2])
        if not out[field] then
            return nil, err
        end
    end
    out.wait = floor(out.wait)
    if v.token ~= nil and v.token_env ~= nil then
        return fail(path, "give token or token_env, not both")
    end
    if v.token ~= nil then
        if type(v.token) ~= "string" or v.token == "" or v.token:find("[%c%s]") then
            return fail(path .. ".token", "must be an ACL token (a non-empty string without spaces)")
        end
        out.token = v.token
    elseif v.token_env ~= nil then
        local name = v.token_env
        local value = type(name) == "string" and (ENV_TOKENS[name] or os.getenv(name))
        if not value or value == "" then
            return fail(path .. ".token_env", "environment variable %s is not set (nginx passes it on with `env %s;` in nginx.conf)",
                        show(name), tostring(name))
        end
        if value:find("[%c%s]") then
            return fail(path .. ".token_env", "environment variable %s holds no ACL token (it has spaces)", name)
        end
        ENV_TOKENS[name] = value
        out.token_env, out.token = name, value
    end
    local q = ""
    if out.tag then
        q = q .. "&tag=" .. escape_uri(out.tag)
    end
    if out.dc then
        q = q .. "&dc=" .. escape_uri(out.dc)
    end
    out.path = "/v1/health/service/" .. escape_uri(out.service)
    out.query = q
    return out
end

local function weight(x)
    if x == nil then
        return 1
    end
    if type(x) ~= "number" or x ~= x or x < 0 then
        return nil
    end
    x = floor(x)
    return x > 10000 and 10000 or x
end

-- peer, why = consul.instance(entry, passing): one entry of a health answer as { addr, weight, node, health }, false
-- when its health leaves it out, or nil and why it is not an instance.
function _M.instance(e, passing)
    local svc, node = type(e) == "table" and e.Service, type(e) == "table" and e.Node
    if type(svc) ~= "table" or type(node) ~= "table" then
        return nil, "not a health entry (no Service or Node)"
    end
    local ip = (type(svc.Address) == "string" and svc.Address ~= "") and svc.Address or node.Address
    local a = addr.join(ip, svc.Port)
    if not a then
        return nil, "address " .. show(ip) .. " port " .. show(svc.Port) .. " is not ip:port"
    end
    local worst = 0
    for _, c in ipairs(type(e.Checks) == "table" and e.Checks or {}) do
        local w = type(c) == "table" and WORST[c.Status]
        if w == nil then
            return nil, "check status " .. show(type(c) == "table" and c.Status or c) .. " unknown"
        end
        worst = worst > w and worst or w
    end
    local ws = type(svc.Weights) == "table" and svc.Weights or {}
    local wp, ww = weight(ws.Passing), weight(ws.Warning)
    if not wp or not ww then
        return nil, "Weights are not numbers"
    end
    local health = worst == 0 and "passing" or worst == 1 and "warning" or "critical"
    local w = wp
    if passing then
        if worst == 2 then
            return false
        end
        if worst == 1 then
            w = ww
        end
    end
    if w < 1 then
        return false
    end
    return { addr = a, weight = w, node = type(node.Node) == "string" and node.Node or nil, health = health }
end

-- peers, interval, bad, index = consul.fetch(c, last_index): the service's instances (nil, err on failure; false
-- when the index has not moved). Blocks up to c.wait when `last_index` is a valid index.
function _M.fetch(c, last)
    local index = tonumber(last) or 0
    local url = c.address .. c.path .. "?index=" .. index .. (index > 0 and ("&wait=" .. c.wait .. "s") or "")
                .. c.query
    local headers = { Accept = "application/json" }
    if c.token then
        headers["X-Consul-Token"] = c.token
    end
    local status, body, head = http.request {
        url = url, timeout = (index > 0 and c.wait + c.wait / 16 or 0) + c.timeout, max_body = MAX_BODY,
        headers = headers,
    }
    if not status then
        return nil, body
    end
    if status ~= 200 then
        local why = status == 403 and " (the ACL token is missing, unknown or lacks service:read)" or ""
        return nil, "HTTP " .. status .. why .. ": " .. body:sub(1, 200):gsub("%s+$", "")
    end
    local new = head["x-consul-index"]
    new = new and new:find("^%d+$") and tonumber(new)
    if not new then
        return nil, "answer has no valid X-Consul-Index (got " .. show(head["x-consul-index"]) .. ")"
    end
    if new == 0 then -- Consul's documented sanity rule: never block on 0
        new = 1
    end
    local reply = cjson.decode(body)
    if type(reply) ~= "table" or (next(reply) ~= nil and reply[1] == nil) then
        return nil, "answer is not a JSON list of health entries"
    end
    local revision = tostring(new)
    if new < index then -- a restored snapshot, another server's view: start over without blocking
        ngx.log(ngx.NOTICE, "resty.autoscale: discovery of Consul service ", c.service, ": X-Consul-Index went back ",
                "from ", index, " to ", new, "; index reset")
        revision = "0"
    elseif new == index then
        return false, MIN_GAP, nil, revision
    end
    local peers, bad, seen = {}, {}, {}
    for i, e in ipairs(reply) do
        local p, why = _M.instance(e, c.passing)
        local id = type(e) == "table" and type(e.Service) == "table" and type(e.Service.ID) == "string"
                   and e.Service.ID or ("#" .. i)
        if p == nil then
            bad[id] = why
        elseif p and not seen[p.addr] then
            seen[p.addr] = true
            peers[#peers + 1] = p
        end
    end
    return peers, MIN_GAP, bad, revision
end

return _M
