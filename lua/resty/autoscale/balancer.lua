-- The request path: peer choice in balancer_by_lua*, accounting in log_by_lua*.
--
-- Nothing here allocates per request or takes a lock: the choice is one FFI call into the library, which reads and
-- updates shared memory with atomics; the FFI out-parameters are allocated once at load time; addresses are cached
-- per peer record and re-read only when the record changes hands (its generation changes). The log phase reads no
-- nginx variable for a request that went to one peer and got a response below 500; only retries and 5xx responses
-- take the slower path that reads $upstream_status, $upstream_connect_time and $upstream_header_time to tell
-- connect errors, timeouts, gateway errors and 5xx apart.

local ffi = require "ffi"
local base = require "resty.core.base"
require "ngx.balancer"    -- declares the ngx_http_lua_ffi_balancer_* functions used below
require "resty.core.misc" -- declares ngx_http_lua_ffi_get_resp_status

local C = ffi.C
local ngx = ngx
local var = ngx.var
local ngx_log = ngx.log
local ngx_ERR = ngx.ERR
local ngx_WARN = ngx.WARN
local ngx_exit = ngx.exit
local ngx_now = ngx.now
local get_request = base.get_request
local ffi_string = ffi.string
local tonumber = tonumber
local tostring = tostring
local pairs = pairs
local error = error
local sub = string.sub
local byte = string.byte
local gmatch = string.gmatch

local _M = {}

local lib               -- the FFI library namespace, set by _M.init
local conf              -- the validated configuration
local index             -- upstream name -> index in shared memory
local ugens = {}        -- upstream name -> generation of its record when the index was resolved
local gen_out = ffi.new("uint32_t[1]")
local NEED_DETAIL
local STALE
local pick = ffi.new("autoscale_pick_t")
local status_out = ffi.new("int[1]")
local errmsg = ffi.new("char *[1]")
local FAILED = 4 -- NGX_PEER_FAILED, as get_last_failure reports it
-- NGX_BUSY: nginx then answers 502 ("no live upstreams"), which `error_page 502` can turn into a fallback. (An HTTP
-- status given to ngx.exit in balancer_by_lua* becomes a 500 on this lua-nginx-module.)
local NGX_BUSY = -3
local kinds = ffi.new("uint32_t[32]")
local codes = ffi.new("uint32_t[32]")
local addr_buf = ffi.new("uint8_t[64]")

-- Per peer record (slot + 1): generation, host and port last seen.
local gens, hosts, ports = {}, {}, {}

local attached = false
local reporting = false -- some upstream reads backend-reported load (reports.lua)
local reports = require "resty.autoscale.reports"
local hold -- resty.autoscale.hold, loaded on the first fallback with scaling.hold
local no_peer_logged_at = 0

function _M.init(library, configuration, upstream_index, any_reports)
    lib = library
    reporting = any_reports == true
    conf = configuration
    index = upstream_index
    NEED_DETAIL = lib.AUTOSCALE_NEED_DETAIL
    STALE = lib.AUTOSCALE_ERR_STALE
    ugens = {}
    for name, idx in pairs(index or {}) do
        if lib.autoscale_upstream_gen(idx, gen_out) == 0 then
            ugens[name] = gen_out[0]
        end
    end
end

-- Picks on upstream `name` with the index and generation this worker resolved. When the record was handed to another
-- upstream since (a reconfigure in the new generation of workers, while this one still serves), the name is resolved
-- again once: the upstream under that name now, or none.
local function pick_on(r, name, last)
    local idx = index[name]
    local rc = lib.autoscale_balancer_pick(r, idx, ugens[name] or 0, last, pick)
    if rc == STALE then
        idx = lib.autoscale_upstream_find(name, #name)
        if idx >= 0 and lib.autoscale_upstream_gen(idx, gen_out) == 0 then
            index[name], ugens[name] = idx, gen_out[0]
            rc = lib.autoscale_balancer_pick(r, idx, gen_out[0], last, pick)
        end
    end
    return rc
end

-- Makes sure this worker has its in-flight column (idempotent, cheap after the first call).
function _M.attach()
    if not attached then
        attached = true
        if lib.autoscale_worker_attach() < 0 then
            ngx_log(ngx_WARN, "resty.autoscale: no free worker column (raise max_workers); ",
                    "in-flight counts of this worker are not reclaimed if it dies")
        end
    end
end

local function refresh(slot, gen)
    local n = lib.autoscale_peer_addr(slot, addr_buf, 64)
    local text = ffi_string(addr_buf, n)
    local colon = #text
    while colon > 0 and byte(text, colon) ~= 58 do -- ':'
        colon = colon - 1
    end
    local i = slot + 1
    hosts[i] = sub(text, 1, colon - 1)
    ports[i] = tonumber(sub(text, colon + 1))
    gens[i] = gen
end

-- autoscale.balance(upstream_name)
function _M.balance(name)
    local idx = index and index[name]
    if not idx then
        error("resty.autoscale: unknown upstream " .. tostring(name) .. " (not in autoscale.configure)", 2)
    end
    if not attached then
        _M.attach()
    end
    local r = get_request()
    -- 0 on the first attempt; else how the previous attempt ended (nginx's NGX_PEER_FAILED or NGX_PEER_NEXT).
    local last = 0
    local state = C.ngx_http_lua_ffi_balancer_get_last_failure(r, status_out, errmsg)
    if state > 0 then
        last = status_out[0]
        if last == 0 or (state == FAILED and (last < 500 or last > 599)) then
            last = 502
        end
    end
    local rc = pick_on(r, name, last)
    if rc ~= 0 then
        local fb = conf.upstreams[name].fallback.upstream
        if fb and last == 0 and index[fb] then
            rc = pick_on(r, fb, 0)
        end
        if rc ~= 0 then
            local now = ngx_now()
            if now - no_peer_logged_at >= 1 then
                no_peer_logged_at = now
                -- a normal state for a service that holds requests while it has no peer (scaled to zero)
                local sc = conf.upstreams[name].scaling
                ngx_log(sc and sc.hold and ngx.NOTICE or ngx_ERR, "resty.autoscale: upstream ", name,
                        ": no peer available (code ", rc, ")")
            end
            return ngx_exit(NGX_BUSY)
        end
    end
    local slot = pick.slot
    local i = slot + 1
    if gens[i] ~= pick.gen then
        refresh(slot, pick.gen)
    end
    local host = hosts[i]
    if C.ngx_http_lua_ffi_balancer_set_current_peer(r, host, #host, ports[i], errmsg) ~= 0 then
        ngx_log(ngx_ERR, "resty.autoscale: set_current_peer(", host, ":", ports[i], "): ", ffi_string(errmsg[0]))
        return ngx_exit(ngx.ERROR) -- 500: not the peer's fault
    end
    if pick.attempt == 1 and pick.more_tries > 0 then
        C.ngx_http_lua_ffi_balancer_set_more_tries(r, pick.more_tries, errmsg)
    end
    return pick -- for the traced wrapper (trace.lua); nil above means the 502 path
end

-- Kind of one attempt from its $upstream_status, $upstream_connect_time and $upstream_header_time entries:
-- 0 an HTTP response (the library judges its status against the upstream's failure_statuses), 2 connected but no
-- valid response header, 3 connect error, 4 timeout, 5 aborted by the client, 99 unknown.
local function classify(status, connect, header)
    local st = tonumber(status)
    if not st then
        return 99
    end
    if st == 499 then
        return 5
    end
    if header ~= "-" and header ~= nil then
        return 0
    end
    if st < 500 then -- e.g. a 4xx nginx produced itself; judged by its status
        return 0
    end
    if connect == "-" or connect == nil then
        return st == 504 and 4 or 3
    end
    return st == 504 and 4 or 2
end
_M.classify = classify

local function split(s, out)
    local n = 0
    if s then
        for item in gmatch(s, "[^,:%s]+") do
            n = n + 1
            out[n] = item
        end
    end
    for j = n + 1, #out do
        out[j] = nil
    end
    return n
end

local statuses, connects, headers = {}, {}, {}

local function detail(r)
    local n = split(var.upstream_status, statuses)
    split(var.upstream_connect_time, connects)
    split(var.upstream_header_time, headers)
    if n > 32 then
        n = 32
    end
    for j = 1, n do
        kinds[j - 1] = classify(statuses[j], connects[j], headers[j])
        codes[j - 1] = tonumber(statuses[j]) or 0
    end
    lib.autoscale_log_detail(r, kinds, codes, n)
end

-- autoscale.log()
function _M.log()
    if not lib then
        return
    end
    local r = get_request()
    local status = C.ngx_http_lua_ffi_get_resp_status(r)
    -- One branch when no upstream reads reports; else the report of the last attempt first (which may finish a
    -- back-pressure response itself).
    if reporting and reports.log(r, status) then
        return
    end
    if lib.autoscale_log_finish(r, status) == NEED_DETAIL then
        detail(r)
    end
end

-- autoscale.fallback(name): the upstream's configured fallback response; with scaling.hold, while the upstream has
-- no ready peer, the request is held first (resty.autoscale.hold) and sent again once a peer is ready. The first one after 10 s without any
-- becomes a `fallback` event, so it is logged once per episode across all workers, not per request.
function _M.fallback(name)
    local u = conf and conf.upstreams[name]
    if not u then
        error("resty.autoscale: unknown upstream " .. tostring(name) .. " (not in autoscale.configure)", 2)
    end
    if u.scaling and u.scaling.hold then
        -- no ready peer (scaled to zero, or starting): wait for one, then send the request again from the start
        -- (its location, its proxy_pass), as if it had just arrived
        hold = hold or require "resty.autoscale.hold"
        if hold.wait(name, u) == "released" then
            return ngx.exec(var.uri, var.args)
        end
    end
    local fb = u.fallback
    lib.autoscale_upstream_fallback(index[name], fb.status)
    ngx.status = fb.status
    local h = ngx.header
    if fb.retry_after > 0 then
        h["Retry-After"] = fb.retry_after
    end
    for k, v in pairs(fb.headers) do
        h[k] = v
    end
    local body = fb.body
    if not body then
        h["Content-Type"] = "application/json"
        body = '{"error":"service unavailable","upstream":"' .. name .. '","retry_after":' .. fb.retry_after .. '}\n'
    end
    h["Content-Length"] = #body
    ngx.print(body)
    return ngx_exit(fb.status)
end

return _M
