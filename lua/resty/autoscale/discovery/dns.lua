-- DNS discovery source: the A, AAAA or SRV records of one name, asked again when their TTL runs out (kept within
-- min_ttl..max_ttl). Works with Consul (`api.service.consul`, `_api._tcp.service.consul`) and Kubernetes
-- (`svc.ns.svc.cluster.local`, `_http._tcp.svc.ns.svc.cluster.local`) naming: the name is asked as written.
--
-- The client is lua-resty-dns (Debian's lua-nginx-dns installs it as nginx.dns.resolver). A reply with an error code
-- (SERVFAIL, NXDOMAIN, REFUSED, ...) or no reply at all is a failure, so that discovery keeps the last good set; an
-- empty NOERROR reply is an empty set.

local config = require "resty.autoscale.config"
local addr = require "resty.autoscale.discovery.addr"

local ok_resolver, resolver = pcall(require, "nginx.dns.resolver")
if not ok_resolver then
    ok_resolver, resolver = pcall(require, "resty.dns.resolver")
end

local type = type
local ipairs = ipairs
local pairs = pairs
local tonumber = tonumber
local tostring = tostring
local io_open = io.open
local min = math.min
local max = math.max
local floor = math.floor
local fail, number, known, show = config.fail, config.number, config.known, config.show

local _M = {}

_M.defaults = {
    type = "A",
    min_ttl = 1,
    max_ttl = 300,
    timeout = 2,
    retries = 2,
}

local TYPES = { A = 1, AAAA = 28, SRV = 33 }

-- The nameservers of /etc/resolv.conf, as { host, port } pairs.
local function system_nameservers()
    local f = io_open("/etc/resolv.conf")
    if not f then
        return {}
    end
    local out = {}
    for line in f:lines() do
        local ip = line:match("^%s*nameserver%s+([^%s#;]+)")
        if ip and not ip:find("%%") then -- a link-local scope cannot be used by a cosocket
            out[#out + 1] = { ip, 53 }
        end
    end
    f:close()
    return out
end

local function nameserver(path, v)
    if type(v) ~= "string" then
        return fail(path, "must be \"ip\" or \"ip:port\" (got %s)", type(v))
    end
    local host, port = v:match("^%[([%x:%.]+)%]:(%d+)$")
    if not host then
        host, port = v:match("^([%d%.]+):(%d+)$")
    end
    if not host then
        host = v:match("^[%d%.]+$") or v:match("^[%x:]+$")
        port = "53"
    end
    port = tonumber(port)
    if not host or not port or port < 1 or port > 65535 then
        return fail(path, "must be \"ip\", \"ip:port\" or \"[ipv6]:port\" (got %s)", show(v))
    end
    return { host, port }
end

-- out, err = dns.validate(path, v)
function _M.validate(path, v)
    if type(v) ~= "table" then
        return fail(path, "must be a table (got %s)", type(v))
    end
    local ok, err = known(path, v, {
        name = true, type = true, port = true, nameservers = true, min_ttl = true, max_ttl = true, timeout = true,
        retries = true, weight = true,
    })
    if not ok then
        return nil, err
    end
    local d = _M.defaults
    local out = {}
    if type(v.name) ~= "string" or #v.name == 0 or #v.name > 253 or v.name:find("[^%w%-%._]") then
        return fail(path .. ".name", "must be a DNS name (letters, digits, '-', '_', '.'; got %s)", show(v.name))
    end
    out.name = v.name
    out.type = v.type == nil and d.type or v.type
    if not TYPES[out.type] then
        return fail(path .. ".type", "must be \"A\", \"AAAA\" or \"SRV\" (got %s)", show(out.type))
    end
    out.qtype = TYPES[out.type]
    if out.type == "SRV" then
        if v.port ~= nil then
            return fail(path .. ".port", "SRV records carry their own ports: leave port out")
        end
    else
        out.port, err = number(path .. ".port", v.port, 1, 65535, true)
        if not out.port then
            return nil, v.port == nil and (path .. ".port: required for " .. out.type .. " records") or err
        end
    end
    for field, range in pairs {
        min_ttl = { 0.05, 86400 }, max_ttl = { 0.05, 86400 }, timeout = { 0.01, 60 }, retries = { 1, 10, true },
        weight = { 1, 10000, true },
    } do
        local x = v[field]
        if x == nil then
            out[field] = d[field] or 1
        else
            out[field], err = number(path .. "." .. field, x, range[1], range[2], range[3])
            if not out[field] then
                return nil, err
            end
        end
    end
    if out.max_ttl < out.min_ttl then
        return fail(path .. ".max_ttl", "must not be less than min_ttl (%s < %s)", out.max_ttl, out.min_ttl)
    end
    if v.nameservers == nil then
        out.nameservers = system_nameservers()
        if #out.nameservers == 0 then
            return fail(path .. ".nameservers", "none given and none found in /etc/resolv.conf")
        end
    else
        if type(v.nameservers) ~= "table" or #v.nameservers == 0 then
            return fail(path .. ".nameservers", "must be a non-empty list of \"ip[:port]\"")
        end
        out.nameservers = {}
        for i, s in ipairs(v.nameservers) do
            out.nameservers[i], err = nameserver(path .. ".nameservers[" .. i .. "]", s)
            if not out.nameservers[i] then
                return nil, err
            end
        end
    end
    if not ok_resolver then
        return fail(path, "needs lua-resty-dns (Debian package lua-nginx-dns): %s", tostring(resolver))
    end
    return out
end

local function query(c, name, qtype, additional)
    local r, err = resolver:new { nameservers = c.nameservers, retrans = c.retries, timeout = c.timeout * 1000 }
    if not r then
        return nil, err
    end
    local answers
    answers, err = r:query(name, { qtype = qtype, additional_section = additional })
    if not answers then
        return nil, err
    end
    if type(answers) ~= "table" then
        return nil, "the resolver library answered " .. type(answers)
    end
    if answers.errcode then
        return nil, tostring(answers.errstr or "error") .. " (rcode " .. tostring(answers.errcode) .. ")"
    end
    return answers
end

local function lower(name)
    return type(name) == "string" and name:lower():gsub("%.$", "") or ""
end

-- A record's TTL as a number of seconds (0 when it has none that is a number).
local function seconds(ttl)
    return type(ttl) == "number" and ttl == ttl and ttl or 0
end

-- The addresses of the A (then AAAA) records in `answers` named `name` (any name when nil), and their least TTL.
local function addresses(answers, name, qtype)
    local out, ttl = {}, nil
    for _, a in ipairs(answers) do
        if type(a) == "table" and a.type == qtype and type(a.address) == "string" and (name == nil or lower(a.name) == name) then
            out[#out + 1] = a.address
            ttl = min(ttl or seconds(a.ttl), seconds(a.ttl))
        end
    end
    return out, ttl
end

-- Addresses of an SRV target: from the reply's additional section when the server put them there (Consul and
-- CoreDNS do), else asked for (A, then AAAA when there is no A record).
local function target_addresses(c, answers, target)
    for _, qtype in ipairs { TYPES.A, TYPES.AAAA } do
        local list, ttl = addresses(answers, target, qtype)
        if #list > 0 then
            return list, ttl
        end
    end
    for _, qtype in ipairs { TYPES.A, TYPES.AAAA } do
        local reply, err = query(c, target, qtype, false)
        if not reply then
            return nil, target .. ": " .. tostring(err)
        end
        local list, ttl = addresses(reply, nil, qtype)
        if #list > 0 then
            return list, ttl
        end
    end
    return {}, nil
end

-- peers, ttl = dns.fetch(c): { { addr =, weight = } ... } and the seconds until the next question; nil, err on failure.
function _M.fetch(c)
    local answers, err = query(c, c.name, c.qtype, c.qtype == TYPES.SRV)
    if not answers then
        return nil, err
    end
    local peers, ttl = {}, nil
    if c.qtype ~= TYPES.SRV then
        local list
        list, ttl = addresses(answers, nil, c.qtype)
        for _, ip in ipairs(list) do
            local a = addr.join(ip, c.port)
            if a then
                peers[#peers + 1] = { addr = a, weight = c.weight }
            end
        end
    else
        -- RFC 2782: only the lowest priority is used; the others are for when it is gone.
        local best
        local function srv(a)
            return type(a) == "table" and a.type == TYPES.SRV and a.section == 1 and type(a.priority) == "number"
                   and a.priority == a.priority
        end
        for _, a in ipairs(answers) do
            if srv(a) then
                best = best and min(best, a.priority) or a.priority
            end
        end
        for _, a in ipairs(answers) do
            if srv(a) and a.priority == best and type(a.port) == "number" and a.port > 0 then
                ttl = min(ttl or seconds(a.ttl), seconds(a.ttl))
                local list, t = target_addresses(c, answers, lower(a.target))
                if not list then
                    return nil, t
                end
                ttl = t and min(ttl, t) or ttl
                for _, ip in ipairs(list) do
                    local text = addr.join(ip, a.port)
                    if text then
                        local w = type(a.weight) == "number" and a.weight == a.weight and floor(a.weight) or 1
                        peers[#peers + 1] = { addr = text, weight = max(1, min(10000, w)) }
                    end
                end
            end
        end
    end
    return peers, max(c.min_ttl, min(c.max_ttl, ttl or c.min_ttl))
end

return _M
