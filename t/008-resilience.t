# vim:set ft= ts=4 sw=4 et:
# Outlier ejection with half-open recovery, success-rate ejection, panic mode, the fallback response and active
# health checks, against real backends whose behaviour is changed at run time. Failure phases default to 8 s;
# AUTOSCALE_T_FAIL_SECONDS=20 runs them for 20 s.

use lib 't';
use Autoscale;

workers(2);
master_on();

$ENV{AUTOSCALE_T_FAIL_SECONDS} ||= 8;

# Backends on five ports; each port's behaviour comes from the shared dict: "ok" (default), a status code,
# "hang" (never answers), "close" (closes the connection without an answer). Health checks are counted.
our $Backends = <<'_EOC_';
    lua_shared_dict ctl 1m;
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1;
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_2;
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_3;
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_4;
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_5;
        location / {
            content_by_lua_block {
                local port, ctl = ngx.var.server_port, ngx.shared.ctl
                if ngx.var.uri == "/health" then
                    ctl:incr("checks:" .. port, 1, 0)
                    local pid = (ngx.var.http_user_agent or ""):match("worker (%d+)")
                    ctl:set("checker:" .. tostring(pid), true)
                    ngx.exit(ctl:get("health:" .. port) or 200)
                end
                local mode = ctl:get("mode:" .. port) or "ok"
                local rate = ctl:get("rate:" .. port)
                if rate and math.random() >= rate then mode = "ok" end
                if mode == "hang" then ngx.sleep(5) return end
                if mode == "close" then return ngx.exit(444) end
                if mode ~= "ok" then return ngx.exit(tonumber(mode)) end
                ngx.sleep(0.002)
                ngx.say(port)
            }
        }
    }
_EOC_

sub gateway { $::Backends . gateway_upstream(@_) }

our $Location = <<'_EOC_';
    location /p {
        proxy_pass http://backend;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_next_upstream error timeout http_500 http_502 http_503 http_504;
        proxy_connect_timeout 1s;
        proxy_read_timeout 500ms;
        error_page 502 504 = @fallback;
        log_by_lua_block { autoscale.log() }
    }
    location @fallback { content_by_lua_block { autoscale.fallback("backend") } }
_EOC_

our $Driver = <<'_EOC_';
    local t = require "autoscale_test"
    local port = ngx.var.server_port
    local fail_s = tonumber("$TEST_NGINX_AUTOSCALE_T_FAIL_SECONDS") or 8
    local function peer(p) return t.peer(autoscale.status("backend"), "127.0.0.1:" .. p) end
    local function events(kind, addr)
        local out = {}
        for _, e in ipairs(autoscale.events(1000)) do
            if e.event == kind and (not addr or e.peer == addr) then out[#out + 1] = e end
        end
        return out
    end
    -- healthy 1 s, `bad` misbehaves for fail_s, then recovers; returns the client results of the three phases
    local function scenario(bad, mode)
        local a = t.load { port = port, path = "/p", concurrency = 8, duration = 1 }
        ngx.shared.ctl:set("mode:" .. bad, mode)
        local b = t.load { port = port, path = "/p", concurrency = 8, duration = fail_s }
        ngx.shared.ctl:delete("mode:" .. bad)
        -- half-open peers are probed by client requests: keep a light load until it is back
        local healthy = t.poll(function()
            t.load { port = port, path = "/p", concurrency = 2, duration = 0.2 }
            return peer(bad).state == "healthy"
        end, 30)
        local c = t.load { port = port, path = "/p", concurrency = 8, duration = 3 }
        return a, b, c, healthy
    end
    local function report(name, a, b, c, bad)
        local total = a.total + b.total + c.total
        local errors = a.errors + b.errors + c.errors
        local times = {}
        for _, e in ipairs(events("ejected", "127.0.0.1:" .. bad)) do times[#times + 1] = e.ejection_time end
        ngx.log(ngx.NOTICE, string.format("%s: %d client requests, %d non-2xx (%.3f %%), ejection times %s, share after recovery %.3f",
                name, total, errors, errors * 100 / total, table.concat(times, " "), t.share(c, bad .. "\n")))
        return errors / total, times
    end
_EOC_

sub driver {
    my ($body) = @_;
    return $::Location . "location = /t { content_by_lua_block { $::Driver $body } }";
}

env_to_nginx("AUTOSCALE_T_FAIL_SECONDS");
$ENV{TEST_NGINX_AUTOSCALE_T_FAIL_SECONDS} = $ENV{AUTOSCALE_T_FAIL_SECONDS};

our $Three = '"127.0.0.1:$TEST_NGINX_RAND_PORT_1", "127.0.0.1:$TEST_NGINX_RAND_PORT_2", "127.0.0.1:$TEST_NGINX_RAND_PORT_3"';
our $Fast = 'slow_start = 1, outlier = { base_ejection_time = 2, max_ejection_percent = 34, interval = 1 }';

run_tests();

__DATA__

=== TEST 1: a peer answering 500 is ejected, clients see <= 0.1 % errors, it is re-ejected for longer while still failing and readmitted through half-open
--- http_config eval: ::gateway($::Three, $::Fast)
--- config eval
::driver(<<'_EOC_');
    local bad = "$TEST_NGINX_RAND_PORT_2"
    local a, b, c, healthy = scenario(bad, "500")
    local rate, times = report("500s", a, b, c, bad)
    ngx.say("error rate <= 0.1 %: ", rate <= 0.001)
    ngx.say("ejected by consecutive 5xx: ", #events("ejected", "127.0.0.1:" .. bad) > 0 and events("ejected", "127.0.0.1:" .. bad)[1].reason == "consecutive_5xx")
    local longer = #times >= 2
    for i = 2, #times do longer = longer and times[i] > times[i - 1] end
    ngx.say("re-ejected after failed probes, each time longer: ", longer)
    ngx.say("readmitted through half-open: ", healthy and #events("half_open", "127.0.0.1:" .. bad) > 0)
    ngx.say("gets its share again: ", t.share(c, bad .. "\n") > 0.15)
_EOC_
--- request
GET /t
--- timeout: 60
--- response_body
error rate <= 0.1 %: true
ejected by consecutive 5xx: true
re-ejected after failed probes, each time longer: true
readmitted through half-open: true
gets its share again: true
--- error_log eval
qr/resty.autoscale event: \{"seq":\d+,"time":[\d.]+,"event":"ejected","reason":"consecutive_5xx","upstream":"backend","peer":"127.0.0.1:\d+","ejection_time":2,"times_ejected":1,"consecutive":5/



=== TEST 2: a peer refusing connections: ejected by gateway failures, clients see <= 0.1 % errors, then readmitted
--- http_config eval: ::gateway('"127.0.0.1:$TEST_NGINX_RAND_PORT_1", "127.0.0.1:$TEST_NGINX_RAND_PORT_3", "127.0.0.1:$TEST_NGINX_RAND_PORT_5"', $::Fast)
--- config eval
::driver(<<'_EOC_');
    local bad = "$TEST_NGINX_RAND_PORT_5"
    local a, b, c, healthy = scenario(bad, "close")
    local rate = report("connection closed", a, b, c, bad)
    local e = events("ejected", "127.0.0.1:" .. bad)[1]
    ngx.say("error rate <= 0.1 %: ", rate <= 0.001)
    ngx.say("ejected: ", e ~= nil and (e.reason == "consecutive_gateway_failures" or e.reason == "consecutive_5xx"))
    ngx.say("readmitted: ", healthy)
_EOC_
--- request
GET /t
--- timeout: 60
--- response_body
error rate <= 0.1 %: true
ejected: true
readmitted: true



=== TEST 3: a peer that accepts but never answers: ejected by consecutive timeouts, clients see <= 0.1 % errors
--- http_config eval: ::gateway($::Three, $::Fast)
--- config eval
::driver(<<'_EOC_');
    local bad = "$TEST_NGINX_RAND_PORT_3"
    local a, b, c, healthy = scenario(bad, "hang")
    local rate = report("hang", a, b, c, bad)
    local e = events("ejected", "127.0.0.1:" .. bad)[1]
    ngx.say("error rate <= 0.1 %: ", rate <= 0.001)
    ngx.say("ejected by timeouts: ", e ~= nil and e.reason == "consecutive_timeouts")
    ngx.say("readmitted: ", healthy)
_EOC_
--- request
GET /t
--- timeout: 60
--- response_body
error rate <= 0.1 %: true
ejected by timeouts: true
readmitted: true



=== TEST 4: success-rate ejection takes out the peer failing 30 % among five, and nobody when all fail alike
--- http_config eval
::gateway('"127.0.0.1:$TEST_NGINX_RAND_PORT_1", "127.0.0.1:$TEST_NGINX_RAND_PORT_2", "127.0.0.1:$TEST_NGINX_RAND_PORT_3", "127.0.0.1:$TEST_NGINX_RAND_PORT_4", "127.0.0.1:$TEST_NGINX_RAND_PORT_5"',
  'balancer = "round_robin", retries = 0, outlier = { consecutive_5xx = 0, consecutive_gateway_failures = 0, interval = 1, success_rate_request_volume = 50, max_ejection_percent = 20 }')
--- config eval
::driver(<<'_EOC_');
    local ctl = ngx.shared.ctl
    -- all fail alike (30 %): nobody is an outlier
    for i = 1, 5 do
        ctl:set("mode:" .. ({ $TEST_NGINX_RAND_PORT_1, $TEST_NGINX_RAND_PORT_2, $TEST_NGINX_RAND_PORT_3, $TEST_NGINX_RAND_PORT_4, $TEST_NGINX_RAND_PORT_5 })[i], "500")
        ctl:set("rate:" .. ({ $TEST_NGINX_RAND_PORT_1, $TEST_NGINX_RAND_PORT_2, $TEST_NGINX_RAND_PORT_3, $TEST_NGINX_RAND_PORT_4, $TEST_NGINX_RAND_PORT_5 })[i], 0.3)
    end
    t.load { port = port, path = "/p", concurrency = 8, duration = 3 }
    ngx.say("all alike, ejected: ", #events("ejected"))
    -- only one fails 30 %, the others under 1 %
    for _, p in ipairs { $TEST_NGINX_RAND_PORT_1, $TEST_NGINX_RAND_PORT_2, $TEST_NGINX_RAND_PORT_3, $TEST_NGINX_RAND_PORT_5 } do
        ctl:set("rate:" .. p, 0.005)
    end
    local ok = t.poll(function()
        t.load { port = port, path = "/p", concurrency = 8, duration = 0.5 }
        return #events("ejected") > 0
    end, 15)
    local e = events("ejected")[1]
    ngx.log(ngx.NOTICE, "success-rate ejection: ", require("cjson").encode(e))
    ngx.say("one outlier ejected: ", ok, " ", #events("ejected"), " ", e.peer == "127.0.0.1:$TEST_NGINX_RAND_PORT_4", " ", e.reason)
_EOC_
--- request
GET /t
--- timeout: 60
--- response_body
all alike, ejected: 0
one outlier ejected: true 1 true success_rate



=== TEST 5: with 3 of 4 peers down panic mode spreads load over all (retries = peers - 1 hides it from clients); with all down the fallback answers
--- http_config eval
::gateway('"127.0.0.1:$TEST_NGINX_RAND_PORT_1", "127.0.0.1:$TEST_NGINX_RAND_PORT_6", "127.0.0.1:$TEST_NGINX_RAND_PORT_7", "127.0.0.1:$TEST_NGINX_RAND_PORT_8"',
  'retries = 3, outlier = { max_ejection_percent = 100 }, fallback = { status = 503, retry_after = 7, headers = { ["X-Fallback"] = "yes" } }')
--- config eval
::driver(<<'_EOC_');
    -- ports 6-8 have no listener: their peers are ejected one by one until panic
    ngx.update_time()
    local start = ngx.now()
    t.poll(function()
        t.load { port = port, path = "/p", concurrency = 4, duration = 0.2 }
        return autoscale.status("backend").panic
    end, 10)
    ngx.update_time()
    ngx.log(ngx.NOTICE, string.format("panic reached after %.2f s of load", ngx.now() - start))
    local st = autoscale.status("backend")
    ngx.say("panic: ", st.panic, ", healthy ", st.healthy, " of ", #st.peers)
    local before = {}
    for _, p in ipairs(st.peers) do before[p.addr] = p.totals.requests end
    local b = t.load { port = port, path = "/p", concurrency = 4, duration = 1 }
    local spread = 0
    for _, p in ipairs(autoscale.status("backend").peers) do
        if p.totals.requests > before[p.addr] then spread = spread + 1 end
    end
    ngx.say("peers tried during panic: ", spread, ", client errors ", b.errors)
    -- the last one goes down too: the fallback answers
    ngx.shared.ctl:set("mode:$TEST_NGINX_RAND_PORT_1", "close")
    local status, body, headers = t.get(port, "/p")
    ngx.say(status, " ", headers["retry-after"], " ", headers["x-fallback"], " ", (body:gsub("\n$", "")))
    -- events reach the error log from a timer: wait (bounded) until the fallback event is there, since the real
    -- Test::Nginx reads the log as soon as the response is in
    t.poll(function()
        local f = io.open(ngx.config.prefix() .. "logs/error.log")
        local text = f and f:read("*a") or ""
        if f then f:close() end
        return text:find('"event":"fallback"', 1, true) ~= nil
    end, 5)
_EOC_
--- request
GET /t
--- timeout: 60
--- response_body
panic: true, healthy 1 of 4
peers tried during panic: 4, client errors 0
503 7 yes {"error":"service unavailable","upstream":"backend","retry_after":7}
--- grep_error_log eval: qr/"event":"fallback","upstream":"backend","status":503/
--- grep_error_log_out
"event":"fallback","upstream":"backend","status":503



=== TEST 6: active health checks bring back a recovered peer with no client traffic, and only one worker probes
--- http_config eval: ::gateway($::Three, 'outlier = { base_ejection_time = 300, max_ejection_percent = 34 }, healthcheck = { path = "/health", interval = 0.2, timeout = 0.1, healthy = 2, unhealthy = 2 }')
--- config eval
::driver(<<'_EOC_');
    local bad = "$TEST_NGINX_RAND_PORT_2"
    local ctl = ngx.shared.ctl
    ctl:set("mode:" .. bad, "500")
    ctl:set("health:" .. bad, 503)
    t.poll(function()
        t.load { port = port, path = "/p", concurrency = 4, requests = 20 }
        return peer(bad).state == "ejected"
    end, 10)
    ngx.say("ejected: ", peer(bad).state)
    -- no client traffic from here on: the backend recovers, checks pass, the peer is back
    ctl:delete("mode:" .. bad)
    ctl:delete("health:" .. bad)
    local before = peer(bad).totals.requests
    local back = t.poll(function() return peer(bad).state == "healthy" end, 5)
    local e = events("healthy", "127.0.0.1:" .. bad)[1]
    ngx.say("back by active checks: ", back, " ", e and e.reason, ", client requests meanwhile: ", peer(bad).totals.requests - before)
    local checkers = 0
    for _, k in ipairs(ctl:get_keys(0)) do
        if k:find("^checker:%d") then checkers = checkers + 1 end
    end
    ngx.say("workers probing: ", checkers, ", checks so far: ", (ctl:get("checks:" .. bad) or 0) > 0)
_EOC_
--- request
GET /t
--- timeout: 30
--- response_body
ejected: ejected
back by active checks: true active_check_passed, client requests meanwhile: 0
workers probing: 1, checks so far: true
