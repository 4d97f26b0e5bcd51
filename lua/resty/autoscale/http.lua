-- A small HTTP/1.1 client over cosockets for the background timers (actuators, external signals): one request per
-- connection, http and https (certificate checked against nginx's `lua_ssl_trusted_certificate`), Content-Length
-- and chunked bodies. Never used in a request's own phases.

local ngx = ngx
local tcp = ngx.socket.tcp
local concat = table.concat
local tonumber = tonumber
local pairs = pairs

local _M = {}

-- parts, err = http.parse_url(url): { scheme, host, port, path } (IPv6 hosts in brackets)
function _M.parse_url(url)
    if type(url) ~= "string" then
        return nil, "must be a URL string"
    end
    local scheme, rest = url:match("^(https?)://(.+)$")
    if not scheme then
        return nil, "must start with http:// or https://"
    end
    local hostport, path = rest:match("^([^/]+)(/.*)$")
    hostport, path = hostport or rest, path or "/"
    local host, port = hostport:match("^%[([%x:%.]+)%]:?(%d*)$")
    if not host then
        host, port = hostport:match("^([%w%.%-]+):?(%d*)$")
    end
    if not host then
        return nil, "has a bad host part " .. hostport
    end
    port = tonumber(port) or (scheme == "https" and 443 or 80)
    if port < 1 or port > 65535 then
        return nil, "has a port out of range"
    end
    return { scheme = scheme, host = host, port = port, path = path }
end

local function read_body(sock, headers)
    local len = tonumber(headers["content-length"] or "")
    if len then
        return sock:receive(len)
    end
    if (headers["transfer-encoding"] or ""):lower() == "chunked" then
        local parts = {}
        while true do
            local line, err = sock:receive("*l")
            if not line then
                return nil, err
            end
            local size = tonumber(line:match("^%x+"), 16)
            if not size then
                return nil, "bad chunk size"
            end
            if size == 0 then
                sock:receive("*l")
                return concat(parts)
            end
            local data
            data, err = sock:receive(size)
            if not data then
                return nil, err
            end
            parts[#parts + 1] = data
            sock:receive("*l")
        end
    end
    return sock:receive("*a")
end

-- status, body, headers = http.request{ url =, method =, headers = {}, body =, timeout = seconds, verify = true,
--                                      server_name = name the certificate must carry (default: the URL's host) }
-- status is nil and body the error on a network failure; headers have lower-case names.
function _M.request(opts)
    local u, err = _M.parse_url(opts.url)
    if not u then
        return nil, "url " .. err
    end
    local sock = tcp()
    sock:settimeout((opts.timeout or 2) * 1000)
    local ok
    ok, err = sock:connect(u.host, u.port)
    if not ok then
        return nil, "connect to " .. u.host .. ":" .. u.port .. ": " .. err
    end
    if u.scheme == "https" then
        ok, err = sock:sslhandshake(nil, opts.server_name or u.host, opts.verify ~= false)
        if not ok then
            sock:close()
            return nil, "TLS handshake with " .. u.host .. ":" .. u.port .. ": " .. err
        end
    end
    local host = u.host:find(":", 1, true) and ("[" .. u.host .. "]") or u.host
    local head = { (opts.method or "GET") .. " " .. u.path .. " HTTP/1.1", "Host: " .. host .. ":" .. u.port,
                   "Connection: close", "User-Agent: resty.autoscale" }
    for k, v in pairs(opts.headers or {}) do
        head[#head + 1] = k .. ": " .. v
    end
    if opts.body then
        head[#head + 1] = "Content-Length: " .. #opts.body
    end
    ok, err = sock:send(concat(head, "\r\n") .. "\r\n\r\n" .. (opts.body or ""))
    if not ok then
        sock:close()
        return nil, "send: " .. err
    end
    local line
    line, err = sock:receive("*l")
    local status = line and tonumber(line:match("^HTTP/%d%.%d (%d%d%d)"))
    if not status then
        sock:close()
        return nil, "bad or no status line: " .. tostring(err or line)
    end
    local headers = {}
    while true do
        line, err = sock:receive("*l")
        if not line then
            sock:close()
            return nil, "headers: " .. err
        end
        if line == "" then
            break
        end
        local k, v = line:match("^([^:]+):%s*(.-)%s*$")
        if k then
            headers[k:lower()] = v
        end
    end
    local body
    if opts.method == "HEAD" or status == 204 or status == 304 then
        body = ""
    else
        body, err = read_body(sock, headers)
        if not body then
            sock:close()
            return nil, "body: " .. err
        end
    end
    sock:close()
    return status, body, headers
end

return _M
