-- Background processes of the test suites (etcd, dnsmasq, the orchestrator): each started in a session of its own and
-- stopped by its PID (the whole session: its children too); and small helpers of the discovery suites. Used from
-- content_by_lua* in test configs only.
--
--     local process = require "autoscale_process"
--     local etcd = process.start("etcd --data-dir ...", logfile)   -- started under `timeout`, so it cannot outlive
--     ...                                                           -- a test that dies before stopping it
--     etcd:stop()

local t = require "autoscale_test"

local _M = {}
local Process = {}
Process.__index = Process

local function state(pid)
    local f = io.open("/proc/" .. pid .. "/stat")
    if not f then
        return nil
    end
    local line = f:read("*l") or ""
    f:close()
    return line:match("^%d+ %b() (%a)")
end

-- proc = process.start(cmd, log, max_seconds, err_log): runs `cmd` (a shell command) in the background, for at most
-- `max_seconds` (default 120), its output appended to the file `log` (its standard error to `err_log` if given).
function _M.start(cmd, log, max_seconds, err_log)
    local pidfile = os.tmpname()
    local ok = os.execute(string.format("setsid timeout %d %s >>%s %s </dev/null & echo $! >%s",
                                        max_seconds or 120, cmd, log, err_log and "2>>" .. err_log or "2>&1",
                                        pidfile))
    assert(ok == 0 or ok == true, "cannot start: " .. cmd)
    local f = assert(io.open(pidfile))
    local pid = tonumber(f:read("*l"))
    f:close()
    os.remove(pidfile)
    return setmetatable({ pid = assert(pid, "no pid for " .. cmd), cmd = cmd, log = log }, Process)
end

function Process:alive()
    local st = state(self.pid)
    return st ~= nil and st ~= "Z"
end

-- ok = proc:signal(name): sends SIGname to the command itself (the child of the `timeout` that runs it)
function Process:signal(name)
    local f = io.open("/proc/" .. self.pid .. "/task/" .. self.pid .. "/children")
    local child = f and tonumber((f:read("*a") or ""):match("%d+"))
    if f then
        f:close()
    end
    local rc = child and os.execute("kill -" .. name .. " " .. child .. " 2>/dev/null")
    return rc == 0 or rc == true
end

-- gone = proc:stop(): SIGTERM to its session, SIGKILL after 5 s; true once it has exited
function Process:stop()
    os.execute("kill -TERM -" .. self.pid .. " 2>/dev/null")
    if t.poll(function() return not self:alive() end, 5) then
        return true
    end
    os.execute("kill -KILL -" .. self.pid .. " 2>/dev/null")
    return t.poll(function() return not self:alive() end, 2)
end

-- yes = process.listening(port, "tcp" | "udp"): whether a socket is bound to `port` (read from /proc, so that
-- looking logs no connection error anywhere)
function _M.listening(port, proto)
    proto = proto or "tcp"
    local hex = string.format(":%04X ", port)
    for _, file in ipairs { "/proc/net/" .. proto, "/proc/net/" .. proto .. "6" } do
        local f = io.open(file)
        if f then
            for line in f:lines() do
                local localaddr, st = line:match("^%s*%d+: (%S+) %S+ (%x%x)")
                if localaddr and (proto == "udp" or st == "0A") and (localaddr .. " "):find(hex, 1, true) then
                    f:close()
                    return true
                end
            end
            f:close()
        end
    end
    return false
end

-- text = process.read(path): a whole file, or "" when it does not exist
function _M.read(path)
    local f = io.open(path)
    if not f then
        return ""
    end
    local s = f:read("*a")
    f:close()
    return s
end

-- process.write(path, text)
function _M.write(path, text)
    local f = assert(io.open(path, "w"))
    f:write(text)
    f:close()
end

-- proc = process.etcd(dir, port): a single-member etcd (Debian etcd-server) with its data in `dir`/etcd-data, clients on
-- `port` and peers on `port` + 1, started anew (its data kept when it was started before) and waited for (20 s).
function _M.etcd(dir, port)
    local proc = _M.start(string.format("etcd --name t --data-dir %setcd-data --logger zap --log-level error"
        .. " --listen-client-urls http://127.0.0.1:%d --advertise-client-urls http://127.0.0.1:%d"
        .. " --listen-peer-urls http://127.0.0.1:%d --initial-advertise-peer-urls http://127.0.0.1:%d"
        .. " --initial-cluster t=http://127.0.0.1:%d", dir, port, port, port + 1, port + 1, port + 1), dir .. "etcd.log")
    assert(t.poll(function()
        return t.request { port = port, method = "POST", path = "/v3/kv/range", body = '{"key":"AA=="}' } == 200
    end, 20), "etcd did not start: " .. _M.read(dir .. "etcd.log"):sub(-2000))
    return proc
end

-- src, worker = process.asker(port, upstream, kind): source `kind` ("dns", "etcd") of `upstream`'s discovery as the
-- worker that asks it sees it (GET /discovery on the gateway at `port`, until that worker answers), and its PID
function _M.asker(port, upstream, kind)
    local cjson = require "cjson"
    local st
    t.poll(function()
        st = cjson.decode((select(2, t.get(port, "/discovery?upstream=" .. upstream))))
        return st.runs_here
    end, 5)
    return st.sources[kind], st.worker
end

-- n = process.count(path, pattern): how many times the Lua pattern occurs in the file (e.g. an error log)
function _M.count(path, pattern)
    return select(2, _M.read(path):gsub(pattern, ""))
end

-- seconds = process.until_served(port, path, body): how long until a request to the gateway on `port` is answered
-- with `body` (nil after 5 s). Asks in bursts of 16 concurrent requests, as under the load that makes a service scale
-- up: a peer in slow start costs 1 / slow_start_min_weight (10) times its latency estimate, so against one busy peer
-- it wins a comparison only once that peer has about 10 requests in flight (or its ramp has gone on long enough).
function _M.until_served(port, path, body)
    ngx.update_time()
    local t0 = ngx.now()
    local ok = t.poll(function()
        return t.load { port = port, path = path, concurrency = 16, requests = 64, timeout = 1000 }.by_key[body] ~= nil
    end, 5)
    ngx.update_time()
    return ok and ngx.now() - t0 or nil
end

-- proc, root = process.gateway{ dir =, name =, port =, init = Lua code that configures, workers = 1, http = extra
-- http-level directives, server = extra server-level directives, seconds = 120 }: a gateway of its own, another nginx
-- in `dir`/`name`/ listening on `port`, with the upstream `api` balanced by resty.autoscale (location / proxies to it,
-- /scaling, /status and /events answer as autoscale does), started and waited for; `init_worker` is more Lua for
-- init_worker_by_lua. Stop it with proc:stop().
function _M.gateway(o)
    local root = o.dir .. o.name .. "/"
    os.execute("mkdir -p " .. root .. "conf " .. root .. "logs")
    _M.write(root .. "conf/nginx.conf", table.concat({
        "load_module /usr/lib/nginx/modules/ndk_http_module.so;",
        "load_module /usr/lib/nginx/modules/ngx_http_lua_module.so;",
        "pid " .. root .. "logs/nginx.pid;", "error_log " .. root .. "logs/error.log notice;",
        "worker_processes " .. (o.workers or 1) .. ";", "events { worker_connections 4096; }", "http {",
        "access_log off;",
        "client_body_temp_path " .. root .. "cb; proxy_temp_path " .. root .. "px; fastcgi_temp_path " .. root .. "fc;",
        "uwsgi_temp_path " .. root .. "uw; scgi_temp_path " .. root .. "sc;",
        "lua_package_path '" .. package.path .. "'; lua_package_cpath '" .. package.cpath .. "';",
        "lua_shared_dict autoscale_scaling 1m;",
        o.http or "",
        "init_by_lua_block { autoscale = require 'resty.autoscale'\n" .. o.init .. "\n}",
        "init_worker_by_lua_block { autoscale.init_worker()\n" .. (o.init_worker or "") .. "\n}",
        "upstream api { server 0.0.0.1; balancer_by_lua_block { autoscale.balance('api') } keepalive 32; }",
        "server { listen 127.0.0.1:" .. o.port .. ";",
        "location = /scaling { content_by_lua_block { autoscale.scaling_handler() } }",
        "location = /status { content_by_lua_block { autoscale.status_handler() } }",
        "location = /events { content_by_lua_block { ngx.say(require('cjson').encode(autoscale.events(500))) } }",
        "location / { proxy_pass http://api; proxy_http_version 1.1; proxy_set_header Connection ''; "
            .. "log_by_lua_block { autoscale.log() } }",
        o.server or "", "}", "}",
    }, "\n"))
    local p = _M.start("/usr/sbin/nginx -p " .. root .. " -c conf/nginx.conf -g 'daemon off;'", root .. "stderr.log",
                       o.seconds or 120)
    assert(t.poll(function() return _M.listening(o.port) end, 5),
           o.name .. " did not start: " .. _M.read(root .. "stderr.log") .. _M.read(root .. "logs/error.log"))
    return p, root
end

-- list = process.events(port, kind): the events of kind `kind` (e.g. "dependency_down") the gateway on `port` lists
function _M.events(port, kind)
    local cjson = require "cjson"
    local out = {}
    local status, body = t.get(port, "/events")
    if status == 200 then
        for _, e in ipairs(cjson.decode(body)) do
            if e.event == kind then
                out[#out + 1] = e
            end
        end
    end
    return out
end

return _M
