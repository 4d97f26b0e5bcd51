-- Traceability: which peer each attempt went to and why, in nginx variables usable in log_format and add_header.
--
-- Off by default. `autoscale.trace(opts)` (init_by_lua*, after configure) replaces autoscale.balance by a version
-- that, after the choice, sets the variables the configuration declares with `set $autoscale_peer "";` etc. When
-- tracing is off autoscale.balance is the untraced function itself, so the request path does not change at all.
--
--     $autoscale_peer      ip:port of the last attempt's peer
--     $autoscale_attempt   number of that attempt (1 = first try, 2 = first retry, ...)
--     $autoscale_cost      the balancer's cost of that peer when it was chosen (lower is preferred)
--     $autoscale_trace     every attempt of the request: "10.0.0.1:80 attempt=1 cost=812, 10.0.0.2:80 attempt=2 ..."

local ffi = require "ffi"

local ngx = ngx
local var = ngx.var
local type = type
local error = error
local pairs = pairs
local ipairs = ipairs
local tostring = tostring
local format = string.format
local ffi_string = ffi.string

local _M = {}

local VARIABLES = { peer = true, attempt = true, cost = true, trace = true }

-- fn = trace.enable(opts, lib, balancer)
-- Returns the traced balance function for autoscale.balance. `opts.variables` lists the variables to fill, among
-- "peer", "attempt", "cost", "trace" (default: all four); each must be declared (`set $autoscale_<name> "";`) in
-- every server whose requests go through autoscale.balance, or the request fails with "variable not found".
function _M.enable(opts, lib, balancer)
    if ngx.get_phase() ~= "init" then
        error("resty.autoscale.trace must be enabled in init_by_lua* (called in " .. ngx.get_phase() .. ")", 3)
    end
    if not lib then
        error("resty.autoscale.trace: call autoscale.configure first", 3)
    end
    opts = opts or {}
    if type(opts) ~= "table" then
        error("resty.autoscale.trace: options must be a table (got " .. type(opts) .. ")", 3)
    end
    for k in pairs(opts) do
        if k ~= "variables" then
            error("resty.autoscale.trace: unknown option " .. tostring(k) .. " (valid: variables)", 3)
        end
    end
    local want = {}
    local list = opts.variables or { "peer", "attempt", "cost", "trace" }
    if type(list) ~= "table" or #list == 0 then
        error("resty.autoscale.trace: variables must be a non-empty list of peer, attempt, cost, trace", 3)
    end
    for _, v in ipairs(list) do
        if not VARIABLES[v] then
            error("resty.autoscale.trace: unknown variable " .. tostring(v) .. " (valid: peer, attempt, cost, trace)", 3)
        end
        want[v] = true
    end
    local set_peer, set_attempt, set_cost, set_trace = want.peer, want.attempt, want.cost, want.trace
    local need_addr, need_cost = set_peer or set_trace, set_cost or set_trace

    local balance = balancer.balance
    -- the cost the core used for the choice when autoscale_pick_t carries it, else the peer's cost right after
    local pick_has_cost = ffi.offsetof("autoscale_pick_t", "cost") ~= nil
    local stats = ffi.new("autoscale_peer_stats_t")
    local addr_buf = ffi.new("uint8_t[64]")
    local addrs, gens = {}, {} -- per peer record (slot + 1), as in the balancer

    return function(name)
        local p = balance(name)
        if not p then -- no peer: the balancer answered 502
            return
        end
        local addr, cost
        local attempt = p.attempt
        if need_addr then
            local i = p.slot + 1
            if gens[i] ~= p.gen then
                addrs[i] = ffi_string(addr_buf, lib.autoscale_peer_addr(p.slot, addr_buf, 64))
                gens[i] = p.gen
            end
            addr = addrs[i]
        end
        if need_cost then
            if pick_has_cost then
                cost = p.cost
            elseif lib.autoscale_peer_stats(p.slot, stats) == 0 then
                cost = stats.cost
            end
            cost = cost and format("%.6g", cost) or "-"
        end
        if set_peer then
            var.autoscale_peer = addr
        end
        if set_attempt then
            var.autoscale_attempt = attempt
        end
        if set_cost then
            var.autoscale_cost = cost
        end
        if set_trace then
            local entry = addr .. " attempt=" .. attempt .. " cost=" .. cost
            var.autoscale_trace = attempt > 1 and (var.autoscale_trace or "") .. ", " .. entry or entry
        end
        return p
    end
end

return _M
