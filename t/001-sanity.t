# vim:set ft= ts=4 sw=4 et:
# The public API end to end: proxying through autoscale.balance/autoscale.log, status, wrong use.

use lib 't';
use Autoscale;

our $HttpConfig = <<'_EOC_';
    init_by_lua_block {
        autoscale = require "resty.autoscale"
        autoscale.configure {
            upstreams = {
                backend = { peers = { "127.0.0.1:$TEST_NGINX_RAND_PORT_1", "127.0.0.1:$TEST_NGINX_RAND_PORT_2" } },
            },
        }
    }
    init_worker_by_lua_block { autoscale.init_worker() }
    upstream backend {
        server 0.0.0.1;
        balancer_by_lua_block { autoscale.balance("backend") }
        keepalive 8;
    }
    server { listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1; location / { return 200 "a\n"; } }
    server { listen 127.0.0.1:$TEST_NGINX_RAND_PORT_2; location / { return 200 "b\n"; } }
_EOC_

our $Proxy = <<'_EOC_';
    location /p {
        proxy_pass http://backend;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        log_by_lua_block { autoscale.log() }
    }
_EOC_

run_tests();

__DATA__

=== TEST 1: requests are proxied and counted per peer
--- http_config eval: $::HttpConfig
--- config eval
$::Proxy . <<'_EOC_';
    location = /t {
        content_by_lua_block {
            local t = require "autoscale_test"
            local res = t.load { port = ngx.var.server_port, path = "/p", concurrency = 1, requests = 20 }
            ngx.say("errors ", res.errors)
            local st, total, failures
            -- The last request's log phase may still be running when its response arrives: poll.
            t.poll(function()
                st, total, failures = autoscale.status("backend"), 0, 0
                for _, p in ipairs(st.peers) do
                    total = total + p.requests
                    failures = failures + p.failures
                end
                return total == 20
            end, 3)
            for _, p in ipairs(st.peers) do
                assert(p.inflight == 0, "in flight after completion")
                assert(p.state == "healthy", p.state)
            end
            ngx.say("peers ", #st.peers, " requests ", total, " failures ", failures, " balancer ", st.balancer)
        }
    }
_EOC_
--- request
GET /t
--- response_body
errors 0
peers 2 requests 20 failures 0 balancer peak_ewma
--- no_error_log
[error]



=== TEST 2: status reports latency percentiles, EWMA and rates in seconds
--- http_config eval: $::HttpConfig
--- config eval
$::Proxy . <<'_EOC_';
    location = /t {
        content_by_lua_block {
            local t = require "autoscale_test"
            t.load { port = ngx.var.server_port, path = "/p", concurrency = 2, requests = 40 }
            local st
            t.poll(function() st = autoscale.status("backend") return st.requests == 40 end, 3)
            for _, p in ipairs(st.peers) do
                if p.requests > 0 then
                    assert(p.p50 > 0 and p.p50 < 1, "p50 " .. tostring(p.p50))
                    assert(p.p50 <= p.p90 and p.p90 <= p.p99 and p.p99 <= p.p999, "ordered percentiles")
                    assert(p.ewma > 0 and p.ewma < 1, "ewma " .. p.ewma)
                    assert(p.rps > 0, "rps")
                    assert(p.window > 0 and p.window <= 10, "window " .. p.window)
                    assert(p.totals.requests == p.requests)
                end
            end
            local r = autoscale.status_all().region
            ngx.say("buckets ", r.window.buckets, " bucket ", r.window.bucket, " max_peers ", r.max_peers)
            ngx.say(st.requests)
        }
    }
_EOC_
--- request
GET /t
--- response_body
buckets 10 bucket 1 max_peers 256
40
--- no_error_log
[error]



=== TEST 3: the JSON status endpoint, whole and per upstream
--- http_config eval: $::HttpConfig
--- config eval
$::Proxy . <<'_EOC_';
    location = /status { content_by_lua_block { autoscale.status_handler() } }
    location = /t {
        content_by_lua_block {
            local t = require "autoscale_test"
            local cjson = require "cjson"
            t.load { port = ngx.var.server_port, path = "/p", concurrency = 1, requests = 5 }
            t.poll(function() return autoscale.status("backend").requests == 5 end, 3)
            local status, body, headers = t.get(ngx.var.server_port, "/status")
            local all = cjson.decode(body)
            ngx.say(status, " ", headers["content-type"], " ", all.upstreams.backend.requests, " ", #all.upstreams.backend.peers)
            status, body = t.get(ngx.var.server_port, "/status?upstream=backend")
            ngx.say(status, " ", cjson.decode(body).name)
            status, body = t.get(ngx.var.server_port, "/status?upstream=nope")
            ngx.say(status, " ", cjson.decode(body).error)
        }
    }
_EOC_
--- request
GET /t
--- response_body
200 application/json 5 2
200 backend
404 unknown upstream nope
--- no_error_log
[error]



=== TEST 4: configure outside init_by_lua is a programming error
--- http_config eval: $::HttpConfig
--- config
    location = /t {
        content_by_lua_block {
            local ok, err = pcall(autoscale.configure, { upstreams = {} })
            ngx.say(err)
        }
    }
--- request
GET /t
--- response_body_like
must be called in init_by_lua\* \(called in content\)



=== TEST 5: balancing an upstream that was never configured fails the request and says why
--- config
    location = /p {
        proxy_pass http://other;
        log_by_lua_block { autoscale.log() }
    }
--- http_config eval
$::HttpConfig . <<'_EOC_';
    upstream other {
        server 0.0.0.1;
        balancer_by_lua_block { autoscale.balance("nope") }
    }
_EOC_
--- request
GET /p
--- error_code: 500
--- error_log
resty.autoscale: unknown upstream nope (not in autoscale.configure)



=== TEST 6: the status of an unknown upstream is a run-time error value, not an exception
--- http_config eval: $::HttpConfig
--- config
    location = /t {
        content_by_lua_block {
            ngx.say(autoscale.status("nope"))
        }
    }
--- request
GET /t
--- response_body
nilunknown upstream nope
