-- Turns a validated upstream configuration into the C struct the library takes.

local ffi = require "ffi"
local config = require "resty.autoscale.config"

local bit = require "bit"

local floor = math.floor
local max = math.max
local ipairs = ipairs
local pairs = pairs
local tonumber = tonumber

local _M = {}

local BALANCER_NAMES = {}
for name, n in pairs(config.balancers) do
    BALANCER_NAMES[n] = name
end

local function ms(s)
    return floor(s * 1000 + 0.5)
end

-- The outlier options: name in the Lua table, field of autoscale_outlier_spec_t, and whether it is a time (seconds
-- in Lua, milliseconds in C).
local OUTLIER = {
    { "consecutive_5xx", "consecutive_5xx" },
    { "consecutive_gateway_failures", "consecutive_gateway" },
    { "consecutive_timeouts", "consecutive_timeout" },
    { "base_ejection_time", "base_ejection_ms", true },
    { "max_ejection_time", "max_ejection_ms", true },
    { "ejection_jitter", "ejection_jitter_ms", true },
    { "max_ejection_percent", "max_ejection_percent" },
    { "interval", "interval_ms", true },
    { "success_rate_stdev", "success_rate_stdev" },
    { "success_rate_min_hosts", "success_rate_min_hosts" },
    { "success_rate_request_volume", "success_rate_volume" },
    { "failure_percentage", "failure_percentage" },
    { "failure_percentage_min_hosts", "failure_percentage_min_hosts" },
    { "failure_percentage_request_volume", "failure_percentage_volume" },
    { "half_open_probes", "half_open_probes" },
    { "half_open_successes", "half_open_successes" },
    { "panic_threshold", "panic_threshold" },
}

local function outlier(o)
    local out = {}
    for _, f in ipairs(OUTLIER) do
        out[f[2]] = f[3] and ms(o[f[1]]) or o[f[1]]
    end
    return out
end

-- spec.fill(s, name, u, keep): fills `s` (an autoscale_upstream_spec_t) from upstream `name`'s validated table `u`;
-- the FFI arrays it creates are appended to `keep`, which the caller holds until the library call returns.
function _M.fill(s, name, u, keep)
    local peers = ffi.new("autoscale_peer_spec_t[?]", #u.peers)
    for j, p in ipairs(u.peers) do
        peers[j - 1].addr = p.addr
        peers[j - 1].addr_len = #p.addr
        peers[j - 1].weight = p.weight
    end
    keep[#keep + 1] = peers
    s.name, s.name_len = name, #name
    s.algorithm = config.balancers[u.balancer]
    s.retries = u.retries
    s.slow_start_ms = ms(u.slow_start)
    s.decay_ms = max(1, ms(u.ewma_decay))
    s.default_rtt_us = max(1, floor(u.default_rtt * 1e6 + 0.5))
    s.slow_start_aggression = u.slow_start_aggression
    s.slow_start_min_weight = u.slow_start_min_weight
    s.failure_penalty = u.failure_penalty
    s.slow_peer_factor = u.slow_peer_factor
    s.slow_peer_penalty = u.slow_peer_penalty
    s.peers, s.npeers = peers, #u.peers
    s.outlier = outlier(u.outlier)
    local fs = ffi.new("uint16_t[?]", #u.failure_statuses, u.failure_statuses)
    keep[#keep + 1] = fs
    s.failure_statuses, s.nfailure_statuses = fs, #u.failure_statuses
end

-- The statuses set in a bitmap of 10 uint64 words (bit s % 64 of word s / 64), as a sorted list. Each word is split
-- into two 32-bit Lua numbers once, so that the bit tests need no 64-bit cdata.
local function statuses(words)
    local out = {}
    for w = 0, 9 do
        local halves = { tonumber(bit.band(words[w], 0xffffffffULL)), tonumber(bit.rshift(words[w], 32)) }
        for b = 0, 63 do
            if bit.band(halves[floor(b / 32) + 1], bit.lshift(1, b % 32)) ~= 0 then
                out[#out + 1] = w * 64 + b
            end
        end
    end
    return out
end

-- options = spec.tunables(c): the inverse of fill for the tunables kept in shared memory: `c` (an
-- autoscale_upstream_config_t) as the options of a validated upstream table. An option stored in shared memory that
-- is missing here shows its nginx.conf value after a run-time change: add it here when adding it to the struct.
local function outlier_options(o)
    local out = {}
    for _, f in ipairs(OUTLIER) do
        out[f[1]] = f[3] and o[f[2]] / 1000 or o[f[2]]
    end
    return out
end

function _M.tunables(c)
    return {
        balancer = BALANCER_NAMES[c.algorithm] or "peak_ewma",
        retries = c.retries,
        ewma_decay = c.decay_ms / 1000,
        default_rtt = c.default_rtt_us / 1e6,
        slow_start = c.slow_start_ms / 1000,
        slow_start_aggression = c.slow_start_aggression,
        slow_start_min_weight = c.slow_start_min_weight,
        failure_penalty = c.failure_penalty,
        slow_peer_factor = c.slow_peer_factor,
        slow_peer_penalty = c.slow_peer_penalty,
        outlier = outlier_options(c.outlier),
        failure_statuses = statuses(c.failure_statuses),
    }
end

return _M
