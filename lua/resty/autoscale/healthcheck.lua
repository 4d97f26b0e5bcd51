-- Active health checks: one worker at a time (a lease in shared memory that a dead worker cannot keep) probes
-- every peer of an upstream over HTTP; results are recorded in shared memory, so every worker sees them, and a
-- peer ejected by passive detection comes back as soon as its checks pass. Probes run in a timer, never in a
-- request.

local ffi = require "ffi"

local ngx = ngx
local tcp = ngx.socket.tcp
local spawn = ngx.thread.spawn
local wait = ngx.thread.wait
local ngx_log = ngx.log
local ngx_ERR = ngx.ERR
local tonumber = tonumber
local ipairs = ipairs
local pairs = pairs
local pcall = pcall
local unpack = unpack

local _M = {}

local lib
local stats = ffi.new("autoscale_peer_stats_t")
local addr_buf = ffi.new("uint8_t[64]")

function _M.init(library)
    lib = library
end

local function probe(host, port, hc)
    local sock = tcp()
    sock:settimeout(hc.timeout * 1000)
    local ok = sock:connect(host, port)
    if not ok then
        return false
    end
    local bracket = host:find(":", 1, true) and ("[" .. host .. "]") or host
    ok = sock:send("GET " .. hc.path .. " HTTP/1.0\r\nHost: " .. bracket .. "\r\nUser-Agent: resty.autoscale health check (worker " .. ngx.worker.pid() .. ")\r\n"
                   .. "Connection: close\r\n\r\n")
    local line = ok and sock:receive("*l")
    sock:close()
    local status = line and tonumber(line:match("^HTTP/%d%.%d (%d%d%d)"))
    return status ~= nil and hc.pass[status] == true
end

-- One round for upstream `idx`: if this worker holds the upstream's lease (`lease` seconds), runs
-- `probe(host, port, arg)` for all its peers concurrently, then `done(slot, gen, ok, ...)` with what each returned.
-- Active health checks and the polling of backend-reported load (reports.lua) share it, and the lease.
local function each_peer(idx, lease, probe, arg, done)
    if lib.autoscale_check_lease(idx, math.floor(lease * 1000)) ~= 1 then
        return
    end
    local count = lib.autoscale_upstream_peers(idx, nil, 0)
    if count <= 0 then
        return
    end
    local slots = ffi.new("uint32_t[?]", count)
    count = lib.autoscale_upstream_peers(idx, slots, count)
    local threads = {}
    for i = 0, count - 1 do
        local slot = slots[i]
        if lib.autoscale_peer_stats(slot, stats) == 0 then
            local gen = stats.gen
            local n = lib.autoscale_peer_addr(slot, addr_buf, 64)
            local text = ffi.string(addr_buf, n)
            local host, port = text:match("^%[?(.-)%]?:(%d+)$")
            threads[#threads + 1] = { slot, gen, spawn(probe, host, tonumber(port), arg) }
        end
    end
    for _, t in ipairs(threads) do
        done(t[1], t[2], wait(t[3]))
    end
end
_M.each_peer = each_peer

local function round(idx, hc)
    each_peer(idx, hc.interval * 3, probe, hc, function(slot, gen, ok, passed)
        lib.autoscale_check_result(slot, gen, (ok and passed) and 1 or 0, hc.healthy, hc.unhealthy)
    end)
end

-- ok, err = healthcheck.every(interval, what, name, fn, ...): runs fn(...) every `interval` seconds in a timer of
-- this worker, never two at once, logging what fails.
function _M.every(interval, what, name, fn, ...)
    local busy = false
    local args = { ... }
    return ngx.timer.every(interval, function(premature)
        if premature or busy then
            return
        end
        busy = true
        local done, perr = pcall(fn, unpack(args))
        busy = false
        if not done then
            ngx_log(ngx_ERR, "resty.autoscale: ", what, " of ", name, " failed: ", perr)
        end
    end)
end

-- Starts a checking timer per upstream that has `healthcheck`; called in each worker.
function _M.start(conf, index)
    for name, u in pairs(conf.upstreams) do
        local hc = u.healthcheck
        if hc then
            local ok, err = _M.every(hc.interval, "health check", name, round, index[name], hc)
            if not ok then
                return nil, err
            end
        end
    end
    return require("resty.autoscale.reports").start(conf, index)
end

return _M
