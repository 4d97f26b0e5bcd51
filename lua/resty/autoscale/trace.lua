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

--
-- The traced path allocates no Lua memory: the cost comes with the pick (autoscale_pick_t.cost), each value is
-- formatted into a buffer allocated once (the cost by snprintf's "%.6g") and handed to lua-nginx-module's variable setter (the C function
-- behind ngx.var, which copies it into the request's pool), the previous attempts are read the same way, and the
-- peer's address is cached per peer record.

local ffi = require "ffi"
local base = require "resty.core.base"
require "resty.core.var" -- declares ngx_http_lua_ffi_var_get/set

local ngx = ngx
local C = ffi.C
local type = type
local error = error
local pairs = pairs
local ipairs = ipairs
local tostring = tostring
local tonumber = tonumber
local ffi_string = ffi.string
local ffi_copy = ffi.copy
local floor = math.floor
local get_request = base.get_request

pcall(ffi.cdef, "int snprintf(char *str, size_t size, const char *format, ...);")

local TRACE_MAX = 4096 -- $autoscale_trace is cut at this length (about 60 attempts)
local ERR_MAX = 256
local trace_buf = ffi.new("char[?]", TRACE_MAX)
local attempt_buf = ffi.new("char[16]")
local cost_buf = ffi.new("char[32]")
local lowcase_buf = ffi.new("char[32]")
local err_buf = ffi.new("unsigned char[?]", ERR_MAX)
local err_len = ffi.new("size_t[1]")
local value_ptr = ffi.new("char *[1]")
local value_len = ffi.new("size_t[1]")
local err_ptr = ffi.new("char *[1]")

-- set(r, name, ptr, len): sets nginx variable `name` (declared with `set`) to len bytes at ptr, raising nginx's
-- error (such as "variable not found") as ngx.var would
local function set(r, name, ptr, len)
    err_len[0] = ERR_MAX
    if C.ngx_http_lua_ffi_var_set(r, name, #name, lowcase_buf, ptr, len, err_buf, err_len) ~= 0 then
        error(ffi_string(err_buf, err_len[0]), 3)
    end
end

-- n = put_uint(buf, v): writes the decimal digits of `v` (an integer >= 0) at `buf`; returns how many. No loop
-- below 100 (attempt numbers), so that the JIT compiles it into the caller's trace.
local function put_uint(buf, v)
    if v < 10 then
        buf[0] = 48 + v
        return 1
    end
    if v < 100 then
        buf[0], buf[1] = 48 + floor(v / 10), 48 + v % 10
        return 2
    end
    local n, x = 1, v
    while x >= 10 do
        x = floor(x / 10)
        n = n + 1
    end
    for i = n - 1, 0, -1 do
        buf[i] = 48 + v % 10
        v = floor(v / 10)
    end
    return n
end

-- n = previous_trace(r): copies the value of $autoscale_trace into trace_buf; its length (0 when empty)
local function previous_trace(r)
    if C.ngx_http_lua_ffi_var_get(r, "autoscale_trace", 15, lowcase_buf, 0, value_ptr, value_len, err_ptr) ~= 0 then
        return 0
    end
    local n = tonumber(value_len[0])
    if n > TRACE_MAX - 128 then
        n = TRACE_MAX - 128
    end
    ffi_copy(trace_buf, value_ptr[0], n)
    return n
end

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
    local addr_buf = ffi.new("uint8_t[64]")
    local addrs, gens = {}, {} -- per peer record (slot + 1), as in the balancer

    return function(name)
        local p = balance(name)
        if not p then -- no peer: the balancer answered 502
            return
        end
        local addr, cost_len
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
            cost_len = C.snprintf(cost_buf, 32, "%.6g", p.cost)
            if cost_len < 0 or cost_len > 31 then
                cost_len = 0
            end
        end
        local r = get_request()
        if set_peer then
            set(r, "autoscale_peer", addr, #addr)
        end
        if set_attempt then
            set(r, "autoscale_attempt", attempt_buf, put_uint(attempt_buf, attempt))
        end
        if set_cost then
            set(r, "autoscale_cost", cost_buf, cost_len)
        end
        if set_trace then
            local n = 0
            if attempt > 1 then
                n = previous_trace(r)
                if n > 0 then
                    trace_buf[n], trace_buf[n + 1] = 44, 32 -- ", "
                    n = n + 2
                end
            end
            -- at most 64 + 9 + 10 + 6 + 31 bytes after the 128 previous_trace leaves free
            ffi_copy(trace_buf + n, addr, #addr)
            n = n + #addr
            ffi_copy(trace_buf + n, " attempt=", 9)
            n = n + 9
            n = n + put_uint(trace_buf + n, attempt)
            ffi_copy(trace_buf + n, " cost=", 6)
            n = n + 6
            ffi_copy(trace_buf + n, cost_buf, cost_len)
            n = n + cost_len
            set(r, "autoscale_trace", trace_buf, n)
        end
        return p
    end
end

return _M
