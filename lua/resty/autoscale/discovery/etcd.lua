-- etcd v3 discovery source: every key under a prefix is one peer, read through etcd's HTTP/JSON gateway
-- (`POST /v3/kv/range` with base64 keys). A value is `{"addr":"127.0.0.1:9001","weight":2}` (weight optional) or a
-- plain `127.0.0.1:9001`. Polled every `interval`; when the store's revision has not moved, nothing is parsed.
-- Endpoints (http or https) are tried in order; the one that answered is asked first next time.

local cjson = require "cjson.safe"
local config = require "resty.autoscale.config"
local addr = require "resty.autoscale.discovery.addr"
local http = require "resty.autoscale.http"

local ngx = ngx
local encode_base64 = ngx.encode_base64
local decode_base64 = ngx.decode_base64
local type = type
local ipairs = ipairs
local pairs = pairs
local tostring = tostring
local byte = string.byte
local char = string.char
local fail, number, known, show = config.fail, config.number, config.known, config.show

local _M = {}

-- The largest range answer read (about 10,000 peers' keys and values in base64); a larger one is an error.
local MAX_BODY = 8 * 1024 * 1024

_M.defaults = {
    interval = 0.5,
    timeout = 2,
}

local function endpoint(path, v)
    local u, err = http.parse_url(v)
    if not u or u.path ~= "/" then
        return fail(path, "must be \"http://host:port\" or \"https://host:port\" (%s; got %s)", err or "has a path",
                    show(v))
    end
    return (v:gsub("/$", ""))
end

-- The end of the key range of every key starting with `prefix` (etcd's "prefix end").
local function prefix_end(prefix)
    for i = #prefix, 1, -1 do
        local b = byte(prefix, i)
        if b < 0xff then
            return prefix:sub(1, i - 1) .. char(b + 1)
        end
    end
    return "\0"
end

-- out, err = etcd.validate(path, v)
function _M.validate(path, v)
    if type(v) ~= "table" then
        return fail(path, "must be a table (got %s)", type(v))
    end
    local ok, err = known(path, v, { endpoints = true, prefix = true, interval = true, timeout = true })
    if not ok then
        return nil, err
    end
    local out = {}
    if type(v.prefix) ~= "string" or v.prefix == "" then
        return fail(path .. ".prefix", "must be a non-empty string, e.g. \"/services/api/\" (got %s)", show(v.prefix))
    end
    out.prefix = v.prefix
    if type(v.endpoints) ~= "table" or #v.endpoints == 0 then
        return fail(path .. ".endpoints", "must be a non-empty list of \"http://host:port\"")
    end
    out.endpoints = {}
    for i, e in ipairs(v.endpoints) do
        out.endpoints[i], err = endpoint(path .. ".endpoints[" .. i .. "]", e)
        if not out.endpoints[i] then
            return nil, err
        end
    end
    for field, range in pairs { interval = { 0.05, 3600 }, timeout = { 0.01, 60 } } do
        out[field], err = number(path .. "." .. field, v[field] == nil and _M.defaults[field] or v[field], range[1],
                                 range[2])
        if not out[field] then
            return nil, err
        end
    end
    out.body = cjson.encode { key = encode_base64(out.prefix), range_end = encode_base64(prefix_end(out.prefix)) }
    return out
end

-- peer, err = etcd.peer(value): a stored value as { addr =, weight = }.
function _M.peer(value)
    local text = value:match("^%s*(.-)%s*$")
    local weight = 1
    if text:sub(1, 1) == "{" then
        local obj = cjson.decode(text)
        if type(obj) ~= "table" or type(obj.addr) ~= "string" then
            return nil, "not {\"addr\":\"ip:port\",\"weight\":n}"
        end
        text, weight = obj.addr, obj.weight == nil and 1 or obj.weight
        if type(weight) ~= "number" or weight % 1 ~= 0 or weight < 1 or weight > 10000 then
            return nil, "weight must be an integer between 1 and 10000"
        end
    end
    local a = addr.canonical(text)
    if not a then
        return nil, "not \"ip:port\""
    end
    return { addr = a, weight = weight }
end

-- peers, interval, bad, revision = etcd.fetch(c, last_revision): the peers under the prefix (nil, err on failure);
-- `bad` lists the keys whose values are not peers (key -> reason). When the store's revision is `last_revision`,
-- peers is false (unchanged).
function _M.fetch(c, last_revision)
    local status, body, err
    for i, ep in ipairs(c.endpoints) do
        status, body = http.request { url = ep .. "/v3/kv/range", method = "POST", body = c.body, timeout = c.timeout,
                                      max_body = MAX_BODY, headers = { ["Content-Type"] = "application/json" } }
        if status == 200 then
            if i > 1 then -- the endpoint that answered goes first
                table.remove(c.endpoints, i)
                table.insert(c.endpoints, 1, ep)
            end
            break
        end
        err = (err and err .. "; " or "") .. ep .. ": " .. (status and ("HTTP " .. status) or tostring(body))
        status = nil
    end
    if not status then
        return nil, err
    end
    local reply = cjson.decode(body)
    if type(reply) ~= "table" or type(reply.header) ~= "table" then
        return nil, "reply is not an etcd range response"
    end
    local revision = tostring(reply.header.revision)
    if revision == last_revision then
        return false, c.interval, nil, revision
    end
    local peers, bad = {}, {}
    local kvs = type(reply.kvs) == "table" and reply.kvs or {}
    for _, kv in ipairs(kvs) do
        local key = type(kv) == "table" and type(kv.key) == "string" and decode_base64(kv.key)
        local value = key and type(kv.value) == "string" and decode_base64(kv.value)
        if key then
            local p, why = nil, "value is not base64"
            if value then
                p, why = _M.peer(value)
            end
            if p then
                peers[#peers + 1] = p
            else
                bad[key] = why .. " (got " .. show((value or ""):sub(1, 100)) .. ")"
            end
        end
    end
    return peers, c.interval, bad, revision
end

return _M
