# vim:set ft= ts=4 sw=4 et:
# Scaling decisions in a real nginx, actions received by a strict webhook receiver (t/lib/scale_receiver.py, which
# checks the signature with Python's hmac): a step from 1x to 4x load on a service held by 2 instances is acted on
# within 2 s; no scale-down before the stabilization window ends; a load swinging around the target does not flap;
# the forecast asks for capacity before a steady ramp crosses the target; failed calls are retried with exponential
# backoff (timings asserted) under one idempotency key; bad options stop nginx with the field path.

use lib 't';
use Autoscale;

workers(1);
worker_connections(1024);
master_on();

# Backends on ports 1-4 (50 ms each); the gateway on port 5; the receiver on 26401 (t/lib/scale_receiver.py).
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
        local hook = { type = "webhook", url = "http://127.0.0.1:26401/scale", secret = "0123456789abcdef-secret",
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
        } }
    }
    init_worker_by_lua_block { autoscale.init_worker() }
    upstream step { server 0.0.0.1; balancer_by_lua_block { autoscale.balance("step") } }
    upstream calm { server 0.0.0.1; balancer_by_lua_block { autoscale.balance("calm") } }
    upstream swing { server 0.0.0.1; balancer_by_lua_block { autoscale.balance("swing") } }
    upstream ramp { server 0.0.0.1; balancer_by_lua_block { autoscale.balance("ramp") } }
    upstream plain { server 0.0.0.1; balancer_by_lua_block { autoscale.balance("plain") } }
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
        receiver = process.start("python3 $TEST_NGINX_REPO/t/lib/scale_receiver.py --port 26401 "
                                 .. "--secret 0123456789abcdef-secret " .. (extra or ""), dir .. "receiver.log", 60)
        assert(t.poll(function() return process.listening(26401) end, 5), "receiver did not start")
    end
    local function calls(service)
        local status, body = t.get(26401, "/calls")
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
    start_receiver()
    local ok, err = pcall(function()
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
        ngx.say("pending: ", st.pending, ", actions up ", st.actions.up, ", down ", st.actions.down,
                ", current ", st.current, " = desired ", st.desired == st.current)
        local acted
        for _, r in ipairs(st.decisions) do
            if r.action then acted = r end
        end
        ngx.say("recorded: ", acted.reason, " ", acted.signal, ", inputs.inflight > 6: ", acted.inputs.inflight > 6,
                ", key matches: ", acted.idempotency_key == d.idempotency_key)
        local _, metrics = t.get(gw, "/metrics")
        ngx.say("metric: ", metrics:match('autoscale_scaling_actions_total{upstream="step",direction="up"} %d+'))
    end)
    receiver:stop()
    assert(ok, err)
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
pending: true, actions up 1, down 0, current \d+ = desired true
recorded: scale_up utilization, inputs.inflight > 6: true, key matches: true
metric: autoscale_scaling_actions_total\{upstream="step",direction="up"\} 1
--- no_error_log
[error]
