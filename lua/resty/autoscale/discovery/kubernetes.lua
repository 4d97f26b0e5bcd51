-- Kubernetes discovery source: the endpoints of one Service from its `discovery.k8s.io/v1` EndpointSlices (label
-- `kubernetes.io/service-name=<service>`), read as the API's list-then-watch pattern asks:
--
--   * list (pages of PAGE slices with `continue`; a 410 on a continue token starts the list over), keeping the list's
--     `metadata.resourceVersion`;
--   * watch from that resourceVersion (`watch=1&allowWatchBookmarks=true&timeoutSeconds=<watch_timeout>`): a chunked
--     stream of one JSON event per line: ADDED / MODIFIED / DELETED carry a slice and move the resourceVersion,
--     BOOKMARK only moves it, ERROR with a Status of code 410 (the version is too old: "Expired" / "Gone"), or an
--     HTTP 410 to the watch request, means list again (once: the new list's version is current); a stream that ends
--     at timeoutSeconds is watched again from the last version seen; one that ends in the middle of an event, or
--     carries a line that is not JSON, is a failure (retried with backoff; the partial event is not applied; a bad
--     line makes the next attempt list again).
--
-- An endpoint serves when its `conditions.ready` is true (nil counts as true, as the API documents) and it is not
-- terminating; one that is `serving` and `terminating` is drained (no new requests, in-flight ones finish), like any
-- endpoint that left; one neither ready nor terminating is left out. Its first address is used (the API says they are
-- fungible), with the slice's port named `port_name` (the only port when there is one and port_name is not given);
-- `zone` and `nodeName` are kept with the peer. Credentials: the service account's token file (read anew for every
-- request, as projected tokens rotate), the API server from KUBERNETES_SERVICE_HOST / KUBERNETES_SERVICE_PORT (read
-- in the master at start) unless `api` is given; the server's certificate is checked against
-- lua_ssl_trusted_certificate (the service account's ca.crt) for `server_name`.

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
local floor = math.floor
local fail, number, known, show = config.fail, config.number, config.known, config.show

local _M = { watch = true }

local MAX_BODY = 16 * 1024 * 1024 -- the largest list page or watch event read
-- slices per list page: a slice holds up to 100 endpoints (the EndpointSlice controller's default), so that a page
-- is decoded in about 1 ms (cjson: 0.4 ms per 100 endpoints on 2 cores), within a timer step's 2 ms
local PAGE = 3
local MAX_PAGES = 1000
local ENV = {} -- KUBERNETES_SERVICE_HOST / _PORT as the master saw them

_M.defaults = {
    namespace = "default",
    token_file = "/var/run/secrets/kubernetes.io/serviceaccount/token",
    ca_file = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt",
    server_name = "kubernetes.default.svc",
    watch_timeout = 10,
    timeout = 2,
    retry = 1,
}

local function read_file(path)
    local f, err = io.open(path, "rb")
    if not f then
        return nil, err
    end
    local data = f:read("*a")
    f:close()
    return data
end

local function dns_label(x, max)
    return type(x) == "string" and #x <= max and x:find("^[a-z0-9][-a-z0-9]*$") ~= nil and x:find("[a-z0-9]$") ~= nil
end

-- out, err = kubernetes.validate(path, v)
function _M.validate(path, v)
    if type(v) ~= "table" then
        return fail(path, "must be a table (got %s)", type(v))
    end
    local ok, err = known(path, v, { service = true, namespace = true, port_name = true, api = true, token_file = true,
                                     ca_file = true, server_name = true, watch_timeout = true, timeout = true,
                                     retry = true })
    if not ok then
        return nil, err
    end
    local out = {}
    if not dns_label(v.service, 63) then
        return fail(path .. ".service", "must be a Service name (a DNS label, e.g. \"api\"; got %s)", show(v.service))
    end
    out.service = v.service
    out.namespace = v.namespace == nil and _M.defaults.namespace or v.namespace
    if not dns_label(out.namespace, 63) then
        return fail(path .. ".namespace", "must be a namespace name (a DNS label; got %s)", show(v.namespace))
    end
    if v.port_name ~= nil then
        if not dns_label(v.port_name, 63) then
            return fail(path .. ".port_name", "must be the Service port's name (a DNS label; got %s)", show(v.port_name))
        end
        out.port_name = v.port_name
    end
    local api = v.api
    if api == nil then
        -- read in the master (init_by_lua) and kept for validations in workers, whose environment nginx clears
        ENV.host = ENV.host or os.getenv("KUBERNETES_SERVICE_HOST")
        ENV.port = ENV.port or os.getenv("KUBERNETES_SERVICE_PORT")
        local host, port = ENV.host, ENV.port or "443"
        if not host or host == "" then
            return fail(path .. ".api", "not given, and KUBERNETES_SERVICE_HOST is not set (not in a pod): give "
                        .. "api = \"https://host:port\"")
        end
        api = "https://" .. (host:find(":", 1, true) and ("[" .. host .. "]") or host) .. ":" .. port
    end
    local u
    u, err = http.parse_url(api)
    if not u or u.scheme ~= "https" or u.path ~= "/" then
        return fail(path .. ".api", "must be the API server's \"https://host:port\" (%s; got %s)",
                    err or (u and u.path ~= "/" and "has a path" or "not https"), show(api))
    end
    out.api = api:gsub("/$", "")
    out.server_name = v.server_name == nil and _M.defaults.server_name or v.server_name
    if type(out.server_name) ~= "string" or not out.server_name:find("^[%w%.%-]+$") then
        return fail(path .. ".server_name", "must be a host name (got %s)", show(v.server_name))
    end
    for _, k in ipairs { "token_file", "ca_file" } do
        out[k] = v[k] == nil and _M.defaults[k] or v[k]
        local data
        if type(out[k]) == "string" then
            data, err = read_file(out[k])
        end
        if not data then
            return fail(path .. "." .. k, "cannot read %s: %s", show(out[k]), tostring(err or "not a path"))
        end
    end
    for field, range in pairs { watch_timeout = { 1, 3600 }, timeout = { 0.1, 60 }, retry = { 0.05, 60 } } do
        out[field], err = number(path .. "." .. field, v[field] == nil and _M.defaults[field] or v[field], range[1],
                                 range[2])
        if not out[field] then
            return nil, err
        end
    end
    out.watch_timeout = floor(out.watch_timeout)
    out.base = out.api .. "/apis/discovery.k8s.io/v1/namespaces/" .. out.namespace .. "/endpointslices?labelSelector="
               .. escape_uri("kubernetes.io/service-name=" .. out.service)
    return out
end

-- endpoints, why = kubernetes.slice(obj, port_name): the endpoints of one EndpointSlice as a list of
-- { addr, zone, node, serving = true | "terminating" | false }, or nil and why the slice is skipped.
function _M.slice(obj, port_name)
    if type(obj) ~= "table" or type(obj.metadata) ~= "table" or type(obj.metadata.name) ~= "string" then
        return nil, "not an EndpointSlice (no metadata.name)"
    end
    if obj.addressType ~= "IPv4" and obj.addressType ~= "IPv6" then
        return nil, "addressType " .. show(obj.addressType) .. " (only IPv4 and IPv6 are used)"
    end
    local port
    local ports = type(obj.ports) == "table" and obj.ports or {}
    for _, p in ipairs(ports) do
        local name = type(p) == "table" and (p.name == nil and "" or p.name)
        if port_name == nil and #ports == 1 or name == port_name then
            port = type(p) == "table" and p.port
        end
    end
    if port == nil then
        return nil, port_name and ("no port named " .. port_name)
                    or (#ports == 0 and "no ports" or "several ports: give discovery.kubernetes.port_name")
    end
    local out = {}
    for _, e in ipairs(type(obj.endpoints) == "table" and obj.endpoints or {}) do
        local first = type(e) == "table" and type(e.addresses) == "table" and e.addresses[1]
        local a = first and addr.join(first, port)
        if a then
            local c = type(e.conditions) == "table" and e.conditions or {}
            local ready = c.ready ~= false
            local terminating = c.terminating == true
            local serving = c.serving
            if serving == nil then
                serving = ready
            end
            out[#out + 1] = {
                addr = a, zone = type(e.zone) == "string" and e.zone or nil,
                node = type(e.nodeName) == "string" and e.nodeName or nil,
                serving = (ready and not terminating) or (terminating and serving and "terminating") or false,
            }
        end
    end
    return out
end

local function peers_of(st)
    local by, list, terminating = {}, {}, 0
    for _, eps in pairs(st.slices) do
        for _, e in ipairs(eps) do
            if e.serving == true then
                by[e.addr] = e
            elseif e.serving == "terminating" then
                terminating = terminating + 1
            end
        end
    end
    for a, e in pairs(by) do
        list[#list + 1] = { addr = a, weight = 1, zone = e.zone, node = e.node }
    end
    st.terminating = terminating
    return list
end

local function get(c, url, stream)
    local token, err = read_file(c.token_file)
    if not token then
        return nil, "cannot read token_file: " .. tostring(err)
    end
    local opts = { url = url, server_name = c.server_name, max_body = MAX_BODY,
                   timeout = stream and (c.watch_timeout + c.timeout) or c.timeout,
                   headers = { Authorization = "Bearer " .. token:gsub("%s+$", ""), Accept = "application/json" } }
    if stream then
        return http.open(opts)
    end
    return http.request(opts)
end

local function status_text(status, body)
    local s = cjson.decode(body or "")
    local msg = type(s) == "table" and type(s.message) == "string" and s.message or tostring(body):sub(1, 200)
    return "HTTP " .. tostring(status) .. ": " .. msg
end

-- ok, err = list(c, st): the slices anew into st.slices, st.rv the list's resourceVersion
local function list(c, st)
    local slices, cont, rv = {}, nil, nil
    local bad = {}
    for _ = 1, MAX_PAGES do
        local url = c.base .. "&limit=" .. PAGE .. (cont and ("&continue=" .. escape_uri(cont)) or "")
        local status, body = get(c, url)
        if status == 410 and cont then -- the continue token expired: the list starts over
            slices, cont, bad = {}, nil, {}
        elseif status ~= 200 then
            return nil, status and ("list: " .. status_text(status, body)) or ("list: " .. tostring(body))
        else
            local l = cjson.decode(body)
            if type(l) ~= "table" or type(l.items) ~= "table" or type(l.metadata) ~= "table"
                    or type(l.metadata.resourceVersion) ~= "string" then
                return nil, "list: answer is not an EndpointSliceList"
            end
            for _, obj in ipairs(l.items) do
                local eps, why = _M.slice(obj, c.port_name)
                local name = type(obj) == "table" and type(obj.metadata) == "table" and obj.metadata.name
                if eps then
                    slices[name] = eps
                elseif type(name) == "string" then
                    bad[name] = why
                end
            end
            rv = l.metadata.resourceVersion
            cont = type(l.metadata.continue) == "string" and l.metadata.continue ~= "" and l.metadata.continue or nil
            if not cont then
                st.slices, st.rv = slices, rv
                return true, bad
            end
        end
    end
    return nil, "list: more than " .. MAX_PAGES .. " pages"
end

local function close(st)
    if st.stream then
        st.stream.close()
        st.stream = nil
    end
end

-- peers, interval, bad, rv = kubernetes.fetch(c, last_rv, st): lists when `st` has no resourceVersion, else reads the
-- watch (opening it when needed) up to the next change; false when the watch ended without one (watched again at
-- once). nil, err on failure.
function _M.fetch(c, _, st)
    if not st.rv then
        close(st)
        local ok, bad = list(c, st)
        if not ok then
            return nil, bad
        end
        return peers_of(st), 0, bad, st.rv
    end
    if not st.stream then
        local status, stream = get(c, c.base .. "&watch=1&allowWatchBookmarks=true&timeoutSeconds=" .. c.watch_timeout
                                      .. "&resourceVersion=" .. escape_uri(st.rv), true)
        if not status then
            return nil, "watch: " .. tostring(stream)
        end
        if status ~= 200 then
            local body = stream.body()
            stream.close()
            if status == 410 then
                ngx.log(ngx.NOTICE, "resty.autoscale: discovery of Kubernetes service ", c.namespace, "/", c.service,
                        ": watch answered 410 Gone; listing again")
                st.rv = nil
                return false, 0
            end
            return nil, "watch: " .. status_text(status, body)
        end
        st.stream = stream
    end
    while true do
        local line, err = st.stream.line()
        if not line then
            close(st)
            if err == "closed" then -- timeoutSeconds: watched again from the last version
                return false, 0
            end
            return nil, "watch: " .. tostring(err)
        end
        if line:find("%S") then
            local ev = cjson.decode(line)
            local obj = type(ev) == "table" and ev.object
            local md = type(obj) == "table" and obj.metadata
            if type(ev) ~= "table" or type(obj) ~= "table" then
                close(st)
                st.rv = nil
                return nil, "watch: an event that is not JSON (" .. show(line:sub(1, 80)) .. "); listing again"
            end
            if ev.type == "ERROR" then
                close(st)
                st.rv = nil
                if obj.code == 410 then
                    ngx.log(ngx.NOTICE, "resty.autoscale: discovery of Kubernetes service ", c.namespace, "/",
                            c.service, ": watch expired (410 ", tostring(obj.reason), "); listing again")
                    return false, 0
                end
                return nil, "watch: ERROR event " .. status_text(obj.code, cjson.encode(obj))
            end
            local rv = type(md) == "table" and md.resourceVersion
            if type(rv) ~= "string" then
                close(st)
                st.rv = nil
                return nil, "watch: a " .. show(ev.type) .. " event without metadata.resourceVersion; listing again"
            end
            if ev.type == "BOOKMARK" then
                st.rv = rv
            elseif ev.type == "ADDED" or ev.type == "MODIFIED" or ev.type == "DELETED" then
                st.rv = rv
                local name = md.name
                local bad = {}
                if ev.type == "DELETED" then
                    st.slices[name] = nil
                else
                    local eps, why = _M.slice(obj, c.port_name)
                    st.slices[name] = eps or nil
                    if not eps and type(name) == "string" then
                        bad[name] = why
                    end
                end
                return peers_of(st), 0, bad, rv
            else
                close(st)
                st.rv = nil
                return nil, "watch: unknown event type " .. show(ev.type) .. "; listing again"
            end
        end
    end
end

return _M
