# vim:set ft= ts=4 sw=4 et:
# Scaling decisions in a real nginx, actions received by a strict webhook receiver (t/lib/scale_receiver.py, which
# checks the signature with Python's hmac): a step from 1x to 4x load on a service held by 2 instances is acted on
# within 2 s; no scale-down before the stabilization window ends; a load swinging around the target does not flap;
# the forecast asks for capacity before a steady ramp crosses the target; failed calls are retried with exponential
# backoff (timings asserted) under one idempotency key; publish-only mode answers KEDA's metrics-api and exposes
# Prometheus gauges (checked by promtool); bad options stop nginx with the field path.

use lib 't';
use Autoscale;
require './t/lib/scaling_ports.pl';
scaling_ports('HOOK');

workers(2);
worker_connections(1024);
master_on();

# Backends on ports 1-4 (50 ms each); the gateway on port 5; the receiver (t/lib/scale_receiver.py) on HOOK_PORT.
our $HttpConfig = <<'_EOC_';
    lua_shared_dict autoscale_scaling 1m;
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1;
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_2;
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_3;
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_4;
        location / { content_by_lua_block { ngx.sleep(tonumber(ngx.var.arg_ms or 50) / 1000) ngx.say("ok") } }
    }
    init_by_lua_block {
        autoscale = require "resty.autoscale"
        local hook = { type = "webhook", url = "http://127.0.0.1:$TEST_NGINX_HOOK_PORT/scale", secret = "0123456789abcdef-secret",
                       retries = 3, backoff = 0.2, jitter = 0.2 }
        local two = { "127.0.0.1:$TEST_NGINX_RAND_PORT_1", "127.0.0.1:$TEST_NGINX_RAND_PORT_2" }
        autoscale.configure { upstreams = {
            -- 3 in flight per instance is on target: 2 instances carry 6 clients
            step = { peers = two, scaling = { min = 2, max = 20, utilization = { capacity = 4, target = 0.75 },
                     provision_timeout = 30, actuator = hook } },
            calm = { peers = { "127.0.0.1:$TEST_NGINX_RAND_PORT_1", "127.0.0.1:$TEST_NGINX_RAND_PORT_2",
                               "127.0.0.1:$TEST_NGINX_RAND_PORT_3", "127.0.0.1:$TEST_NGINX_RAND_PORT_4" },
                     scaling = { min = 1, max = 4, utilization = { capacity = 4, target = 0.75 },
                                 scale_up_window = 0, scale_down_window = 3, cooldown = 0, actuator = hook } },
            swing = { peers = two, scaling = { min = 2, max = 20, utilization = { capacity = 4, target = 0.75 },
                      provision_timeout = 30, actuator = hook } },
            ramp = { peers = two, scaling = { min = 2, max = 20, rps = { target = 50 }, provision_timeout = 30,
                     scale_up_window = 0.5, forecast = { lead_time = 3 }, actuator = hook } },
            plain = { peers = two, scaling = { min = 2, max = 20, rps = { target = 50 }, provision_timeout = 30,
                      scale_up_window = 0.5, actuator = hook } },
            pub = { peers = two, scaling = { min = 2, max = 20, utilization = { capacity = 4, target = 0.75 } } },
        } }
    }
    init_worker_by_lua_block { autoscale.init_worker() }
    upstream step { server 0.0.0.1; balancer_by_lua_block { autoscale.balance("step") } }
    upstream calm { server 0.0.0.1; balancer_by_lua_block { autoscale.balance("calm") } }
    upstream swing { server 0.0.0.1; balancer_by_lua_block { autoscale.balance("swing") } }
    upstream ramp { server 0.0.0.1; balancer_by_lua_block { autoscale.balance("ramp") } }
    upstream plain { server 0.0.0.1; balancer_by_lua_block { autoscale.balance("plain") } }
    upstream pub { server 0.0.0.1; balancer_by_lua_block { autoscale.balance("pub") } }
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_5;
        location = /scaling { content_by_lua_block { autoscale.scaling_handler() } }
        location = /metrics { content_by_lua_block { autoscale.prometheus_handler() } }
        location ~ ^/(\w+) {
            proxy_pass http://$1;
            log_by_lua_block { autoscale.log() }
        }
    }
_EOC_

our $Helpers = <<'_EOC_';
    local t = require "autoscale_test"
    local process = require "autoscale_process"
    local cjson = require "cjson"
    local gw = $TEST_NGINX_RAND_PORT_5
    local dir = ngx.config.prefix() .. "logs/"
    local function now() ngx.update_time() return ngx.now() end

    local receiver
    local function start_receiver(extra)
        receiver = process.start("python3 $TEST_NGINX_REPO/t/lib/scale_receiver.py --port $TEST_NGINX_HOOK_PORT "
                                 .. "--secret 0123456789abcdef-secret " .. (extra or ""), dir .. "receiver.log", 60)
        assert(t.poll(function() return process.listening($TEST_NGINX_HOOK_PORT) end, 5), "receiver did not start")
    end
    -- runs fn with the receiver up, and stops the receiver also when fn fails
    local function with_receiver(extra, fn)
        start_receiver(extra)
        local ok, err = pcall(fn)
        receiver:stop()
        assert(ok, err)
    end
    local function calls(service)
        local status, body = t.get($TEST_NGINX_HOOK_PORT, "/calls")
        assert(status == 200, "receiver: " .. tostring(status))
        local out = {}
        for _, c in ipairs(cjson.decode(body)) do
            if not service or c.decision.service == service then out[#out + 1] = c end
        end
        return out
    end
    local function state(name)
        local _, body = t.get(gw, "/scaling?service=" .. name .. "&decisions=400")
        return cjson.decode(body)
    end
    -- load in the background: `clients` closed-loop clients on /name for `seconds`
    local function background(name, clients, seconds)
        return ngx.thread.spawn(t.load, { port = gw, path = "/" .. name, concurrency = clients, duration = seconds })
    end
_EOC_

run_tests();

__DATA__

=== TEST 1: a step from 1x to 4x load on 2 instances: one signed scale-up call within 2 s, then pending
--- http_config eval: $::HttpConfig
--- config eval
"location = /t { content_by_lua_block { $::Helpers " . <<'_EOC_';
    with_receiver(nil, function()
        local calm = background("step", 4, 3) -- 1x: 4 clients, below the 6 that 2 instances carry
        local r1 = select(2, assert(ngx.thread.wait(calm)))
        local before = #calls("step")
        local step = now()
        local busy = background("step", 16, 3) -- 4x
        t.poll(function() return #calls("step") > 0 end, 4)
        local c = calls("step")
        local r2 = select(2, assert(ngx.thread.wait(busy)))
        local d = c[1] and c[1].decision or {}
        local delay = c[1] and c[1].t - step
        ngx.log(ngx.WARN, "scale-up call ", delay, " s after the step to 4x")
        ngx.say("calls during 1x: ", before, ", client errors: ", r1.errors + r2.errors)
        ngx.say("first call: status ", c[1] and c[1].status, ", verified by python hmac: ", c[1] and c[1].verified,
                ", from ", d.current, " to more than 2: ", (d.desired or 0) > 2)
        ngx.say("within 2 s of the step: ", delay ~= nil and delay <= 2)
        ngx.say(string.format("delay: %.2f s", delay or -1))
        local st = state("step")
        -- in panic (a burst of at least 2x) each tick may step up again: count calls against actions
        ngx.say("pending: ", st.pending, ", actions up >= 1: ", st.actions.up >= 1, ", one call each: ",
                #calls("step") == st.actions.up, ", down ", st.actions.down, ", current ", st.current, " = desired ",
                st.desired == st.current)
        local acted
        for _, r in ipairs(st.decisions) do
            if r.action and not acted then acted = r end
        end
        ngx.say("recorded: ", acted.reason, " ", acted.signal, ", inputs.inflight > 6: ", acted.inputs.inflight > 6,
                ", key matches: ", acted.idempotency_key == d.idempotency_key)
        local _, metrics = t.get(gw, "/metrics")
        ngx.say("metric: ", metrics:match('autoscale_scaling_actions_total{upstream="step",direction="up"} %d+'))
    end)
} }
_EOC_
--- request
GET /t
--- timeout: 20
--- response_body_like
calls during 1x: 0, client errors: 0
first call: status 200, verified by python hmac: true, from 2 to more than 2: true
within 2 s of the step: true
delay: \d\.\d\d s
pending: true, actions up >= 1: true, one call each: true, down 0, current \d+ = desired true
recorded: scale_up utilization, inputs.inflight > 6: true, key matches: true
metric: autoscale_scaling_actions_total\{upstream="step",direction="up"\} [1-4]
--- no_error_log
[error]



=== TEST 2: no scale-down before the stabilization window (3 s) has passed since the last high recommendation
--- http_config eval: $::HttpConfig
--- config eval
"location = /t { content_by_lua_block { $::Helpers " . <<'_EOC_';
    with_receiver(nil, function()
        local r = select(2, assert(ngx.thread.wait(background("calm", 12, 2)))) -- 12 in flight: 4 instances needed
        local stop = now()
        t.poll(function() return #calls("calm") > 0 end, 6)
        local c = calls("calm")
        local after = c[1] and c[1].t - stop
        ngx.log(ngx.WARN, "first scale-down ", after, " s after the load stopped (window 3 s)")
        ngx.say("client errors: ", r.errors, ", first call: ", c[1] and c[1].decision.current, " -> ",
                c[1] and c[1].decision.desired)
        local st = state("calm")
        local last_high, first_down = 0, nil
        for _, d in ipairs(st.decisions) do
            if d.recommendation >= 4 and not first_down then last_high = d.time end
            if d.action and d.desired < d.current and not first_down then first_down = d.time end
        end
        ngx.say("first scale-down >= 3 s after the last recommendation of 4: ", first_down ~= nil and first_down - last_high >= 2.999,
                ", within 4.5 s of the load's end: ", after ~= nil and after <= 4.5)
        local early = 0
        for _, d in ipairs(st.decisions) do
            if d.time < last_high + 2.999 and d.action then early = early + 1 end
        end
        ngx.say("actions before the window ended: ", early, ", stabilizing decisions recorded: ",
                (function() for _, d in ipairs(st.decisions) do if d.reason == "stabilizing" then return true end end return false end)())
    end)
} }
_EOC_
--- request
GET /t
--- timeout: 20
--- response_body
client errors: 0, first call: 4 -> 2
first scale-down >= 3 s after the last recommendation of 4: true, within 4.5 s of the load's end: true
actions before the window ended: 0, stabilizing decisions recorded: true
--- no_error_log
[error]



=== TEST 3: a load swinging around the target (4 and 8 clients for 6 on target, each 1 s, 8 s) does not flap
--- http_config eval: $::HttpConfig
--- config eval
"location = /t { content_by_lua_block { $::Helpers " . <<'_EOC_';
    with_receiver(nil, function()
        local errors = 0
        for i = 1, 8 do
            errors = errors + t.load { port = gw, path = "/swing", concurrency = i % 2 == 0 and 4 or 8, duration = 1 }.errors
        end
        local st = state("swing")
        local flips, last = 0, 0
        for _, c in ipairs(calls("swing")) do
            local dir = c.decision.desired > c.decision.current and 1 or -1
            if last ~= 0 and dir ~= last then flips = flips + 1 end
            last = dir
        end
        local above = 0
        for _, d in ipairs(st.decisions) do
            if d.inputs.inflight > 6 * 1.1 then above = above + 1 end
        end
        ngx.say("client errors: ", errors, ", ticks above the band: ", above > 3)
        ngx.say("actions up <= 1: ", st.actions.up <= 1, ", down: ", st.actions.down, ", direction changes: ", flips)
    end)
} }
_EOC_
--- request
GET /t
--- timeout: 30
--- response_body
client errors: 0, ticks above the band: true
actions up <= 1: true, down: 0, direction changes: 0
--- no_error_log
[error]



=== TEST 4: the forecast (lead time 3 s) asks for capacity before a steady ramp crosses the target; without it, after
--- http_config eval: $::HttpConfig
--- config eval
"location = /t { content_by_lua_block { $::Helpers " . <<'_EOC_';
    with_receiver(nil, function()
        -- open loop: 20 + 10 t requests/s to each of /ramp and /plain for 12 s; the target is 2 x 50 = 100 requests/s,
        -- crossed at t = 8 s
        local t0, credit, sent, outstanding, errors = now(), 0, 0, 0, 0
        local function one(path)
            local status = t.get(gw, path .. "?ms=5")
            if status ~= 200 then errors = errors + 1 end
            outstanding = outstanding - 1
        end
        local last = t0
        while now() - t0 < 12 do
            local tn = now()
            credit = credit + (20 + 10 * (tn - t0)) * (tn - last)
            last = tn
            while credit >= 1 do
                credit = credit - 1
                outstanding = outstanding + 2
                sent = sent + 1
                ngx.thread.spawn(one, "/ramp")
                ngx.thread.spawn(one, "/plain")
            end
            ngx.sleep(0.005)
        end
        t.poll(function() return outstanding == 0 end, 5)
        local function first(name)
            local c = calls(name)[1]
            return c and c.t - t0, c and c.decision
        end
        local t_ramp, d_ramp = first("ramp")
        local t_plain = first("plain")
        ngx.log(ngx.WARN, "first scale-up: with forecast at ", t_ramp, " s (offered ", 20 + 10 * (t_ramp or 0),
                " rps), without at ", t_plain, " s; the target is crossed at 8 s")
        ngx.say("requests ", sent * 2, ", errors ", errors)
        ngx.say("with forecast: before the ramp crosses the target: ", t_ramp ~= nil and t_ramp < 8, ", to ",
                d_ramp and d_ramp.desired)
        ngx.say("without: after it: ", t_plain ~= nil and t_plain > 8, ", later by over 1 s: ",
                t_plain ~= nil and t_ramp ~= nil and t_plain - t_ramp > 1)
        local fc
        for _, d in ipairs(state("ramp").decisions) do
            if d.action then fc = d break end
        end
        ngx.say("decision records the forecast above the rate: ", fc.forecast_rps > fc.inputs.rps)
    end)
} }
_EOC_
--- request
GET /t
--- timeout: 30
--- response_body_like
requests \d+, errors 0
with forecast: before the ramp crosses the target: true, to 3
without: after it: true, later by over 1 s: true
decision records the forecast above the rate: true
--- no_error_log
[error]



=== TEST 5: a failing receiver: retries after 0.2 s and 0.4 s (less up to 20 % jitter), one idempotency key, then success
--- http_config eval: $::HttpConfig
--- config eval
"location = /t { content_by_lua_block { $::Helpers " . <<'_EOC_';
    with_receiver("--fail 2", function()
        -- "calm" (4 idle instances, 3 s window) scales down 3 s after the start: its first call fails twice
        local c
        t.poll(function()
            local all = calls("calm")
            c = {}
            for _, x in ipairs(all) do -- the calls of the first decision (a second one may come in between)
                if x.decision.idempotency_key == all[1].decision.idempotency_key then c[#c + 1] = x end
            end
            return #c >= 3
        end, 8)
        ngx.sleep(1) -- a fourth call with that key would come within 0.8 s
        local all = calls("calm")
        c = {}
        for _, x in ipairs(all) do
            if x.decision.idempotency_key == all[1].decision.idempotency_key then c[#c + 1] = x end
        end
        local g1, g2 = c[2].t - c[1].t, c[3].t - c[2].t
        ngx.log(ngx.WARN, string.format("retry gaps %.3f s and %.3f s", g1, g2))
        ngx.say("statuses: ", c[1].status, " ", c[2].status, " ", c[3].status, ", all verified: ",
                c[1].verified and c[2].verified and c[3].verified)
        ngx.say("one key, same body: ", c[1].decision.idempotency_key == c[3].decision.idempotency_key
                and c[1].body == c[2].body and c[2].body == c[3].body)
        ngx.say("gap 1 in [0.16, 0.35]: ", g1 >= 0.16 and g1 <= 0.35, ", gap 2 in [0.32, 0.55]: ", g2 >= 0.32 and g2 <= 0.55)
        ngx.say("calls with that key: ", #c, ", failures counted: ", state("calm").actuator_failures)
    end)
} }
_EOC_
--- request
GET /t
--- timeout: 20
--- response_body
statuses: 500 500 200, all verified: true
one key, same body: true
gap 1 in [0.16, 0.35]: true, gap 2 in [0.32, 0.55]: true
calls with that key: 3, failures counted: 0
--- no_error_log
[error]



=== TEST 6: bad scaling options stop nginx with the field path and the reason
--- http_config
    lua_shared_dict autoscale_scaling 1m;
    init_by_lua_block {
        local config = require "resty.autoscale.config"
        local peers = { "127.0.0.1:1" }
        config_errors = {}
        for _, case in ipairs {
            { utilization = { target = 0.7 } },
            { rps = { target = 10 }, min = 5, max = 2 },
            {},
            { rps = { target = 10 }, latency = { target = 0.3, percentile = "p95" } },
            { rps = { target = 10 }, actuator = { type = "webhook", url = "ftp://x", secret = "0123456789abcdef" } },
            { rps = { target = 10 }, actuator = { type = "webhook", url = "http://127.0.0.1:1/", secret = "short" } },
            { rps = { target = 10 }, actuator = { type = "webhook", url = "http://127.0.0.1:1/", secret_env = "NO_SUCH_VAR_X" } },
            { rps = { target = 10 }, actuator = { type = "kubernetes", api = "http://127.0.0.1:1", name = "api" } },
            { rps = { target = 10 }, actuator = { type = "kubernetes", api = "https://127.0.0.1:1", name = "Bad_Name" } },
            { rps = { target = 10 }, actuator = { type = "webhook", url = "http://127.0.0.1:1/", secret = "0123456789abcdef", retries = -1 } },
            { latency = { target = 0.3 }, forecast = { lead_time = 5 } },
            { rps = { target = 10 }, cooldown = "5" },
            { rps = { target = 10 }, bogus = 1 },
        } do
            local _, err = config.validate { upstreams = { api = { peers = peers, scaling = case } } }
            config_errors[#config_errors + 1] = "scaling: " .. tostring(err)
        end
        for _, c in ipairs {
            { redis = { port = 0 } }, { gateway_id = "a b", redis = {} }, { actuate_without_redis = "yes", redis = {} }, {},
        } do
            local _, err = config.validate { upstreams = { api = { peers = peers } }, cluster = c }
            config_errors[#config_errors + 1] = "cluster: " .. tostring(err)
        end
    }
--- config
    location = /t { content_by_lua_block { ngx.say(table.concat(config_errors, "\n")) } }
--- request
GET /t
--- response_body
scaling: upstreams.api.scaling.utilization.capacity: is required
scaling: upstreams.api.scaling.min: must not be above max (5 > 2)
scaling: upstreams.api.scaling: needs at least one signal: utilization, rps, latency, error_rate, external or reported
scaling: upstreams.api.scaling.latency.percentile: must be "p50", "p90", "p99" or "p999" (got "p95")
scaling: upstreams.api.scaling.actuator.url: must start with http:// or https:// (got "ftp://x")
scaling: upstreams.api.scaling.actuator: the secret must have at least 16 bytes (got 5)
scaling: upstreams.api.scaling.actuator.secret_env: environment variable "NO_SUCH_VAR_X" is not set
scaling: upstreams.api.scaling.actuator.api: must be the API server's https:// URL (got "http://127.0.0.1:1")
scaling: upstreams.api.scaling.actuator.name: must be a Kubernetes object name (got "Bad_Name")
scaling: upstreams.api.scaling.actuator.retries: must be between 0 and 20 (got -1)
scaling: upstreams.api.scaling.forecast: forecasts the request rate: needs the rps signal
scaling: upstreams.api.scaling.cooldown: must be a number (got string "5")
scaling: upstreams.api.scaling.bogus: unknown option (valid: actuator, cooldown, decisions, error_rate, external, forecast, hold, idle_window, interval, latency, max, max_scale_down_rate, max_scale_up_rate, max_step_up, min, panic_threshold, panic_window, provision_timeout, reported, rps, scale_down_window, scale_up_window, tolerance, utilization)
cluster: cluster.redis.port: must be between 1 and 65535 (got 0)
cluster: cluster.gateway_id: must be 1-100 of letters, digits, '_', '.', '-', ':' (got "a b")
cluster: cluster.actuate_without_redis: must be true or false (got "yes")
cluster: cluster.redis: must be a table { host =, port =, password =, db =, timeout = } (got nil)



=== TEST 7: publish-only: the desired count as JSON for KEDA's metrics-api and as Prometheus gauges, no call made
--- http_config eval: $::HttpConfig
--- config eval
"location = /t { content_by_lua_block { $::Helpers " . <<'_EOC_';
    with_receiver(nil, function()
        local r = t.load { port = gw, path = "/pub", concurrency = 16, duration = 1.5 }
        local one = state("pub")
        local _, all = t.get(gw, "/scaling")
        all = cjson.decode(all)
        local status = t.get(gw, "/scaling?service=nope")
        local _, metrics = t.get(gw, "/metrics")
        local desired = tonumber(metrics:match('autoscale_scaling_desired_instances{upstream="pub"} (%d+)'))
        local path = dir .. "scrape.prom"
        process.write(path, metrics)
        local promtool = io.popen("command -v promtool >/dev/null && promtool check metrics < " .. path .. " 2>&1; echo rc=$?")
        local out = promtool:read("*a")
        promtool:close()
        ngx.say("client errors: ", r.errors, ", actuator: ", one.actuator, ", desired > 2: ", one.desired > 2,
                ", pending: ", one.pending, ", calls: ", #calls("pub"))
        ngx.say("KEDA valueLocation services.pub.desired: ", all.services.pub.desired == one.desired,
                ", unknown service: ", status)
        ngx.say("gauge = desired: ", desired == one.desired, ", promtool: ", out:match("rc=(%d+)"))
        ngx.say("ready gauge: ", metrics:match('autoscale_scaling_ready_instances{upstream="pub"} (%d+)'),
                ", leader: ", metrics:match('autoscale_scaling_leader{upstream="pub"} (%d+)'))
    end)
} }
_EOC_
--- request
GET /t
--- timeout: 20
--- response_body
client errors: 0, actuator: publish, desired > 2: true, pending: true, calls: 0
KEDA valueLocation services.pub.desired: true, unknown service: 404
gauge = desired: true, promtool: 0
ready gauge: 2, leader: 1
--- no_error_log
[error]



=== TEST 8: a bad scaling option stops nginx at start, naming the field
--- http_config
    lua_shared_dict autoscale_scaling 1m;
    init_by_lua_block {
        require("resty.autoscale").configure { upstreams = { api = { peers = { "127.0.0.1:1" },
            scaling = { utilization = { capacity = 4 }, scale_down_window = -1 } } } }
    }
--- config
    location = /t { return 200; }
--- must_die
--- error_log
resty.autoscale: upstreams.api.scaling.scale_down_window: must be between 0 and 3600 (got -1)



=== TEST 9: scaling without its shared dict stops nginx at start and says what to add
--- http_config
    init_by_lua_block {
        require("resty.autoscale").configure { upstreams = { api = { peers = { "127.0.0.1:1" },
            scaling = { rps = { target = 100 } } } } }
    }
--- config
    location = /t { return 200; }
--- must_die
--- error_log
resty.autoscale: scaling needs `lua_shared_dict autoscale_scaling 1m;` in the http block
