-- The admin HTTP API: JSON over HTTP for reading the state and changing peers and tunables at run time.
--
--     autoscale.admin { token_env = "AUTOSCALE_ADMIN_TOKEN" }           -- init_by_lua*, after configure
--     location /autoscale/admin { content_by_lua_block { autoscale.admin_handler() } }
--
-- Off unless autoscale.admin{} was called. A request is served only from an allowed client address (loopback by
-- default), with the bearer token (compared in constant time), on a known route and method, with a JSON object body
-- of at most `max_body` bytes whose fields are known and valid; anything else gets a 4xx and a JSON reason and
-- changes nothing. Changes go through autoscale.control (every worker at once, validated, all or nothing; not
-- persisted: a reload or restart applies nginx.conf again). Each change is logged with who made it: client address,
-- token name and request id. See docs/admin-api.md.

local bit = require "bit"
local cjson = require "cjson.safe"
local control = require "resty.autoscale.control"
local status = require "resty.autoscale.status"
local events = require "resty.autoscale.events"

local ngx = ngx
local ngx_log = ngx.log
local ngx_NOTICE = ngx.NOTICE
local ngx_WARN = ngx.WARN
local ngx_INFO = ngx.INFO
local get_phase = ngx.get_phase
local sha1_bin = ngx.sha1_bin
local bor = bit.bor
local bxor = bit.bxor
local band = bit.band
local lshift = bit.lshift
local byte = string.byte
local sub = string.sub
local format = string.format
local find = string.find
local match = string.match
local lower = string.lower
local concat = table.concat
local sort = table.sort
local type = type
local pairs = pairs
local ipairs = ipairs
local next = next
local unpack = unpack
local char = string.char
local tostring = tostring
local tonumber = tonumber
local floor = math.floor
local getenv = os.getenv
local io_open = io.open
local error = error

local _M = {}

_M.defaults = {
    allow = { "127.0.0.0/8", "::1/128" },
    max_body = 16384,
    prefix = "/autoscale/admin",
}

local json = cjson.new()
json.decode_invalid_numbers(false) -- no NaN or Infinity from outside
json.decode_max_depth(8)

local settings -- nil while the API is off

-- equal = admin.constant_time_equal(a, b): whether strings `a` and `b` are equal, looking at every byte whatever the
-- first difference is, so that the time does not tell where they differ. Lengths are not hidden: the token check
-- compares the SHA-1 digests (20 bytes each) of the token given and of the right one.
function _M.constant_time_equal(a, b)
    if #a ~= #b then
        return false
    end
    local diff = 0
    for i = 1, #a do
        diff = bor(diff, bxor(byte(a, i), byte(b, i)))
    end
    return diff == 0
end
local constant_time_equal = _M.constant_time_equal

---------------------------------------------------------------------------------------------------- addresses

local function ipv4(text)
    local a, b, c, d = match(text, "^(%d+)%.(%d+)%.(%d+)%.(%d+)$")
    if not a then
        return nil
    end
    local out = {}
    for i, part in ipairs { a, b, c, d } do
        local n = tonumber(part)
        if not n or n > 255 or #part > 3 then
            return nil
        end
        out[i] = n
    end
    return char(out[1], out[2], out[3], out[4])
end

local function ipv6(text)
    local function groups(s)
        local g = {}
        if s == "" then
            return g
        end
        for part in (s .. ":"):gmatch("([^:]*):") do
            if not match(part, "^%x%x?%x?%x?$") then
                return nil
            end
            g[#g + 1] = tonumber(part, 16)
        end
        return g
    end
    local head, tail = match(text, "^(.-)::(.*)$")
    local g
    if head then
        local h, t = groups(head), groups(tail)
        if not h or not t or #h + #t > 7 then
            return nil
        end
        g = h
        for _ = 1, 8 - #h - #t do
            g[#g + 1] = 0
        end
        for _, v in ipairs(t) do
            g[#g + 1] = v
        end
    else
        g = groups(text)
        if not g or #g ~= 8 then
            return nil
        end
    end
    local bytes = {}
    for i, v in ipairs(g) do
        bytes[2 * i - 1], bytes[2 * i] = floor(v / 256), v % 256
    end
    return char(unpack(bytes))
end

-- net, err = cidr(text): { bytes = network address (4 or 16 bytes), bits = prefix length }, or "unix:"
local function cidr(text)
    if text == "unix:" then
        return { unix = true }
    end
    local host, bits = match(text, "^([^/]+)/(%d+)$")
    host = host or text
    local addr = ipv4(host) or ipv6(host)
    if not addr then
        return nil, "must be an IPv4 or IPv6 address or network (\"127.0.0.0/8\", \"::1/128\") or \"unix:\""
    end
    bits = bits and tonumber(bits) or #addr * 8
    if bits > #addr * 8 then
        return nil, format("prefix length must be at most %d", #addr * 8)
    end
    return { bytes = addr, bits = bits }
end

local function in_network(net, addr)
    if net.unix then
        return addr == "unix:" -- $binary_remote_addr of a unix-socket client
    end
    if #addr ~= #net.bytes then
        return false
    end
    local whole = floor(net.bits / 8)
    if sub(addr, 1, whole) ~= sub(net.bytes, 1, whole) then
        return false
    end
    local rest = net.bits % 8
    if rest == 0 then
        return true
    end
    local mask = band(lshift(0xff, 8 - rest), 0xff)
    return band(byte(addr, whole + 1), mask) == band(byte(net.bytes, whole + 1), mask)
end

---------------------------------------------------------------------------------------------------- set-up

local function read_token_file(path)
    local f, err = io_open(path, "rb")
    if not f then
        return nil, err
    end
    local text = f:read("*a") or ""
    f:close()
    return (match(text, "^%s*(.-)%s*$"))
end

-- admin.setup(opts), in init_by_lua*: turns the API on; raises naming every wrong field and the reason (one line each).
function _M.setup(opts)
    local phase = get_phase()
    if phase ~= "init" then
        error("resty.autoscale.admin must be called in init_by_lua* (called in " .. phase .. ")", 3)
    end
    if type(opts) ~= "table" then
        error("resty.autoscale: admin: options must be a table (got " .. type(opts) .. ")", 3)
    end
    local errs = {}
    local function fail(path, msg, ...)
        errs[#errs + 1] = "resty.autoscale: admin." .. path .. ": " .. format(msg, ...)
    end
    local valid = { token_env = true, token_file = true, name = true, allow = true, max_body = true, prefix = true }
    local unknown = {}
    for k in pairs(opts) do
        if not valid[k] then
            unknown[#unknown + 1] = tostring(k)
        end
    end
    if #unknown > 0 then
        sort(unknown)
        local names = {}
        for n in pairs(valid) do names[#names + 1] = n end
        sort(names)
        for _, k in ipairs(unknown) do
            fail(k, "unknown option (valid: %s)", concat(names, ", "))
        end
    end
    local token, source
    if (opts.token_env == nil) == (opts.token_file == nil) then
        fail("token_env", "give exactly one of token_env (an environment variable) and token_file")
    elseif opts.token_env ~= nil then
        source = "token_env"
        if type(opts.token_env) ~= "string" or not match(opts.token_env, "^[%a_][%w_]*$") then
            fail("token_env", "must be the name of an environment variable (got %s)", tostring(opts.token_env))
        else
            token = getenv(opts.token_env)
            if not token or token == "" then
                fail("token_env", "environment variable %s is not set or empty in the environment nginx was started "
                     .. "with", opts.token_env)
                token = nil
            end
        end
    else
        source = "token_file"
        if type(opts.token_file) ~= "string" or opts.token_file == "" then
            fail("token_file", "must be a file path (got %s)", tostring(opts.token_file))
        else
            local err
            token, err = read_token_file(opts.token_file)
            if not token then
                fail("token_file", "cannot read %s: %s", opts.token_file, tostring(err))
            end
        end
    end
    if token and (#token < 16 or find(token, "[%s%c]")) then
        fail(source, "the token must be at least 16 characters without spaces (got %d characters)", #token)
    end
    local name = opts.name == nil and (opts.token_env or "token_file") or opts.name
    if type(name) ~= "string" or not match(name, "^[%w_%.%-]+$") then
        fail("name", "must be letters, digits, '_', '.' and '-' (got %s)", tostring(name))
    end
    local allow = opts.allow == nil and _M.defaults.allow or opts.allow
    local nets = {}
    if type(allow) ~= "table" or #allow == 0 then
        fail("allow", "must be a non-empty list of addresses or networks")
    else
        for i, text in ipairs(allow) do
            local net, err
            if type(text) == "string" then
                net, err = cidr(text)
            end
            if not net then
                fail(format("allow[%d]", i), "%s (got %s)", err or "must be a string", tostring(text))
            end
            nets[i] = net
        end
    end
    local max_body = opts.max_body == nil and _M.defaults.max_body or opts.max_body
    if type(max_body) ~= "number" or max_body ~= floor(max_body) or max_body < 64 or max_body > 1048576 then
        fail("max_body", "must be an integer between 64 and 1048576 (got %s)", tostring(max_body))
    end
    local prefix = opts.prefix == nil and _M.defaults.prefix or opts.prefix
    if type(prefix) ~= "string" or not match(prefix, "^/[^%s%c]*$") or sub(prefix, -1) == "/" then
        fail("prefix", "must be an absolute path without a trailing '/' (got %s)", tostring(prefix))
    end
    if #errs > 0 then
        error(concat(errs, "\n"), 3)
    end
    settings = {
        digest = sha1_bin(token), -- the token itself is not kept
        name = name,
        allow = nets,
        max_body = max_body,
        prefix = prefix,
    }
    return true
end

---------------------------------------------------------------------------------------------------- requests

local function reply(code, body, headers)
    ngx.status = code
    ngx.header["Content-Type"] = "application/json"
    ngx.header["Cache-Control"] = "no-store"
    for k, v in pairs(headers or {}) do
        ngx.header[k] = v
    end
    ngx.say(json.encode(body))
end

-- A refused request: status `code`, {"error": reason}; logged at info (warn for 401/403).
local function refuse(code, reason, headers)
    ngx_log((code == 401 or code == 403) and ngx_WARN or ngx_INFO, "resty.autoscale admin: refused ",
            ngx.req.get_method(), " ", ngx.var.request_uri, " from ", ngx.var.remote_addr, ": ", code, " ", reason)
    return reply(code, { error = reason, status = code, request_id = ngx.var.request_id }, headers)
end

local function allowed(addr)
    for _, net in ipairs(settings.allow) do
        if in_network(net, addr) then
            return true
        end
    end
    return false
end

-- The client address of the connection itself, in $binary_remote_addr's form: what the realip module (with
-- set_real_ip_from) took from X-Forwarded-For or the PROXY protocol is not the connection's, so it does not count.
local function connection_addr()
    local own = ngx.var.realip_remote_addr
    if own == nil or own == ngx.var.remote_addr then
        return ngx.var.binary_remote_addr or ""
    end
    if sub(own, 1, 5) == "unix:" then
        return "unix:"
    end
    return ipv4(own) or ipv6(own) or ""
end

-- ok, code, reason, headers = admin.authorize(): whether this request may change state, for the admin API and for
-- other endpoints that change state (the discovery handler's POST). A change needs the admin API on (without it
-- there is no token, and nothing changes state), a client whose connection comes from its allow list (the
-- connection's own address, not one from X-Forwarded-For), and its bearer token. Browsers cannot send the token
-- (nor the application/json body state changes need) cross-site without a CORS preflight, which is never granted.
function _M.authorize()
    if not settings then
        return false, 403, "state changes need the admin API and its token (autoscale.admin{...} in init_by_lua*)"
    end
    if not allowed(connection_addr()) then
        return false, 403, "client address " .. tostring(ngx.var.realip_remote_addr or ngx.var.remote_addr)
            .. " is not in admin.allow"
    end
    local auth = ngx.var.http_authorization
    local given = auth and match(auth, "^[Bb]earer +([^%s]+) *$")
    if not given then
        return false, 401, "an Authorization: Bearer token is required",
            { ["WWW-Authenticate"] = 'Bearer realm="autoscale"' }
    end
    if not constant_time_equal(sha1_bin(given), settings.digest) then
        return false, 401, "invalid token", { ["WWW-Authenticate"] = 'Bearer realm="autoscale", error="invalid_token"' }
    end
    return true
end

-- ok, code, reason = admin.json_request(): whether a state-changing request carries a JSON body type
-- (application/json; a form or text/plain POST, which a browser sends cross-site without asking, gets 415).
function _M.json_request()
    local ctype = lower(ngx.var.content_type or "")
    if match(ctype, "^application/json%s*$") or match(ctype, "^application/json%s*;") then
        return true
    end
    return false, 415, "a change must be application/json (got Content-Type "
        .. (ngx.var.content_type or "none") .. ")"
end

-- body, code, reason = read_body(): the request body as a decoded JSON object ({} when there is none)
local function read_body()
    local length = ngx.var.http_content_length
    if length and (tonumber(length) or 0) > settings.max_body then
        return nil, 413, format("body larger than %d bytes", settings.max_body)
    end
    ngx.req.read_body()
    local data = ngx.req.get_body_data()
    if not data then
        local file = ngx.req.get_body_file()
        if file then
            local f = io_open(file, "rb")
            data = f and f:read(settings.max_body + 1)
            if f then f:close() end
        end
    end
    if data and #data > settings.max_body then
        return nil, 413, format("body larger than %d bytes", settings.max_body)
    end
    if not data or data == "" then
        return {}
    end
    local value, err = json.decode(data)
    if value == nil then
        return nil, 400, "malformed JSON: " .. tostring(err)
    end
    if type(value) ~= "table" or not match(data, "^%s*{") then
        return nil, 400, "the body must be a JSON object"
    end
    return value
end

local function show(v)
    if v == cjson.null then
        return "null"
    end
    return type(v) == "string" and format("%q", v) or tostring(v)
end

-- ok, code, reason = check(body, fields): every field known, of the right JSON type, the required ones present
local function check(body, fields)
    for k, v in pairs(body) do
        local want = fields[k]
        if not want then
            local names = {}
            for n in pairs(fields) do names[#names + 1] = n end
            sort(names)
            return nil, 422, format("%s: unknown field (valid: %s)", tostring(k),
                                    #names > 0 and concat(names, ", ") or "none")
        end
        local kind = want.type
        if kind ~= "any" and type(v) ~= kind or v == cjson.null then
            return nil, 422, format("%s: must be a %s (got %s)", k, want.json or kind, show(v))
        end
    end
    for k, want in pairs(fields) do
        if want.required and body[k] == nil then
            return nil, 422, k .. ": required"
        end
    end
    return true
end

-- Errors of autoscale.control that are not about the values: they get their own status.
local CONTROL_ERRORS = {
    { "^unknown upstream", 404 },
    { "is not in this upstream$", 404 },
    { "is already in this upstream$", 409 },
    { "cannot lose its last peer$", 409 },
}

local function control_error(err, name)
    for _, e in ipairs(CONTROL_ERRORS) do
        if find(err, e[1]) then
            return e[2], err
        end
    end
    -- config.validate names the field path upstreams.<name>.<field>; the API's path starts at the body.
    -- (one line per wrong field)
    return 422, (("\n" .. err):gsub("\nupstreams%." .. name:gsub("%p", "%%%0") .. "%.", "\n"):sub(2))
end

---------------------------------------------------------------------------------------------------- routes

local function upstream_or_404(name)
    local st, err = status.upstream(name)
    if not st then
        return nil, 404, err
    end
    return st
end

-- PATCH: a merge patch onto the tunables in force (one level deep for `outlier`); control.tune validates the
-- result like nginx.conf (field paths, unknown options, the options that need a reload).
local function tune(name, _, body)
    local options, err = status.tunables(name)
    if not options then
        return nil, 404, err
    end
    if next(body) == nil then
        return nil, 422, "the body must name at least one option to change"
    end
    for k, v in pairs(body) do
        if v == cjson.null then
            return nil, 422, k .. ": must not be null"
        end
        if k == "outlier" and v then
            if type(v) ~= "table" then
                return nil, 422, "outlier: must be an object or false (got " .. show(v) .. ")"
            end
            local merged = {}
            for f, x in pairs(options.outlier) do merged[f] = x end
            for f, x in pairs(v) do merged[f] = x end
            v = merged
        end
        options[k] = v
    end
    local ok
    ok, err = control.tune(name, options)
    if not ok then
        return nil, control_error(err, name)
    end
    return { ok = true, upstream = status.upstream(name) }, 200, "tuned " .. json.encode(body)
end

-- A change through autoscale.control: `call(name, addr, body)` returns what control returns (a result, or nil and
-- the reason); `describe(addr, body, result)` says what changed, for the log.
local function write(call, describe, code)
    return function(name, addr, body)
        local result, err = call(name, addr, body)
        if result == nil then
            return nil, control_error(err, name)
        end
        return { ok = true, changed = result, upstream = status.upstream(name) }, code or 200,
               describe(addr, body, result)
    end
end

local ROUTES = {
    { "^/status$", { GET = function() return status.all() end } },
    { "^/events$", { GET = function() return { events = events.recent(100) } end } },
    { "^/upstreams$", { GET = function() return { upstreams = status.all().upstreams } end } },
    { "^/upstreams/([^/]+)$", {
        GET = function(name) return upstream_or_404(name) end,
        PATCH = { fields = "tunables", run = tune },
    } },
    { "^/upstreams/([^/]+)/peers$", {
        GET = function(name)
            local st, code, reason = upstream_or_404(name)
            return st and { peers = st.peers }, code, reason
        end,
        POST = { fields = { addr = { type = "string", required = true }, weight = { type = "number" } },
                 run = write(function(name, _, body) return control.add_peer(name, body.addr, body.weight) end,
                             function(_, body) return "added peer " .. body.addr .. " weight " .. (body.weight or 1) end,
                             201) },
    } },
    { "^/upstreams/([^/]+)/peers/([^/]+)$", {
        GET = function(name, addr)
            local st, code, reason = upstream_or_404(name)
            if not st then return nil, code, reason end
            for _, p in ipairs(st.peers) do
                if p.addr == addr then return p end
            end
            return nil, 404, "peer " .. addr .. " is not in this upstream"
        end,
        DELETE = { fields = {}, run = write(control.remove_peer, function(addr) return "removed peer " .. addr end) },
    } },
    { "^/upstreams/([^/]+)/peers/([^/]+)/weight$", {
        PUT = { fields = { weight = { type = "number", required = true } },
                run = write(function(name, addr, body) return control.set_weight(name, addr, body.weight) end,
                            function(addr, body) return "set weight of " .. addr .. " to " .. body.weight end) },
    } },
    { "^/upstreams/([^/]+)/peers/([^/]+)/drain$", {
        POST = { fields = {}, run = write(control.drain, function(addr, _, changed)
            return (changed and "drained " or "already draining ") .. addr
        end) },
    } },
    { "^/upstreams/([^/]+)/peers/([^/]+)/enable$", {
        POST = { fields = {}, run = write(control.enable, function(addr, _, changed)
            return (changed and "enabled " or "already enabled ") .. addr
        end) },
    } },
}

-- methods, name, addr = route(path)
local function route(path)
    for _, r in ipairs(ROUTES) do
        local a, b = match(path, r[1])
        if a then
            return r[2], a, b
        end
    end
end

-- autoscale.admin_handler(), in content_by_lua*
function _M.handler()
    if not settings then
        return refuse(403, "the admin API is off (enable it with autoscale.admin{...} in init_by_lua*)")
    end
    local ok, code0, reason0, headers0 = _M.authorize()
    if not ok then
        return refuse(code0, reason0, headers0)
    end
    local uri = ngx.var.uri
    local prefix = settings.prefix
    if sub(uri, 1, #prefix) ~= prefix then
        return refuse(404, "no such route (the API is under " .. prefix .. ")")
    end
    local path = sub(uri, #prefix + 1)
    local methods, a, b = route(path)
    if not methods then
        return refuse(404, "no such route: " .. path)
    end
    local method = ngx.req.get_method()
    local handler = methods[method]
    if not handler then
        local allow = {}
        for m in pairs(methods) do allow[#allow + 1] = m end
        sort(allow)
        return refuse(405, "method " .. method .. " not allowed here", { Allow = concat(allow, ", ") })
    end
    if type(handler) ~= "function" and (method == "POST" or (tonumber(ngx.var.http_content_length) or 0) > 0
                                        or ngx.var.http_transfer_encoding) then
        local json_ok, code1, reason1 = _M.json_request()
        if not json_ok then
            return refuse(code1, reason1)
        end
    end
    local body, code, reason = read_body()
    if not body then
        return refuse(code, reason)
    end
    if type(handler) == "function" then -- a read
        if next(body) ~= nil then
            return refuse(422, "this request takes no body")
        end
        local out
        out, code, reason = handler(a, b)
        if not out then
            return refuse(code, reason)
        end
        return reply(200, out)
    end
    if handler.fields ~= "tunables" then
        local ok
        ok, code, reason = check(body, handler.fields)
        if not ok then
            return refuse(code, reason)
        end
    end
    local out, what
    out, code, what = handler.run(a, b, body)
    if not out then
        return refuse(code, what)
    end
    ngx_log(ngx_NOTICE, "resty.autoscale admin: ", a, ": ", what, " (", method, " ", ngx.var.request_uri,
            " by client=", ngx.var.remote_addr, " token=", settings.name, " request_id=", ngx.var.request_id, ")")
    return reply(code, out)
end

return _M
