# vim:set ft= ts=4 sw=4 et:
# Peer choice under real traffic: slow and failing peers lose their traffic, retries avoid tried peers and every
# attempt is recorded, round robin and weights behave as documented.

use lib 't';
use Autoscale;

workers(2);
master_on();

# Three backends whose delay and status are set at run time through a shared dict; a fourth port has no listener.
our $Backends = <<'_EOC_';
    lua_shared_dict ctl 1m;
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1;
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_2;
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_3;
        location / {
            content_by_lua_block {
                local name = ngx.var.server_port
                local ctl = ngx.shared.ctl
                ngx.sleep(ctl:get("delay:" .. name) or 0.002)
                ngx.status = ctl:get("status:" .. name) or 200
                ngx.say(name)
            }
        }
    }
_EOC_

our $Gateway = <<'_EOC_';
    location /p {
        proxy_pass http://backend;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_next_upstream error timeout http_500 http_502 http_503 http_504;
        proxy_connect_timeout 1s;
        add_header X-Upstream $upstream_addr always;
        log_by_lua_block { autoscale.log() }
    }
_EOC_

sub http_config { $::Backends . gateway_upstream(@_) }

our $Three = '"127.0.0.1:$TEST_NGINX_RAND_PORT_1", "127.0.0.1:$TEST_NGINX_RAND_PORT_2", "127.0.0.1:$TEST_NGINX_RAND_PORT_3"';

run_tests();

__DATA__

=== TEST 1: a peer made 20x slower gets < 10 % of requests within 2 s (two workers share what they learn)
--- http_config eval: ::http_config($::Three, "slow_start = 0")
--- config eval
$::Gateway . <<'_EOC_';
    location = /t {
        content_by_lua_block {
            local t = require "autoscale_test"
            local slow = "$TEST_NGINX_RAND_PORT_3"
            local port = ngx.var.server_port
            local before = t.load { port = port, path = "/p", concurrency = 8, duration = 1.5 }
            ngx.shared.ctl:set("delay:" .. slow, 0.04) -- 20x the 2 ms of the others
            local first = t.load { port = port, path = "/p", concurrency = 8, duration = 2 }
            local second = t.load { port = port, path = "/p", concurrency = 8, duration = 2 }
            local s0, s1, s2 = t.share(before, slow .. "\n"), t.share(first, slow .. "\n"), t.share(second, slow .. "\n")
            ngx.log(ngx.NOTICE, string.format("slow peer share: before %.3f, first 2 s %.3f, next 2 s %.3f (%d, %d, %d requests)",
                    s0, s1, s2, before.total, first.total, second.total))
            ngx.say("before ", s0 > 0.2 and s0 < 0.45)
            ngx.say("first 2 s ", s1 < 0.10)
            ngx.say("next 2 s ", s2 < 0.05)
            ngx.say("errors ", before.errors + first.errors + second.errors)
        }
    }
_EOC_
--- request
GET /t
--- timeout: 15
--- response_body
before true
first 2 s true
next 2 s true
errors 0
--- no_error_log
[error]



=== TEST 2: a peer answering 502 fast loses its traffic and clients see no error while retries are available
--- http_config eval: ::http_config($::Three, "slow_start = 0")
--- config eval
$::Gateway . <<'_EOC_';
    location = /t {
        content_by_lua_block {
            local t = require "autoscale_test"
            local bad = "$TEST_NGINX_RAND_PORT_2"
            ngx.shared.ctl:set("status:" .. bad, 502)
            ngx.shared.ctl:set("delay:" .. bad, 0)
            local res = t.load { port = ngx.var.server_port, path = "/p", concurrency = 8, duration = 3 }
            local st = autoscale.status("backend")
            local p = t.peer(st, "127.0.0.1:" .. bad)
            local attempts = 0
            for _, q in ipairs(st.peers) do attempts = attempts + q.requests end
            ngx.log(ngx.NOTICE, string.format("502 peer: %d of %d attempts (%.4f), %d client requests, %d errors",
                    p.requests, attempts, p.requests / attempts, res.total, res.errors))
            ngx.say("client errors ", res.errors)
            ngx.say("bad peer attempts < 2 % ", p.requests / attempts < 0.02)
            ngx.say("all its attempts failed as gateway errors ", p.failures == p.requests and p.fail_gateway == p.requests)
        }
    }
_EOC_
--- request
GET /t
--- timeout: 15
--- response_body
client errors 0
bad peer attempts < 2 % true
all its attempts failed as gateway errors true



=== TEST 3: a peer refusing connections loses its traffic; failures are counted as connect errors
--- http_config eval: ::http_config('"127.0.0.1:$TEST_NGINX_RAND_PORT_1", "127.0.0.1:$TEST_NGINX_RAND_PORT_2", "127.0.0.1:$TEST_NGINX_RAND_PORT_4"', "slow_start = 0")
--- config eval
$::Gateway . <<'_EOC_';
    location = /t {
        content_by_lua_block {
            local t = require "autoscale_test"
            local res = t.load { port = ngx.var.server_port, path = "/p", concurrency = 8, duration = 3 }
            local st = autoscale.status("backend")
            local p = t.peer(st, "127.0.0.1:$TEST_NGINX_RAND_PORT_4")
            local attempts = 0
            for _, q in ipairs(st.peers) do attempts = attempts + q.requests end
            ngx.log(ngx.NOTICE, string.format("refusing peer: %d of %d attempts, %d client requests, %d errors",
                    p.requests, attempts, res.total, res.errors))
            ngx.say("client errors ", res.errors)
            ngx.say("dead peer attempts < 2 % ", p.requests / attempts < 0.02)
            ngx.say("connect errors ", p.fail_connect == p.requests and p.requests > 0)
        }
    }
_EOC_
--- request
GET /t
--- timeout: 15
--- response_body
client errors 0
dead peer attempts < 2 % true
connect errors true



=== TEST 4: a retry never goes back to a peer this request already tried, and every attempt is recorded
--- http_config eval: ::http_config($::Three, "slow_start = 0, retries = 2")
--- config eval
$::Gateway . <<'_EOC_';
    location = /t {
        content_by_lua_block {
            local t = require "autoscale_test"
            local ctl = ngx.shared.ctl
            ctl:set("status:$TEST_NGINX_RAND_PORT_1", 500)
            ctl:set("status:$TEST_NGINX_RAND_PORT_2", 503)
            local repeats, attempts, answered = 0, 0, 0
            for i = 1, 60 do
                local status, body, headers = t.get(ngx.var.server_port, "/p")
                local seen = {}
                for addr in headers["x-upstream"]:gmatch("[^,%s]+") do
                    attempts = attempts + 1
                    if seen[addr] then repeats = repeats + 1 end
                    seen[addr] = true
                end
                if status == 200 and body == "$TEST_NGINX_RAND_PORT_3\n" then answered = answered + 1 end
            end
            -- The log phase of the last request may still be running when its response arrives: poll.
            local recorded, kinds
            t.poll(function()
                recorded, kinds = 0, 0
                for _, p in ipairs(autoscale.status("backend").peers) do
                    recorded = recorded + p.requests
                    kinds = kinds + p.fail_http_5xx + p.fail_gateway
                end
                return recorded == attempts
            end, 3)
            ngx.say("answered by the good peer ", answered)
            ngx.say("repeated peers ", repeats)
            ngx.say("attempts recorded ", recorded == attempts, " ", attempts > 60)
            ngx.say("failures recorded by kind ", kinds == attempts - 60)
        }
    }
_EOC_
--- request
GET /t
--- timeout: 15
--- response_body
answered by the good peer 60
repeated peers 0
attempts recorded true true
failures recorded by kind true



=== TEST 5: round robin gives exact shares across workers, honouring weights
--- http_config eval: ::http_config('"127.0.0.1:$TEST_NGINX_RAND_PORT_1", { addr = "127.0.0.1:$TEST_NGINX_RAND_PORT_2", weight = 2 }', 'balancer = "round_robin"')
--- config eval
$::Gateway . <<'_EOC_';
    location = /t {
        content_by_lua_block {
            local t = require "autoscale_test"
            local res = t.load { port = ngx.var.server_port, path = "/p", concurrency = 4, requests = 300 }
            ngx.say(res.by_key["$TEST_NGINX_RAND_PORT_1\n"], " ", res.by_key["$TEST_NGINX_RAND_PORT_2\n"])
        }
    }
_EOC_
--- request
GET /t
--- response_body
100 200



=== TEST 6: weighted random follows the weights
--- http_config eval: ::http_config('"127.0.0.1:$TEST_NGINX_RAND_PORT_1", { addr = "127.0.0.1:$TEST_NGINX_RAND_PORT_2", weight = 3 }', 'balancer = "random"')
--- config eval
$::Gateway . <<'_EOC_';
    location = /t {
        content_by_lua_block {
            local t = require "autoscale_test"
            local res = t.load { port = ngx.var.server_port, path = "/p", concurrency = 8, requests = 800 }
            local share = t.share(res, "$TEST_NGINX_RAND_PORT_2\n")
            ngx.say(share > 0.68 and share < 0.82, " ", res.errors)
        }
    }
_EOC_
--- request
GET /t
--- timeout: 10
--- response_body
true 0



=== TEST 7: a new peer starts at the mean estimate and ramps in (no flood)
--- http_config eval: ::http_config($::Three, "slow_start = 10")
--- config eval
$::Gateway . <<'_EOC_';
    location = /t {
        content_by_lua_block {
            local t = require "autoscale_test"
            local st = autoscale.status("backend")
            for _, p in ipairs(st.peers) do
                assert(p.slow_start >= 0.1 and p.slow_start < 0.2, "fresh peers start at 10 % weight: " .. p.slow_start)
                assert(p.ewma > 0.02 and p.ewma <= 0.03, "seeded with default_rtt: " .. p.ewma)
            end
            ngx.say("ok")
        }
    }
_EOC_
--- request
GET /t
--- response_body
ok
