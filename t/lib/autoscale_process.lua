-- Background processes of the test suites (etcd, dnsmasq, the orchestrator): each started in a session of its own and
-- stopped by its PID (the whole session: its children too). Used from content_by_lua* in test configs only.
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

-- proc = process.start(cmd, log, max_seconds): runs `cmd` (a shell command) in the background, for at most
-- `max_seconds` (default 120), output appended to the file `log`.
function _M.start(cmd, log, max_seconds)
    local pidfile = os.tmpname()
    local ok = os.execute(string.format("setsid timeout %d %s >>%s 2>&1 </dev/null & echo $! >%s",
                                        max_seconds or 120, cmd, log, pidfile))
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

return _M
