-- A small HTTP/1.1 client over cosockets for the background timers (actuators, external signals): one request per
-- connection, http and https (certificate checked against nginx's `lua_ssl_trusted_certificate`), Content-Length
-- and chunked bodies. Never used in a request's own phases. One deadline covers the whole exchange, and every read is
-- bounded: the body by `max_body`, each line by 16 KiB, the header by 100 fields.

local ngx = ngx
local tcp = ngx.socket.tcp
local ngx_now = ngx.now
local ngx_update_time = ngx.update_time
local concat = table.concat
local tonumber = tonumber
local tostring = tostring
local pairs = pairs
local setmetatable = setmetatable
local ceil = math.ceil
local find, sub, match, lower, byte = string.find, string.sub, string.match, string.lower, string.byte

local MAX_BODY = 1024 * 1024 -- default max_body
local MAX_LINE = 16384 -- status line, header field, chunk size line
local MAX_HEADERS = 100 -- header fields (and chunked trailer fields)
local CHUNK = 16384 -- one receiveany

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

-- Every read goes through a Reader: one overall deadline for the whole exchange (each socket operation gets the
-- time that is left), and every read bounded (a line by MAX_LINE, a body by max_body), so that no endpoint can hold
-- a timer past its timeout or make it buffer more than it asked for.
local Reader = {}
Reader.__index = Reader

local function new_reader(sock, timeout, deadline, max_body)
    return setmetatable({ sock = sock, timeout = timeout, deadline = deadline, max_body = max_body, buf = "" },
                        Reader)
end

-- ok, err = r:arm(): sets the socket's timeout to the time left before the deadline
function Reader:arm()
    ngx_update_time()
    local left = self.deadline - ngx_now()
    if left <= 0 then
        return nil, self:late()
    end
    self.sock:settimeout(ceil(left * 1000))
    return true
end

function Reader:late()
    return "deadline exceeded after " .. self.timeout .. " s"
end

-- err = r:failed(err): a socket error, named as the deadline when it is a timeout
function Reader:failed(err)
    if err == "timeout" then
        return self:late()
    end
    return err
end

-- data, err = r:recv(n): what the socket has, 1 to n bytes, within the time left ("closed" at the end)
function Reader:recv(n)
    local ok, err = self:arm()
    if not ok then
        return nil, err
    end
    local data
    data, err = self.sock:receiveany(n)
    if not data then
        return nil, self:failed(err)
    end
    return data
end

-- ok, err = r:fill(): appends what the socket has (at most CHUNK bytes) to the buffer
function Reader:fill()
    local data, err = self:recv(CHUNK)
    if not data then
        return nil, err
    end
    self.buf = self.buf .. data
    return true
end

-- line, err = r:line(): the next line without its CRLF (or LF), at most MAX_LINE bytes
function Reader:line()
    while true do
        local i = find(self.buf, "\n", 1, true)
        if i then
            local line = sub(self.buf, 1, i - 1)
            self.buf = sub(self.buf, i + 1)
            if byte(line, -1) == 13 then
                line = sub(line, 1, -2)
            end
            return line
        end
        if #self.buf > MAX_LINE then
            return nil, "line over " .. MAX_LINE .. " bytes"
        end
        local ok, err = self:fill()
        if not ok then
            return nil, err
        end
    end
end

-- data, err = r:exactly(n): the next n bytes (n already checked against max_body), read in pieces so that the
-- deadline holds however slowly they come
function Reader:exactly(n)
    local have = #self.buf
    if have >= n then
        local data = sub(self.buf, 1, n)
        self.buf = sub(self.buf, n + 1)
        return data
    end
    local parts = { self.buf }
    self.buf = ""
    while have < n do
        local data, err = self:recv(n - have < CHUNK and n - have or CHUNK)
        if not data then
            return nil, err
        end
        parts[#parts + 1] = data
        have = have + #data
    end
    return concat(parts)
end

function Reader:too_big()
    return "response body over max_body (" .. self.max_body .. " bytes)"
end

-- body, err = r:until_close(): everything up to the end of the connection, at most max_body bytes
function Reader:until_close()
    local parts, total = { self.buf }, #self.buf
    self.buf = ""
    while total <= self.max_body do
        local data, err = self:recv(CHUNK)
        if not data then
            if err == "closed" then
                return concat(parts)
            end
            return nil, err
        end
        parts[#parts + 1] = data
        total = total + #data
    end
    return nil, self:too_big()
end

function Reader:chunked()
    local parts, total = {}, 0
    while true do
        local line, err = self:line()
        if not line then
            return nil, err
        end
        local size = tonumber(match(line, "^%s*(%x+)%s*[;]?"), 16)
        if not size then
            return nil, "bad chunk size"
        end
        if size == 0 then
            for _ = 1, MAX_HEADERS do -- trailer fields, then the empty line
                line, err = self:line()
                if not line then
                    return nil, err
                end
                if line == "" then
                    return concat(parts)
                end
            end
            return nil, "more than " .. MAX_HEADERS .. " trailer lines"
        end
        total = total + size
        if total > self.max_body then
            return nil, self:too_big()
        end
        local data
        data, err = self:exactly(size)
        if not data then
            return nil, err
        end
        parts[#parts + 1] = data
        line, err = self:line()
        if not line then
            return nil, err
        end
    end
end

function Reader:body(headers)
    local cl = headers["content-length"]
    if cl then
        local len = match(cl, "^%d+$") and tonumber(cl)
        if not len then
            return nil, "bad Content-Length " .. sub(cl, 1, 40)
        end
        if len > self.max_body then
            return nil, self:too_big()
        end
        return self:exactly(len)
    end
    if lower(headers["transfer-encoding"] or "") == "chunked" then
        return self:chunked()
    end
    return self:until_close()
end

function Reader:exchange(u, opts)
    local sock = self.sock
    local ok, err = self:arm()
    if not ok then
        return nil, err
    end
    ok, err = sock:connect(u.host, u.port)
    if not ok then
        return nil, "connect to " .. u.host .. ":" .. u.port .. ": " .. self:failed(err)
    end
    if u.scheme == "https" then
        ok, err = self:arm()
        if ok then
            ok, err = sock:sslhandshake(nil, opts.server_name or u.host, opts.verify ~= false)
        end
        if not ok then
            return nil, "TLS handshake with " .. u.host .. ":" .. u.port .. ": " .. self:failed(err)
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
    ok, err = self:arm()
    if ok then
        ok, err = sock:send(concat(head, "\r\n") .. "\r\n\r\n" .. (opts.body or ""))
    end
    if not ok then
        return nil, "send: " .. self:failed(err)
    end
    local line
    line, err = self:line()
    local status = line and tonumber(match(line, "^HTTP/%d%.%d (%d%d%d)"))
    if not status then
        return nil, "bad or no status line: " .. tostring(err or sub(line, 1, 80))
    end
    local headers = {}
    for _ = 1, MAX_HEADERS + 1 do
        line, err = self:line()
        if not line then
            return nil, "headers: " .. err
        end
        if line == "" then
            if opts.stream then -- the body is read by the caller (http.open)
                return status, "", headers
            end
            local body
            if opts.method == "HEAD" or status == 204 or status == 304 then
                body = ""
            else
                body, err = self:body(headers)
                if not body then
                    return nil, "body: " .. err
                end
            end
            return status, body, headers
        end
        local k, v = match(line, "^([^:]+):%s*(.-)%s*$")
        if k then
            headers[lower(k)] = v
        end
    end
    return nil, "headers: more than " .. MAX_HEADERS .. " lines"
end

-- data, err = r:decoded(): the next piece of a streamed body (chunked or up to the end of the connection); nil and
-- "closed" at its proper end, nil and "closed mid-chunk" / another error when it ends otherwise
function Reader:decoded()
    if not self.chunked_body then
        if #self.buf > 0 then
            local data = self.buf
            self.buf = ""
            return data
        end
        return self:recv(CHUNK)
    end
    if self.left == 0 then
        if self.started then -- the CRLF after the last chunk's data
            local line, err = self:line()
            if line ~= "" then
                return nil, line and "bad chunk end" or (err == "closed" and "closed mid-chunk" or err)
            end
        end
        self.started = true
        local line, err = self:line()
        if not line then
            return nil, err == "closed" and "closed mid-chunk" or err
        end
        local size = tonumber(match(line, "^%s*(%x+)%s*[;]?"), 16)
        if not size then
            return nil, "bad chunk size"
        end
        if size == 0 then
            return nil, "closed"
        end
        self.left = size
    end
    local data
    if #self.buf > 0 then
        data = sub(self.buf, 1, self.left)
        self.buf = sub(self.buf, #data + 1)
    else
        local err
        data, err = self:recv(self.left < CHUNK and self.left or CHUNK)
        if not data then
            return nil, err == "closed" and "closed mid-chunk" or err
        end
    end
    self.left = self.left - #data
    return data
end

-- line, err = stream:line(): the next newline-terminated line of a streamed body (at most max_body bytes); nil and
-- "closed" at the body's proper end (a last line without its newline is dropped: "closed mid-line")
function Reader:body_line()
    local parts, size = self.pending or {}, self.pending_size or 0
    self.pending, self.pending_size = nil, nil
    while true do
        local tail = parts[#parts]
        local i = tail and find(tail, "\n", 1, true)
        if i then
            local line = concat(parts, "", 1, #parts - 1) .. sub(tail, 1, i - 1)
            local rest = sub(tail, i + 1)
            if rest ~= "" then
                self.pending, self.pending_size = { rest }, #rest
            end
            return line
        end
        if size > self.max_body then
            return nil, "line over max_body (" .. self.max_body .. " bytes)"
        end
        local data, err = self:decoded()
        if not data then
            if err == "closed" and size > 0 then
                err = "closed mid-line"
            end
            return nil, err
        end
        parts[#parts + 1] = data
        size = size + #data
    end
end

function Reader:close()
    self.sock:close()
end

-- status, body, headers = http.request{ url =, method =, headers = {}, body =, timeout = seconds, verify = true,
--                                      server_name = name the certificate must carry (default: the URL's host),
--                                      max_body = bytes (default 1 MiB) }
-- `timeout` (default 2 s) bounds the whole exchange, connect to last byte; a response body longer than `max_body`
-- is refused before it is read whole. status is nil and body the error on a network failure, a timeout or a
-- response out of bounds; headers have lower-case names.
function _M.request(opts)
    local u, err = _M.parse_url(opts.url)
    if not u then
        return nil, "url " .. err
    end
    local timeout = opts.timeout or 2
    local max_body = opts.max_body or MAX_BODY
    ngx_update_time()
    local sock = tcp()
    local r = new_reader(sock, timeout, ngx_now() + timeout, max_body)
    local status, body, headers = r:exchange(u, opts)
    sock:close()
    return status, body, headers
end

-- status, stream, headers = http.open{ ...as http.request... }: the status and header of the answer, its body left
-- to read line by line with stream:line() (see Reader:body_line) or whole with stream:body(), then stream:close();
-- `timeout` still bounds the whole exchange. Made for streams of JSON lines (a Kubernetes watch). status is nil and stream the error on failure.
function _M.open(opts)
    local u, err = _M.parse_url(opts.url)
    if not u then
        return nil, "url " .. err
    end
    local timeout = opts.timeout or 2
    ngx_update_time()
    local sock = tcp()
    local r = new_reader(sock, timeout, ngx_now() + timeout, opts.max_body or MAX_BODY)
    local o = setmetatable({ stream = true }, { __index = opts })
    local status, body, headers = r:exchange(u, o)
    if not status then
        sock:close()
        return nil, body
    end
    r.chunked_body = lower(headers["transfer-encoding"] or "") == "chunked"
    r.left = 0
    return status, {
        line = function() return r:body_line() end, -- the next line of the body
        body = function() return r:body(headers) end, -- the whole body (instead of lines)
        close = function() r:close() end,
    }, headers
end

return _M
