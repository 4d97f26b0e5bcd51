-- A paced keepalive HTTP/1.1 load client for the soak suite (t/060-soak.t), over cosockets: `concurrency` light
-- threads, each holding one connection and sending GETs at `rate / concurrency` per second, for `duration` seconds.
--
-- Retries as real clients do (Go's net/http, curl, browsers): a GET sent on a connection that has already carried a
-- response, and that fails before any byte of the answer (the server closed the idle connection: a worker leaving at
-- a reload closes its idle keepalive connections, and a request can cross the close), is sent once more on a new
-- connection and counted in `retried`, not in `failed`. Anything else (a fresh connection that fails, an answer cut
-- short, a status other than 200, a retry that fails) is a failure. Every failure is kept with its start and end
-- time and the gateway worker its connection was with (the `X-Worker` response header of its last answer), so that
-- the caller can tell the requests a killed worker was serving from any other.
--
--     local client = require "soak_client"
--     local res = client.run { port =, path = "/", rate = 2000, concurrency = 16, duration = 60, timeout = 5000,
--                              stop = function() return true to end before `duration` end }
--     -- res = { sent =, ok =, failed =, retried =, retries = { { t =, worker = } },
--     --         failures = { { t0 =, t1 =, worker =, err = } },
--     --         by_key = { [body] = n }, per_second = { [s] = n }, connections = n }

local ngx = ngx
local tcp = ngx.socket.tcp
local now = ngx.now
local update_time = ngx.update_time
local sleep = ngx.sleep

local _M = {}

-- status, body, worker, err, partial = exchange(sock, req): one request on an open connection. `partial` is true once
-- any byte of the answer has arrived (the request may then have been processed: no retry).
local function exchange(sock, req)
    local ok, err = sock:send(req)
    if not ok then
        return nil, nil, nil, "send: " .. err, false
    end
    local line
    line, err = sock:receive("*l")
    if not line then
        return nil, nil, nil, "status line: " .. err, false
    end
    local status = tonumber(line:match("^HTTP/1%.%d (%d%d%d)"))
    local len, close, worker
    while true do
        local h
        h, err = sock:receive("*l")
        if not h then
            return nil, nil, nil, "headers: " .. err, true
        end
        if h == "" then
            break
        end
        local k, v = h:match("^([^:]+):%s*(.*)$")
        k = k and k:lower()
        if k == "content-length" then
            len = tonumber(v)
        elseif k == "connection" and v:lower() == "close" then
            close = true
        elseif k == "x-worker" then
            worker = tonumber(v)
        end
    end
    local body = ""
    if len and len > 0 then
        body, err = sock:receive(len)
        if not body then
            return nil, nil, nil, "body: " .. err, true
        end
    end
    return status, body, worker, close and "close" or nil, true
end

function _M.run(o)
    local res = { sent = 0, ok = 0, failed = 0, retried = 0, retries = {}, failures = {}, by_key = {}, per_second = {},
                  connections = 0, statuses = {} }
    update_time()
    local t_start = now()
    local deadline = t_start + o.duration
    local per_thread = o.rate / o.concurrency
    local req = "GET " .. (o.path or "/") .. " HTTP/1.1\r\nHost: localhost\r\nUser-Agent: soak\r\n\r\n"
    local function connect()
        local sock = tcp()
        sock:settimeout(o.timeout or 5000)
        local ok, err = sock:connect("127.0.0.1", o.port)
        if not ok then
            return nil, "connect: " .. err
        end
        res.connections = res.connections + 1
        return sock
    end
    local function fail(t0, worker, err)
        update_time()
        res.failed = res.failed + 1
        local f = res.failures
        if #f < 1000 then
            f[#f + 1] = { t0 = t0 - t_start, t1 = now() - t_start, worker = worker, err = err }
        end
    end
    local function thread(i)
        local sock, served, worker -- the connection, the answers it has carried, its worker
        update_time()
        local next_at = now() + (i - 1) / o.rate
        while true do
            update_time()
            local t = now()
            if t >= deadline or (o.stop and o.stop()) then
                break
            end
            if next_at - t >= 0.001 then -- (a shorter ngx.sleep is a sleep(0), which nginx logs)
                sleep(next_at - t)
            elseif t - next_at > 1 then
                next_at = t -- too far behind: no burst to catch up
            end
            next_at = next_at + 1 / per_thread
            update_time()
            local t0 = now()
            res.sent = res.sent + 1
            local status, body, w, err, partial
            for attempt = 1, 2 do
                if not sock then
                    sock, err = connect()
                    served, worker = 0, nil
                end
                if sock then
                    status, body, w, err, partial = exchange(sock, req)
                end
                if status then
                    break
                end
                local reused = sock and served > 0
                if sock then
                    sock:close()
                    sock = nil
                end
                if attempt == 1 and reused and not partial then
                    res.retried = res.retried + 1 -- the idle connection was closed under the request: send again
                    if #res.retries < 5000 then
                        res.retries[#res.retries + 1] = { t = t0 - t_start, worker = worker }
                    end
                else
                    break
                end
            end
            if not status then
                fail(t0, worker, err)
            else
                served, worker = served + 1, w or worker
                res.statuses[status] = (res.statuses[status] or 0) + 1
                if status == 200 then
                    res.ok = res.ok + 1
                    res.by_key[body] = (res.by_key[body] or 0) + 1
                    local s = math.floor(t0 - t_start)
                    res.per_second[s] = (res.per_second[s] or 0) + 1
                else
                    fail(t0, worker, "status " .. status)
                end
                if err == "close" then -- the server said Connection: close (a worker shutting down)
                    sock:close()
                    sock = nil
                end
            end
        end
        if sock then
            sock:close()
        end
    end
    local threads = {}
    for i = 1, o.concurrency do
        threads[i] = ngx.thread.spawn(thread, i)
    end
    for i = 1, #threads do
        ngx.thread.wait(threads[i])
    end
    return res
end

return _M
