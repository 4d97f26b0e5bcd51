-- Reading the shared statistics: per-peer tables for code and tests, and a JSON status endpoint.

local ffi = require "ffi"
local cjson = require "cjson.safe"
local redact = require "resty.autoscale.redact"

local ngx = ngx
local tonumber = tonumber
local pairs = pairs
local ipairs = ipairs
local tostring = tostring
local sort = table.sort
local io_open = io.open

local _M = {}

local lib, conf, index
local stats = ffi.new("autoscale_peer_stats_t")
local info = ffi.new("autoscale_region_info_t")
local addr_buf = ffi.new("uint8_t[64]")
local STATES = { [0] = "free", [1] = "active", [2] = "retired" }
local HEALTH = { [0] = "healthy", [1] = "ejected", [2] = "half_open", [3] = "draining" }
local upinfo = ffi.new("autoscale_upstream_info_t")
local upconf = ffi.new("autoscale_upstream_config_t")
local events = require "resty.autoscale.events"
local spec = require "resty.autoscale.spec"

local totals = ffi.new("uint64_t[64]")
local cost = ffi.new("autoscale_cost_t")
local KINDS = {} -- event kind number -> name
local lib_path -- the file the library was loaded from

function _M.init(library, configuration, upstream_index, library_path)
    lib, conf, index, lib_path = library, configuration, upstream_index, library_path
    local name = ffi.new("uint8_t[32]")
    for k = 1, 63 do
        local len = lib.autoscale_event_kind_name(k, name, 32)
        local text = len > 0 and ffi.string(name, len)
        if text and text ~= "unknown" then
            KINDS[k] = text
        end
    end
end

-- totals = status.event_totals(): { [kind name] = events of that kind written since the region was created }
function _M.event_totals()
    local count = lib.autoscale_event_totals(totals, 64)
    local out = {}
    for k = 1, count - 1 do
        if KINDS[k] then
            out[KINDS[k]] = tonumber(totals[k])
        end
    end
    return out
end

local function seconds(us)
    if us < 0 then
        return nil
    end
    return us / 1e6
end

local function n(v) -- uint64 cdata -> Lua number (exact below 2^53)
    return tonumber(v)
end

-- peer, err = status.peer(slot)
function _M.peer(slot)
    local rc = lib.autoscale_peer_stats(slot, stats)
    if rc ~= 0 then
        return nil, "no peer record " .. slot .. " (code " .. rc .. ")"
    end
    local len = lib.autoscale_peer_addr(slot, addr_buf, 64)
    local window = n(stats.window_us) / 1e6
    local s = stats
    return {
        slot = s.slot,
        addr = ffi.string(addr_buf, len),
        state = s.state == 1 and (HEALTH[s.health] or "unknown") or (STATES[s.state] or "unknown"),
        times_ejected = s.times_ejected,
        ejections = n(s.ejections_total),
        ejected_for = s.health == 1 and (n(s.ejected_for_us) < 1e15 and n(s.ejected_for_us) / 1e6 or "until a health check passes") or nil,
        consecutive = {
            failures = s.consecutive_failures,
            gateway = s.consecutive_gateway,
            timeouts = s.consecutive_timeouts,
        },
        weight = s.weight,
        inflight = s.inflight,
        requests = n(s.requests),
        failures = n(s.failures),
        fail_http_5xx = n(s.fail_http_5xx),
        fail_gateway = n(s.fail_gateway),
        fail_connect = n(s.fail_connect),
        fail_timeout = n(s.fail_timeout),
        aborted = n(s.aborted),
        rps = window > 0 and n(s.requests) / window or 0,
        window = window,
        p50 = seconds(s.p50_us),
        p90 = seconds(s.p90_us),
        p99 = seconds(s.p99_us),
        p999 = seconds(s.p999_us),
        mean = n(s.requests) > 0 and n(s.latency_sum_us) / n(s.requests) / 1e6 or nil,
        ewma = s.ewma_us / 1e6,
        cost = s.cost,
        slow_start = s.slow_start,
        age = n(s.age_us) / 1e6,
        reported = require("resty.autoscale.reports").peer(s.upstream, s.slot),
        totals = {
            requests = n(s.total_requests),
            failures = n(s.total_failures),
            fail_http_5xx = n(s.total_fail_http_5xx),
            fail_gateway = n(s.total_fail_gateway),
            fail_connect = n(s.total_fail_connect),
            fail_timeout = n(s.total_fail_timeout),
            aborted = n(s.total_aborted),
            latency_sum = n(s.total_latency_us) / 1e6,
        },
    }
end

-- options = status.tunables(name): the tunables of upstream `name` in force (changed at run time by control.tune or
-- the admin API), read from shared memory.
function _M.tunables(name)
    local idx = index[name]
    local rc = idx and lib.autoscale_upstream_config(idx, upconf)
    if rc == lib.AUTOSCALE_ERR_BUSY then
        return nil, "upstream " .. name .. " is being changed by another process; retry"
    end
    if rc ~= 0 then
        return nil, "unknown upstream " .. tostring(name)
    end
    return spec.tunables(upconf)
end

-- st, err = status.upstream(name)
function _M.upstream(name)
    if not lib then
        return nil, "resty.autoscale is not configured"
    end
    local idx = index[name]
    if not idx then
        return nil, "unknown upstream " .. tostring(name)
    end
    local count = lib.autoscale_upstream_peers(idx, nil, 0)
    if count == lib.AUTOSCALE_ERR_BUSY then
        return nil, "upstream " .. name .. " is being changed by another process; retry"
    end
    if count < 0 then
        return nil, "cannot read upstream " .. name .. " (code " .. count .. ")"
    end
    local slots = ffi.new("uint32_t[?]", count + 1)
    count = lib.autoscale_upstream_peers(idx, slots, count)
    local peers, total = {}, 0
    for i = 0, count - 1 do
        local p = _M.peer(slots[i])
        if p then
            peers[#peers + 1] = p
            total = total + p.requests
        end
    end
    local in_force = {}
    for i, p in ipairs(peers) do
        p.share = total > 0 and p.requests / total or 0
        in_force[i] = { addr = p.addr, weight = p.weight }
    end
    local u = {}
    for k, v in pairs(conf.upstreams[name]) do
        u[k] = v
    end
    local tunables, terr = _M.tunables(name)
    if not tunables then
        return nil, terr
    end
    for k, v in pairs(tunables) do
        u[k] = v
    end
    u.peers = in_force
    lib.autoscale_upstream_info(idx, upinfo)
    return redact.value {
        name = name,
        balancer = u.balancer,
        retries = u.retries,
        peers = peers,
        requests = total,
        healthy = upinfo.healthy,
        ejected = upinfo.ejected,
        draining = upinfo.draining,
        panic = upinfo.panic == 1,
        config = u,
        discovery = conf.upstreams[name].discovery and require("resty.autoscale.discovery").state(name) or nil,
        scaling = require("resty.autoscale.scaler").state(name),
        admission = require("resty.autoscale.admission").status(name),
        reported = require("resty.autoscale.reports").upstream(idx),
    }
end

-- The library this process runs: its path, ABI version, and whether the file at that path has been replaced since it
-- was loaded (the process maps a deleted file: the installed one runs only after a restart or a binary upgrade).
local function library()
    local replaced = false
    local mapped = lib_path and lib_path .. " (deleted)" -- how /proc/self/maps names a mapped file since removed
    local f = mapped and io_open("/proc/self/maps", "r")
    if f then
        for line in f:lines() do
            if line:sub(-#mapped) == mapped then
                replaced = true
                break
            end
        end
        f:close()
    end
    return { path = lib_path, abi_version = lib.autoscale_abi_version(), replaced_on_disk = replaced }
end

-- info = status.region()
function _M.region()
    if not lib or lib.autoscale_region_info(info) ~= 0 then
        return nil, "resty.autoscale is not configured"
    end
    return {
        max_upstreams = info.max_upstreams,
        max_peers = info.max_peers,
        max_workers = info.max_workers,
        window = { buckets = info.window_buckets, bucket = info.bucket_ms / 1000 },
        workers_attached = info.workers_attached,
        size_bytes = n(info.total_size),
        config_epoch = n(info.config_epoch),
        dropped_samples = n(info.dropped_samples),
        evicted_requests = n(info.evicted_requests),
        writer = info.writer_pid ~= 0 and { pid = info.writer_pid, held = info.writer_held_ms / 1000 } or nil,
        writer_takeovers = n(info.writer_takeovers),
        repaired_markers = n(info.repaired_markers),
        event_totals = _M.event_totals(),
        library_cost = _M.library_cost(),
        library = library(),
    }
end

local le_bounds = ffi.new("double[32]")
local le_counts = ffi.new("uint64_t[32]")

-- bounds = status.latency_bounds(): upper bounds (seconds) of the all-time latency buckets, smallest first
function _M.latency_bounds()
    local nb = lib and lib.autoscale_latency_bounds(le_bounds, 32) or 0
    local out = {}
    for i = 1, math.min(nb, 32) do
        out[i] = le_bounds[i - 1]
    end
    return out
end

-- counts = status.latency_buckets(slot): a uint64_t[] of the peer record's all-time attempts at most each bound of
-- status.latency_bounds() (cumulative; reused by the next call), or nil for a bad slot
function _M.latency_buckets(slot)
    if not lib or lib.autoscale_peer_latency_buckets(slot, le_counts, 32) < 0 then
        return nil
    end
    return le_counts
end

-- cost = status.library_cost(): time inside the library's balancer and log calls, from the calls timed (one in 64
-- per worker), all workers: { balancer = { calls =, seconds =, mean = }, log = { ... } }
function _M.library_cost()
    if lib.autoscale_cost_read(cost) ~= 0 then
        return nil
    end
    local function phase(ns, calls)
        calls, ns = n(calls), n(ns)
        return { calls = calls, seconds = ns / 1e9, mean = calls > 0 and ns / calls / 1e9 or nil }
    end
    return { balancer = phase(cost.balancer_ns, cost.balancer_calls), log = phase(cost.log_ns, cost.log_calls) }
end

-- st = status.all()
function _M.all()
    local names = {}
    for name in pairs(index or {}) do
        names[#names + 1] = name
    end
    sort(names)
    local ups = {}
    for _, name in ipairs(names) do
        ups[name] = _M.upstream(name)
    end
    return {
        region = _M.region(),
        upstreams = ups,
        events = events.recent(50),
        worker = { pid = ngx.worker.pid(), id = ngx.worker.id() },
    }
end

-- autoscale.status_handler(): content_by_lua* handler answering JSON; `?upstream=name` narrows it to one upstream.
function _M.handler()
    local args = ngx.req.get_uri_args()
    local body, err
    if args.upstream then
        body, err = _M.upstream(args.upstream)
        if not body then
            ngx.status = 404
            body = { error = err }
        end
    else
        body = _M.all()
    end
    ngx.header["Content-Type"] = "application/json"
    ngx.header["Cache-Control"] = "no-store"
    ngx.say(cjson.encode(body))
end

return _M
