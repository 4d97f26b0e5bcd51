-- Helpers for the Test::Nginx suites: a minimal HTTP/1.1 client over cosockets and a bounded concurrent load driver.
-- Used from content_by_lua* in the test configs only; everything is loopback and bounded in count and time.

local ngx = ngx
local tcp = ngx.socket.tcp
local spawn = ngx.thread.spawn
local wait = ngx.thread.wait
local now = ngx.now
local update_time = ngx.update_time

local _M = {}

-- status, body, headers = t.get(port, path, timeout_ms)   (status nil and err on a broken connection)
function _M.get(port, path, timeout)
    return _M.request { port = port, path = path, timeout = timeout }
end

-- status, body, headers = t.request{ port =, method = "GET", path =, headers = { name = value }, body =,
--                                    host = "127.0.0.1", bind = source address, unix = socket path, timeout = ms }
-- `Content-Length` is sent for a body unless `headers` has its own (or a Transfer-Encoding).
function _M.request(opts)
    local sock = tcp()
    sock:settimeout(opts.timeout or 5000)
    if opts.bind then
        local ok, err = sock:bind(opts.bind)
        if not ok then
            return nil, "bind " .. opts.bind .. ": " .. err
        end
    end
    local ok, err
    if opts.unix then
        ok, err = sock:connect("unix:" .. opts.unix)
    else
        ok, err = sock:connect(opts.host or "127.0.0.1", opts.port)
    end
    if not ok then
        return nil, "connect: " .. err
    end
    local head = { (opts.method or "GET") .. " " .. opts.path .. " HTTP/1.1", "Host: localhost", "Connection: close" }
    local given = {}
    for k, v in pairs(opts.headers or {}) do
        head[#head + 1] = k .. ": " .. v
        given[k:lower()] = true
    end
    if opts.body and not given["content-length"] and not given["transfer-encoding"] then
        head[#head + 1] = "Content-Length: " .. #opts.body
    end
    sock:send(table.concat(head, "\r\n") .. "\r\n\r\n" .. (opts.body or ""))
    local line
    line, err = sock:receive("*l")
    if not line then
        sock:close()
        return nil, "status line: " .. err
    end
    local status = tonumber(line:match("^HTTP/%d%.%d (%d%d%d)"))
    local headers = {}
    while true do
        local h
        h, err = sock:receive("*l")
        if not h then
            sock:close()
            return nil, "headers: " .. err
        end
        if h == "" then
            break
        end
        local k, v = h:match("^([^:]+):%s*(.*)$")
        if k then
            headers[k:lower()] = v
        end
    end
    local body
    if headers["content-length"] then
        body, err = sock:receive(tonumber(headers["content-length"]))
    elseif headers["transfer-encoding"] == "chunked" then
        local parts = {}
        while true do
            local size = sock:receive("*l")
            size = size and tonumber(size, 16)
            if not size or size == 0 then
                break
            end
            parts[#parts + 1] = sock:receive(size)
            sock:receive("*l")
        end
        body = table.concat(parts)
    else
        body, err = sock:receive("*a")
    end
    sock:close()
    return status, body, headers
end

-- result = t.load{ port =, path =, concurrency =, duration = (s) | requests = n, key = function(status, body, headers) }
-- Closed-loop load: `concurrency` light threads send requests back to back until `duration` seconds or `requests`
-- requests in all. Returns { total =, by_key = { [key] = n }, errors = n, statuses = { [status] = n } }.
function _M.load(opts)
    local result = { total = 0, errors = 0, by_key = {}, statuses = {}, first_error = nil }
    update_time()
    local deadline = now() + (opts.duration or 30)
    local budget = opts.requests or math.huge
    local function worker()
        while true do
            update_time()
            if now() >= deadline or budget <= 0 then
                return
            end
            budget = budget - 1
            local status, body, headers = _M.get(opts.port, opts.path or "/", opts.timeout)
            result.total = result.total + 1
            if not status then
                result.errors = result.errors + 1
                result.first_error = result.first_error or body
            else
                result.statuses[status] = (result.statuses[status] or 0) + 1
                if status ~= 200 then
                    result.errors = result.errors + 1
                    result.first_error = result.first_error or (status .. " " .. tostring(body))
                end
                local key = opts.key and opts.key(status, body, headers) or body
                if key then
                    result.by_key[key] = (result.by_key[key] or 0) + 1
                end
            end
        end
    end
    local threads = {}
    for i = 1, opts.concurrency or 8 do
        threads[i] = spawn(worker)
    end
    for i = 1, #threads do
        wait(threads[i])
    end
    return result
end

-- share of `key` in a load result
function _M.share(result, key)
    local n = 0
    for _, v in pairs(result.by_key) do
        n = n + v
    end
    return n > 0 and (result.by_key[key] or 0) / n or 0
end

-- ok = t.poll(fn, timeout_s): calls fn every 10 ms until it returns true or the timeout passes.
function _M.poll(fn, timeout)
    update_time()
    local deadline = now() + (timeout or 5)
    while true do
        if fn() then
            return true
        end
        update_time()
        if now() >= deadline then
            return false
        end
        ngx.sleep(0.01)
    end
end

-- The peer table of autoscale.status(name) for `addr`.
function _M.peer(st, addr)
    for _, p in ipairs(st.peers) do
        if p.addr == addr then
            return p
        end
    end
end

-- st = t.status(port): the gateway's status JSON (GET /status on `port`), decoded; retried a few times, since a
-- connection can land on a worker that is going away (reload, kill)
function _M.status(port)
    local cjson = require "cjson"
    for _ = 1, 20 do
        local code, body = _M.get(port, "/status")
        if code == 200 then
            return cjson.decode(body)
        end
        ngx.sleep(0.01)
    end
    error("no status answer on port " .. tostring(port))
end


-- text = t.accounted(name, requests, names): once the log phase has counted at least `requests` attempts of upstream
-- `name` and none is in flight (or after 2 s), "p1 requests 3 failures 0 in flight 0; p2 ..." with each peer named
-- by names[its port]
function _M.accounted(name, requests, names)
    local st
    for _ = 1, 200 do
        st = autoscale.status(name)
        local n, inflight = 0, 0
        for _, p in ipairs(st.peers) do
            n, inflight = n + p.totals.requests, inflight + p.inflight
        end
        if n >= requests and inflight == 0 then
            break
        end
        ngx.sleep(0.01)
    end
    local out = {}
    for _, p in ipairs(st.peers) do
        out[#out + 1] = (names[p.addr:match(":(%d+)$")] or p.addr) .. " requests " .. p.totals.requests
            .. " failures " .. p.totals.failures .. " in flight " .. p.inflight
    end
    table.sort(out)
    return table.concat(out, "; ")
end


-- t.reload(file, text): writes `text` to `file` (what the next configuration reads), then sends SIGHUP to the master
-- of the nginx running this code (its logs/nginx.pid)
function _M.reload(file, text)
    local f = assert(io.open(file, "w"))
    f:write(text)
    f:close()
    local pidf = assert(io.open(ngx.config.prefix() .. "logs/nginx.pid"))
    local master = tonumber(pidf:read("*l"))
    pidf:close()
    assert(os.execute("kill -HUP " .. master) == 0)
end

return _M
