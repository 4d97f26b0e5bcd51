-- Turns a validated upstream configuration into the C struct the library takes.

local ffi = require "ffi"
local config = require "resty.autoscale.config"

local floor = math.floor
local max = math.max
local ipairs = ipairs

local _M = {}

local function ms(s)
    return floor(s * 1000 + 0.5)
end

local function outlier(o)
    return {
        consecutive_5xx = o.consecutive_5xx,
        consecutive_gateway = o.consecutive_gateway_failures,
        consecutive_timeout = o.consecutive_timeouts,
        base_ejection_ms = ms(o.base_ejection_time),
        max_ejection_ms = ms(o.max_ejection_time),
        ejection_jitter_ms = ms(o.ejection_jitter),
        max_ejection_percent = o.max_ejection_percent,
        interval_ms = ms(o.interval),
        success_rate_min_hosts = o.success_rate_min_hosts,
        success_rate_volume = o.success_rate_request_volume,
        failure_percentage = o.failure_percentage,
        failure_percentage_min_hosts = o.failure_percentage_min_hosts,
        failure_percentage_volume = o.failure_percentage_request_volume,
        half_open_probes = o.half_open_probes,
        half_open_successes = o.half_open_successes,
        panic_threshold = o.panic_threshold,
        success_rate_stdev = o.success_rate_stdev,
    }
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

return _M
