-- Holding requests while an upstream has no ready peer (a service scaled to zero, or every instance gone): instead of
-- an immediate fallback, the request waits in the gateway on a semaphore (no worker is occupied, nothing sleeps in
-- the request), bounded per upstream (hold.max_requests across all workers) and per request (hold.timeout, and never
-- past the client's own deadline header), and is released in arrival order to the first peer that becomes ready, at
-- hold.release_rate requests per second, not all at once. The first held request wakes the scaler at once
-- (scaler.activate in a zero-delay timer: an event, not the next tick).
--
-- It lives behind the fallback location (`error_page 502 504 = @fallback` -> autoscale.fallback(name)): nginx only
-- gets there when the balancer found no peer or every attempt failed, so the request path with peers present does
-- no new work at all.
--
-- Shared memory (lua_shared_dict autoscale_scaling): each worker that holds requests claims a slot per upstream,
--   hold:<name>:<i>        requests this slot's worker holds now
--   hold_owner:<name>:<i>  the owner's PID, with a TTL its watcher renews while it holds anything
-- The held total is the sum over the slots whose owner key is alive: a worker killed by SIGKILL loses its slot
-- (and its held requests, whose connections died with it) within OWNER_TTL, and a new owner of the slot resets the
-- count. Counters: hold_total / hold_released / hold_timeouts / hold_rejected / hold_failed, and a histogram of the
-- time held (hold_le:<name>:<bound>).

local ffi = require "ffi"
local semaphore = require "ngx.semaphore"
local config = require "resty.autoscale.config"

local ngx = ngx
local ngx_log = ngx.log
local ngx_ERR = ngx.ERR
local ngx_now = ngx.now
local update_time = ngx.update_time
local fail, number, known, show = config.fail, config.number, config.known, config.show
local format = string.format
local floor = math.floor
local min = math.min
local max = math.max
local tonumber = tonumber
local pairs = pairs
local ipairs = ipairs

local _M = {}

local DICT = "autoscale_scaling"
local SLOTS = 64          -- owners per upstream: workers of the current and of old generations during a reload
local OWNER_TTL = 2       -- s: a dead owner's slot stops counting after this
local WATCH = 0.01        -- s between the watcher's looks at the upstream while it holds requests
_M.BOUNDS = { 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60 } -- histogram bounds (s) of the time held

_M.defaults = { max_requests = 100, timeout = 30, deadline_header = "X-Request-Timeout", release_rate = 1000 }

local RANGES = { max_requests = { 1, 100000, true }, timeout = { 0.01, 3600 }, release_rate = { 1, 1e6 } }

-- out, err = hold.validate(path, v, scale_to_zero): the checked `scaling.hold` option; false when off (`hold =
-- false`, or left out when scaling.min is above 0), the defaults when left out with scaling.min = 0.
function _M.validate(path, v, scale_to_zero)
    if v == false or (v == nil and not scale_to_zero) then
        return false
    end
    if v == nil or v == true then
        v = {}
    end
    if type(v) ~= "table" then
        return fail(path, "must be a table or false (got %s)", type(v))
    end
    local ok, err = known(path, v, { max_requests = true, timeout = true, deadline_header = true,
                                     release_rate = true })
    if not ok then
        return nil, err
    end
    local out = {}
    for k, r in pairs(RANGES) do
        out[k], err = number(path .. "." .. k, v[k] == nil and _M.defaults[k] or v[k], r[1], r[2], r[3])
        if not out[k] then
            return nil, err
        end
    end
    local h = v.deadline_header
    if h == nil then
        h = _M.defaults.deadline_header
    end
    if h ~= false then
        if type(h) ~= "string" or not h:find("^[%w%-]+$") then
            return fail(path .. ".deadline_header", "must be a header name (letters, digits, '-') or false (got %s)",
                        show(h))
        end
        -- as ngx.var names it: $http_x_request_timeout
        out.deadline_var = "http_" .. h:lower():gsub("%-", "_")
    end
    out.deadline_header = h
    return out
end

----------------------------------------------------------------------------------------------------------------------

local lib, conf, index, dict
local scaler, admission -- loaded on first use
local local_state = {} -- name -> { semas = { [rank] = semaphore }, waiting, slot, watching }

function _M.init(library, configuration, upstream_index)
    lib, conf, index = library, configuration, upstream_index
    dict = ngx.shared[DICT]
    local_state = {}
end

-- n = hold.ready(name): peers of the upstream that take traffic now (active and not draining), read from shared
-- memory without allocating per peer.
local slots, stats, slots_n
local ACTIVE, DRAINING = 1, 3 -- record state "active"; health "draining" (status.lua's STATES / HEALTH)
function _M.ready(name)
    local idx = index and index[name]
    if not idx then
        return 0
    end
    local count = lib.autoscale_upstream_peers(idx, nil, 0)
    if count <= 0 then
        return 0
    end
    if not slots or count + 1 > slots_n then
        slots_n = count + 1
        slots = ffi.new("uint32_t[?]", slots_n)
        stats = stats or ffi.new("autoscale_peer_stats_t")
    end
    count = lib.autoscale_upstream_peers(idx, slots, slots_n)
    local n = 0
    for i = 0, count - 1 do
        if lib.autoscale_peer_stats(slots[i], stats) == 0 and stats.state == ACTIVE and stats.health ~= DRAINING then
            n = n + 1
        end
    end
    return n
end

-- n = hold.held(name): requests held for the upstream now, in all workers of this gateway.
function _M.held(name)
    if not dict then
        return 0
    end
    local n = 0
    for i = 1, SLOTS do
        local c = dict:get(format("hold:%s:%d", name, i))
        if c and c > 0 and dict:get(format("hold_owner:%s:%d", name, i)) then
            n = n + c
        end
    end
    return n
end

local function st_of(name)
    local st = local_state[name]
    if not st then
        st = { semas = {}, ranks = 0, waiting = 0, slot = nil, watching = false }
        local_state[name] = st
    end
    return st
end

-- Claims (or renews) this worker's slot for upstream `name`.
local function own_slot(name, st)
    local pid = ngx.worker.pid()
    if st.slot then
        local key = format("hold_owner:%s:%d", name, st.slot)
        local owner = dict:get(key)
        if owner == pid then
            dict:set(key, pid, OWNER_TTL)
            return true
        end
        st.slot = nil -- lapsed (the event loop stalled for OWNER_TTL): claim again
    end
    for i = 1, SLOTS do
        if dict:add(format("hold_owner:%s:%d", name, i), pid, OWNER_TTL) then
            st.slot = i
            dict:set(format("hold:%s:%d", name, i), st.waiting) -- whatever a dead owner left is void
            return true
        end
    end
    return false
end

local function count(name, what, n)
    dict:incr(format("hold_%s:%s", what, name), n or 1, 0)
end

local function observe(name, seconds)
    for _, b in ipairs(_M.BOUNDS) do
        if seconds <= b then
            dict:incr(format("hold_le:%s:%s", name, b), 1, 0)
            break
        end
    end
    dict:incr("hold_le:" .. name .. ":+Inf", 1, 0)
    dict:incr("hold_sum_ms:" .. name, floor(seconds * 1000 + 0.5), 0)
end

-- The watcher of one worker and upstream: while it holds requests, renews its slot and, once a peer is ready,
-- releases the waiting requests in arrival order at the configured pace.
-- (Also in a worker that is shutting down after a reload: its held requests are still released or time out.)
local function watch(_, name, st, h)
    -- this worker's share of release_rate, as credit that accrues with the time that passes (the first release is
    -- at once)
    local rate = h.release_rate / max(1, ngx.worker.count())
    local cap = max(1, rate * 0.1)
    local credit, last = 1, nil
    local renewed = 0
    while st.waiting > 0 do
        update_time()
        local t = ngx_now()
        credit = min(cap, credit + (last and (t - last) * rate or 0))
        last = t
        if t - renewed >= OWNER_TTL / 4 then
            own_slot(name, st)
            renewed = t
        end
        local ready = credit >= 1 and _M.ready(name) or 0
        if ready > 0 then
            scaler = scaler or require "resty.autoscale.scaler"
            scaler.activated(name, ready)
            -- the most important admission class first; in arrival order within a class (a semaphore's queue)
            local budget_left = floor(credit)
            for rank = 1, st.ranks do
                local sema = st.semas[rank]
                local waiting = sema and -sema:count() or 0 -- blocked on it, not yet posted
                if waiting > 0 and budget_left > 0 then
                    local n = min(budget_left, waiting)
                    sema:post(n)
                    budget_left = budget_left - n
                    credit = credit - n
                end
            end
        end
        ngx.sleep(WATCH)
    end
    st.watching = false
    if st.slot then
        dict:set(format("hold:%s:%d", name, st.slot), 0)
    end
end

local function start_watch(name, st, h)
    if st.watching then
        return true
    end
    st.watching = true
    local ok, err = ngx.timer.at(0, watch, name, st, h)
    if not ok then
        st.watching = false
        ngx_log(ngx_ERR, "resty.autoscale hold of ", name, ": cannot start the watcher: ", err)
    end
    return ok
end

-- The time this request may still wait: hold.timeout, or less when the client's deadline header says so.
local function budget(h)
    local b = h.timeout
    if h.deadline_var then
        local v = tonumber(ngx.var[h.deadline_var])
        if v and v >= 0 then
            b = min(b, v)
        end
    end
    return b
end

-- outcome = hold.wait(name, u): "released" when a peer became ready (the caller sends the request again),
-- "rejected" (queue full), "timeout", "ready" (a peer is ready: nothing to hold for, the request failed on it) or
-- "off" (no hold for this upstream). From the content phase of the fallback location.
function _M.wait(name, u)
    local h = u.scaling and u.scaling.hold
    if not (h and dict) then
        return "off"
    end
    if _M.ready(name) > 0 then
        return "ready"
    end
    local st = st_of(name)
    if not own_slot(name, st) then
        count(name, "rejected")
        return "rejected"
    end
    local key = format("hold:%s:%d", name, st.slot)
    dict:incr(key, 1, 0)
    -- bounded across workers: the sum after our increment, so two workers at the bound both refuse rather than
    -- both admit
    local total = _M.held(name)
    if total > h.max_requests then
        dict:incr(key, -1, 0)
        count(name, "rejected")
        return "rejected"
    end
    st.waiting = st.waiting + 1
    count(name, "total")
    if not start_watch(name, st, h) then
        st.waiting = st.waiting - 1
        dict:incr(key, -1, 0)
        count(name, "failed")
        return "timeout"
    end
    update_time()
    local t0 = ngx_now()
    scaler = scaler or require "resty.autoscale.scaler"
    scaler.wake(name)
    local rank = 1
    if u.admission then
        admission = admission or require "resty.autoscale.admission"
        rank = admission.rank(name)
    end
    local sema = st.semas[rank]
    if not sema then
        sema = semaphore.new(0)
        st.semas[rank] = sema
        st.ranks = math.max(st.ranks, rank)
    end
    local ok = sema:wait(budget(h))
    st.waiting = st.waiting - 1
    if st.slot then
        dict:incr(format("hold:%s:%d", name, st.slot), -1, 0)
    end
    update_time()
    local held_for = ngx_now() - t0
    observe(name, held_for)
    if ok then
        count(name, "released")
        return "released", held_for
    end
    count(name, "timeouts")
    return "timeout", held_for
end

-- st = hold.state(name): what status, /scaling and Prometheus show.
function _M.state(name)
    if not dict then
        return nil
    end
    local hist = {}
    for _, b in ipairs(_M.BOUNDS) do
        hist[#hist + 1] = { le = b, count = dict:get(format("hold_le:%s:%s", name, b)) or 0 }
    end
    return {
        held = _M.held(name),
        total = dict:get("hold_total:" .. name) or 0,
        released = dict:get("hold_released:" .. name) or 0,
        timeouts = dict:get("hold_timeouts:" .. name) or 0,
        rejected = dict:get("hold_rejected:" .. name) or 0,
        failed = dict:get("hold_failed:" .. name) or 0,
        seconds_count = dict:get("hold_le:" .. name .. ":+Inf") or 0,
        seconds_sum = (dict:get("hold_sum_ms:" .. name) or 0) / 1000,
        histogram = hist,
    }
end

return _M
