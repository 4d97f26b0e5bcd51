# vim:set ft= ts=4 sw=4 et:
# Backend-reported load: a backend reporting its utilization in ORCA's endpoint-load-metrics header gets traffic in
# proportion to its capacity; a backend answering 503 with Retry-After backs off without being ejected; a malformed
# report is ignored and counted.

use lib 't';
use Autoscale;

workers(2);
master_on();
worker_connections(1024); # 24 clients: client, gateway and backend sides of each share the two workers

# Four backends; each serves `cap:<port>` requests at once in 5 ms (`base`) and shares its time beyond that (processor
# sharing: n in flight take 5 ms x n / cap), and reports its utilization (in flight / cap) when `report` is set.
# `/agent` answers `agent:<port>` (default `up`). It reports its queue too (in flight beyond cap) as named_metrics.queue. `shed:<port>` makes it answer half its requests 503 with Retry-After: 2; `garbage` sends a malformed report.
our $Backends = <<'_EOC_';
    lua_shared_dict ctl 1m;
    lua_shared_dict autoscale_scaling 1m;
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1;
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_2;
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_3;
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_4;
        keepalive_requests 1000000;
        location = /agent { content_by_lua_block { ngx.say(ngx.shared.ctl:get("agent:" .. ngx.var.server_port) or "up") } }
        location / {
            content_by_lua_block {
                local port = ngx.var.server_port
                local ctl = ngx.shared.ctl
                local cap = ctl:get("cap:" .. port) or 8
                local n = ctl:incr("if:" .. port, 1, 0)
                ngx.sleep((ctl:get("base") or 0.005) * math.max(1, n / cap))
                -- the load it reports is what is left in flight as this request leaves
                local now_n = ctl:incr("if:" .. port, -1) or 0
                if ctl:get("garbage") then
                    ngx.header["endpoint-load-metrics"] = "TEXT cpu_utilization=lots"
                elseif ctl:get("report") then
                    ngx.header["endpoint-load-metrics"] = string.format("TEXT cpu_utilization=%.3f, named_metrics.queue=%d",
                                                                        now_n / cap, math.max(0, now_n - cap))
                end
                if ctl:get("shed:" .. port) and math.random() < 0.5 then
                    ngx.status = 503
                    ngx.header["Retry-After"] = "2"
                end
                ngx.say(port)
            }
        }
    }
_EOC_

our $Gateway = <<'_EOC_';
    location /p {
        proxy_pass http://backend;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        log_by_lua_block { autoscale.log() }
    }
    location = /metrics { content_by_lua_block { autoscale.prometheus_handler() } }
_EOC_

our $Four = '"127.0.0.1:$TEST_NGINX_RAND_PORT_1", "127.0.0.1:$TEST_NGINX_RAND_PORT_2", "127.0.0.1:$TEST_NGINX_RAND_PORT_3", "127.0.0.1:$TEST_NGINX_RAND_PORT_4"';

# The load of TESTs 1 and 2: capacities 4/8/8/8 at 50 ms, 24 clients back to back (about 70 % of the capacity) for
# 1.5 s (settling, after the 0.5 s blackout), then 3 s measured; the weak backend's share of the measured part.
our $Heterogeneous = <<'_EOC_';
            local t = require "autoscale_test"
            local ctl = ngx.shared.ctl
            local weak = "$TEST_NGINX_RAND_PORT_1"
            ctl:set("cap:" .. weak, 4)
            ctl:set("base", 0.05) -- 50 ms: the backends, not this machine's CPU, are the bottleneck
            ctl:set("report", ngx.var.arg_report == "1")
            local port = ngx.var.server_port
            t.load { port = port, path = "/p", concurrency = 24, duration = 1.5 }
            local r = t.load { port = port, path = "/p", concurrency = 24, duration = 3 }
            local share = t.share(r, weak .. "\n")
            ngx.log(ngx.NOTICE, string.format("weak backend share %.4f (capacity share 0.1429) of %d requests, reports %s",
                    share, r.total, ngx.var.arg_report))
_EOC_

sub http_config { $::Backends . gateway_upstream(@_) }

run_tests();

__DATA__

=== TEST 1: reports on: the backend with half the capacity gets its capacity share (4/28) within +-2 points, within 5 s
--- http_config eval: ::http_config($::Four, "slow_start = 0, reports = { blackout = 0.5 }")
--- config eval
$::Gateway . <<'_EOC_' . $::Heterogeneous . <<'_EOC_';
    location = /t {
        content_by_lua_block {
_EOC_
            ngx.say("within 2 points ", math.abs(share - 4 / 28) <= 0.02)
            local st = autoscale.status("backend")
            local p = t.peer(st, "127.0.0.1:" .. weak)
            ngx.say("reported ", p.reported.used, " ", p.reported.reports > 0, " ", p.reported.malformed)
            ngx.say("errors ", r.errors)
        }
    }
_EOC_
--- request
GET /t?report=1
--- timeout: 20
--- response_body
within 2 points true
reported true true 0
errors 0
--- no_error_log
[error]

=== TEST 2: reports off, same backends and load: latency alone gives the weak backend clearly more than its capacity share
--- http_config eval: ::http_config($::Four, "slow_start = 0")
--- config eval
$::Gateway . <<'_EOC_' . $::Heterogeneous . <<'_EOC_';
    location = /t {
        content_by_lua_block {
_EOC_
            ngx.say("above by more than 2 points ", share > 4 / 28 + 0.02)
            ngx.say("no report ", t.peer(autoscale.status("backend"), "127.0.0.1:" .. weak).reported == nil)
        }
    }
_EOC_
--- request
GET /t?report=0
--- timeout: 20
--- response_body
above by more than 2 points true
no report true
--- no_error_log
[error]

=== TEST 3: 503 with Retry-After: 2 to half its requests: share < 5 % within 1 s, not ejected, share back within 1 s after
--- http_config eval: ::http_config('"127.0.0.1:$TEST_NGINX_RAND_PORT_1", "127.0.0.1:$TEST_NGINX_RAND_PORT_2", "127.0.0.1:$TEST_NGINX_RAND_PORT_3"', "slow_start = 0, reports = { header = false }")
--- config eval
$::Gateway . <<'_EOC_';
    location = /t {
        content_by_lua_block {
            local t = require "autoscale_test"
            local ctl = ngx.shared.ctl
            local shed = "$TEST_NGINX_RAND_PORT_3"
            local port = ngx.var.server_port
            local function load(d)
                return t.load { port = port, path = "/p", concurrency = 8, duration = d,
                                key = function(status, body) return body end }
            end
            local before = load(1)
            ctl:set("shed:" .. shed, true)
            load(1) -- the first second: the back-off takes hold
            local during = load(1)
            local p = t.peer(autoscale.status("backend"), "127.0.0.1:" .. shed)
            ctl:delete("shed:" .. shed)
            load(1) -- the first second after: the back-off (capped at 1 s) runs out
            local after = load(1)
            local s0, s1, s2 = t.share(before, shed .. "\n"), t.share(during, shed .. "\n"), t.share(after, shed .. "\n")
            ngx.log(ngx.NOTICE, string.format("shedding backend share: before %.3f, during %.4f, after %.3f", s0, s1, s2))
            ngx.say("before ", s0 > 0.2)
            ngx.say("during below 5 % ", s1 < 0.05)
            ngx.say("not ejected ", p.state, " ", p.ejections, " ", p.reported.backpressure > 0)
            ngx.say("after ", s2 > 0.25)
        }
    }
_EOC_
--- request
GET /t
--- timeout: 20
--- response_body
before true
during below 5 % true
not ejected healthy 0 true
after true

=== TEST 4: a malformed report is ignored and counted; the request is served
--- http_config eval: ::http_config('"127.0.0.1:$TEST_NGINX_RAND_PORT_1"', "reports = { blackout = 0 }")
--- config eval
$::Gateway . <<'_EOC_';
    location = /t {
        content_by_lua_block {
            local t = require "autoscale_test"
            ngx.shared.ctl:set("garbage", true)
            local r = t.load { port = ngx.var.server_port, path = "/p", concurrency = 2, requests = 20 }
            local p
            -- the log phase of the last request may run after its client has the response
            t.poll(function()
                p = autoscale.status("backend").peers[1]
                return p.reported.malformed >= 20
            end, 2)
            ngx.say("errors ", r.errors, ", malformed ", p.reported.malformed, ", reports ", p.reported.reports,
                    ", used ", p.reported.used)
            local _, metrics = t.get(ngx.var.server_port, "/metrics")
            ngx.say((metrics:match("\n(autoscale_peer_reports_malformed_total{[^}]*} %d+)"):gsub("127.0.0.1:%d+", "PEER")))
        }
    }
_EOC_
--- request
GET /t
--- response_body
errors 0, malformed 20, reports 0, used false
autoscale_peer_reports_malformed_total{upstream="backend",peer="PEER"} 20
--- no_error_log
[error]

=== TEST 5: scaling on reported queue depth decides to scale up before the latency rises (timestamps compared)
--- http_config eval: ::http_config('"127.0.0.1:$TEST_NGINX_RAND_PORT_1", "127.0.0.1:$TEST_NGINX_RAND_PORT_2"', "reports = { blackout = 0 }, scaling = { min = 2, max = 20, interval = 0.1, scale_up_window = 0, reported = { metric = \"queue\", target = 2 }, latency = { target = 0.1 } }")
--- config eval
$::Gateway . <<'_EOC_';
    location = /t {
        content_by_lua_block {
            local t = require "autoscale_test"
            local ctl = ngx.shared.ctl
            ctl:set("report", true)
            ctl:set("base", 0.02) -- 20 ms: 4 in flight per backend on time; the latency target (100 ms) at 20
            ctl:set("cap:$TEST_NGINX_RAND_PORT_1", 4)
            ctl:set("cap:$TEST_NGINX_RAND_PORT_2", 4)
            local port = ngx.var.server_port
            -- The time the gateway's p99 of either peer first exceeds the latency target.
            local latency_at, done
            local watcher = ngx.thread.spawn(function()
                while not done and not latency_at do
                    for _, p in ipairs(autoscale.status("backend").peers) do
                        if p.p99 and p.p99 > 0.1 then
                            ngx.update_time()
                            latency_at = latency_at or ngx.now()
                        end
                    end
                    ngx.sleep(0.02)
                end
            end)
            -- A ramp from 4 to 48 clients, 0.3 s per step of 4.
            for c = 4, 48, 4 do
                t.load { port = port, path = "/p", concurrency = c, duration = 0.3 }
            end
            done = true
            ngx.thread.wait(watcher)
            local first
            for _, d in ipairs(autoscale.scaling.decisions("backend")) do
                if d.reason == "scale_up" and not first then
                    first = d
                end
            end
            ngx.log(ngx.NOTICE, "first scale-up: ", first and first.time, " by ", first and first.signal, " (",
                    first and first.why, "); p99 above target at ", latency_at)
            ngx.say("scale-up by ", first and first.signal)
            ngx.say("latency rose ", latency_at ~= nil)
            ngx.say("decision first ", first ~= nil and latency_at ~= nil and first.time < latency_at)
        }
    }
_EOC_
--- request
GET /t
--- timeout: 30
--- response_body
scale-up by reported
latency rose true
decision first true
--- no_error_log
[error]

=== TEST 6: agent answers drain / maint / up / 50% take effect within one poll interval (0.2 s), with an event
--- http_config eval: ::http_config('"127.0.0.1:$TEST_NGINX_RAND_PORT_1", "127.0.0.1:$TEST_NGINX_RAND_PORT_2"', "slow_start = 0, reports = { header = false, retry_after = false, poll = { path = \"/agent\", interval = 0.2, timeout = 0.1 } }")
--- config eval
$::Gateway . <<'_EOC_';
    location = /t {
        content_by_lua_block {
            local t = require "autoscale_test"
            local ctl = ngx.shared.ctl
            local agent = "$TEST_NGINX_RAND_PORT_2"
            local port = ngx.var.server_port
            local function peer() return t.peer(autoscale.status("backend"), "127.0.0.1:" .. agent) end
            local function answer(word, check)
                ngx.update_time()
                local t0 = ngx.now()
                ctl:set("agent:" .. agent, word)
                -- one poll interval, plus the poll's own time on a loaded machine
                local ok = t.poll(function() return check(peer()) end, 0.3)
                ngx.update_time()
                ngx.log(ngx.NOTICE, "agent answer ", word, " took effect after ", ngx.now() - t0, " s")
                return ok
            end
            local function share()
                local r = t.load { port = port, path = "/p", concurrency = 4, duration = 0.5 }
                return t.share(r, agent .. "\n"), r.errors
            end
            local s0 = share()
            ngx.say("drain ", answer("drain", function(p) return p.state == "draining" end))
            local s1, e1 = share()
            ngx.say("maint ", answer("maint", function(p) return p.reported.agent_state == "maint" and p.state == "draining" end))
            ngx.say("up ", answer("up", function(p) return p.state == "healthy" end))
            local s2 = share()
            ngx.say("50% ", answer("50%", function(p) return p.reported.agent_weight == 50 end))
            local drained = 0
            for _, e in ipairs(autoscale.events(1000)) do
                if e.event == "draining" and e.reason == "agent" and e.peer == "127.0.0.1:" .. agent then
                    drained = drained + 1
                end
            end
            ngx.log(ngx.NOTICE, string.format("agent peer share: before %.3f, drained %.3f, up %.3f", s0, s1, s2))
            ngx.say("shares ", s0 > 0.3, " ", s1 == 0, " ", s2 > 0.3, ", errors ", e1, ", drain events ", drained)
        }
    }
_EOC_
--- request
GET /t
--- timeout: 20
--- response_body
drain true
maint true
up true
50% true
shares true true true, errors 0, drain events 1
--- no_error_log
[error]
