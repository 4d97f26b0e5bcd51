-- resty.autoscale: latency- and failure-aware load balancing for nginx, with statistics shared by all workers.
--
--     autoscale = require "resty.autoscale"                     -- init_by_lua*
--     autoscale.configure { upstreams = { api = { peers = { "127.0.0.1:8081", "127.0.0.1:8082" } } } }
--     autoscale.init_worker()                                   -- init_worker_by_lua* (optional)
--     autoscale.balance("api")                                  -- balancer_by_lua*
--     autoscale.log()                                           -- log_by_lua*
--     local st = autoscale.status("api")                        -- anywhere
--
-- See docs/lua-api.md for every function and README.md for every option.

local config = require "resty.autoscale.config"
local loader = require "resty.autoscale.lib"
local balancer = require "resty.autoscale.balancer"
local status = require "resty.autoscale.status"
local events = require "resty.autoscale.events"
local healthcheck = require "resty.autoscale.healthcheck"
local spec = require "resty.autoscale.spec"
local control = require "resty.autoscale.control"
local prometheus = require "resty.autoscale.prometheus"
local dashboard = require "resty.autoscale.dashboard"
local trace = require "resty.autoscale.trace"
local discovery = require "resty.autoscale.discovery"
local scaler = require "resty.autoscale.scaler"
local admin = require "resty.autoscale.admin"
local admission = require "resty.autoscale.admission"
local reports = require "resty.autoscale.reports"
local ffi = require "ffi"

local ngx = ngx
local error = error
local pairs = pairs
local ipairs = ipairs
local sort = table.sort
local get_phase = ngx.get_phase

local _M = { _VERSION = "0.2.0" }

local lib, conf, index
local timer_started = false

-- Upkeep of this worker: window buckets cleared ahead, outlier sweeps, events written to the log (each once).
local function start_timer()
    if timer_started then
        return true
    end
    timer_started = true
    local interval = math.min(conf.window.bucket / 2, 0.5)
    local ok, err = ngx.timer.every(interval, function(premature)
        if not premature then
            lib.autoscale_region_tick()
        end
        events.flush() -- also when the worker exits, so that no event goes unlogged
    end)
    if not ok then
        timer_started = false
        return nil, err
    end
    local ok2, err2 = admission.start()
    if not ok2 then
        return nil, err2
    end
    ok2, err2 = healthcheck.start(conf, index)
    if not ok2 then
        return nil, err2
    end
    ok2, err2 = scaler.start()
    if not ok2 then
        return nil, err2
    end
    return discovery.start()
end

-- autoscale.configure(conf)
-- Validates `conf` completely, creates (or, on reload, reuses) the shared region and applies the upstreams.
-- Must be called in init_by_lua*. Raises an error naming the field and the reason when anything is wrong, which
-- stops nginx from starting (or a reload from taking effect).
function _M.configure(user_conf)
    local phase = get_phase()
    if phase ~= "init" then
        error("resty.autoscale.configure must be called in init_by_lua* (called in " .. phase .. ")", 2)
    end
    local c, err = config.validate(user_conf)
    if not c then
        -- one line per wrong field, each naming it
        error("resty.autoscale: " .. err:gsub("\n", "\nresty.autoscale: "), 2)
    end
    local l, lib_file
    l, lib_file = loader.load(c.lib_path)
    if not l then
        error("resty.autoscale: " .. lib_file, 2)
    end
    local errbuf = ffi.new("char[512]")
    local params = ffi.new("autoscale_region_params_t", {
        max_upstreams = c.max_upstreams, max_peers = c.max_peers, max_workers = c.max_workers,
        window_buckets = c.window.buckets, bucket_ms = math.floor(c.window.bucket * 1000 + 0.5),
        rate_slots = c.admission_rate_slots,
    })
    local rc = l.autoscale_region_init(params, errbuf, 512)
    if rc ~= 0 then
        error("resty.autoscale: " .. ffi.string(errbuf), 2)
    end

    discovery.carry_over(l, c)
    local names = {}
    for name in pairs(c.upstreams) do
        names[#names + 1] = name
    end
    sort(names)
    local keep = {} -- keeps the strings and arrays alive during the call
    local specs = ffi.new("autoscale_upstream_spec_t[?]", #names)
    for i, name in ipairs(names) do
        spec.fill(specs[i - 1], name, c.upstreams[name], keep)
    end
    local indices = ffi.new("uint32_t[?]", #names + 1)
    rc = l.autoscale_config_apply(specs, #names, indices, errbuf, 512)
    if rc ~= 0 then
        error("resty.autoscale: " .. ffi.string(errbuf), 2)
    end
    local idx = {}
    for i, name in ipairs(names) do
        idx[name] = indices[i - 1]
    end
    lib, conf, index = l, c, idx
    balancer.init(lib, conf, index, reports.init(lib, conf, index))
    status.init(lib, conf, index, lib_file)
    events.init(lib, conf)
    healthcheck.init(lib)
    control.init(lib, conf, index)
    discovery.init(lib, conf, index)
    local sok, serr = scaler.init(lib, conf, index)
    if not sok then
        error("resty.autoscale: " .. serr, 2)
    end
    admission.init(lib, conf, index)
    require("resty.autoscale.hold").init(lib, conf, index)
    return true
end

-- autoscale.init_worker()
-- In init_worker_by_lua*: attaches the worker and starts its timers (upkeep, event log, active health checks).
-- Without it the upkeep timer starts on the worker's first request and active health checks do not run.
function _M.init_worker()
    if not lib then
        return nil, "resty.autoscale is not configured"
    end
    balancer.attach()
    return start_timer()
end

-- autoscale.balance(upstream_name), in balancer_by_lua*
_M.balance = balancer.balance

-- autoscale.log(), in log_by_lua*
function _M.log()
    balancer.log()
    admission.log()
    if not timer_started and lib then
        start_timer()
    end
end

-- ok = autoscale.admit(upstream_name, opts?), in access_by_lua*: admission (docs/admission.md)
_M.admit = admission.admit

-- st = autoscale.admission_status(upstream_name): limit, rates and counters per class, or nil without admission
_M.admission_status = admission.status

-- st, err = autoscale.status(upstream_name)
_M.status = status.upstream

-- st = autoscale.status_all()
_M.status_all = status.all

-- autoscale.status_handler(), in content_by_lua*
_M.status_handler = status.handler

-- cls = autoscale.classify(status, connect_time, header_time): outcome code of one attempt (see balancer.lua)
_M.classify = balancer.classify

-- autoscale.fallback(upstream_name), in content_by_lua* of the location `error_page 502 504 = ...` points to:
-- the configured response when no peer could serve the request.
_M.fallback = balancer.fallback

-- Run-time changes, in every worker at once (not persisted: a reload applies nginx.conf again); see docs/lua-api.md.
_M.control = control

-- Service discovery: the standby pool (activate/deactivate) and the state of the sources; see docs/discovery.md.
_M.discovery = discovery

-- autoscale.discovery_handler(), in content_by_lua*: GET the discovery state, POST ?upstream=&activate=n|deactivate=n
_M.discovery_handler = discovery.handler

-- Scaling decisions (docs/scaling.md): autoscale.scaling.pending(name), .state(name), .decisions(name, n)
_M.scaling = scaler

-- autoscale.scaling_handler(), in content_by_lua*: desired instances per service as JSON (KEDA metrics-api)
_M.scaling_handler = scaler.handler

-- list = autoscale.events(max): the most recent events, oldest first
function _M.events(max)
    if not lib then
        return nil, "resty.autoscale is not configured"
    end
    return events.recent(max)
end

-- autoscale.prometheus_handler(), in content_by_lua*: the metrics in Prometheus' text format
_M.prometheus_handler = prometheus.handler

-- autoscale.dashboard_handler(opts), in content_by_lua*: the dashboard page, and with ?format=json its data
_M.dashboard_handler = dashboard.handler

-- autoscale.admin(opts), in init_by_lua* after configure: turns the admin HTTP API on (docs/admin-api.md)
function _M.admin(opts)
    if not lib then
        error("resty.autoscale.admin: call autoscale.configure first", 2)
    end
    return admin.setup(opts)
end

-- autoscale.admin_handler(), in content_by_lua*: the admin HTTP API (off unless autoscale.admin was called)
_M.admin_handler = admin.handler

-- autoscale.trace(opts), in init_by_lua* after configure: $autoscale_* variables name each peer choice and its cost
function _M.trace(opts)
    _M.balance = trace.enable(opts, lib, balancer)
end

return _M
