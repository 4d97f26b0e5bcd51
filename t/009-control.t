# vim:set ft= ts=4 sw=4 et:
# Run-time changes through autoscale.control: they reach every worker at once, keep statistics, and bad input
# changes nothing.

use lib 't';
use Autoscale;

workers(2);
master_on();

our $HttpConfig = <<'_EOC_';
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1;
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_2;
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_3;
        location / { content_by_lua_block { ngx.say(ngx.var.server_port) } }
    }
    init_by_lua_block {
        autoscale = require "resty.autoscale"
        autoscale.configure { upstreams = { backend = { balancer = "round_robin", slow_start = 0, peers = {
            "127.0.0.1:$TEST_NGINX_RAND_PORT_1", "127.0.0.1:$TEST_NGINX_RAND_PORT_2" } } } }
    }
    init_worker_by_lua_block { autoscale.init_worker() }
    upstream backend {
        server 0.0.0.1;
        balancer_by_lua_block { autoscale.balance("backend") }
        keepalive 8;
    }
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_5 reuseport;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            log_by_lua_block { autoscale.log() }
        }
    }
_EOC_

run_tests();

__DATA__

=== TEST 1: add, weight, drain, enable, remove and tune reach both workers; bad input changes nothing
--- http_config eval: $::HttpConfig
--- config
    location = /t {
        content_by_lua_block {
            local t = require "autoscale_test"
            local c = autoscale.control
            local gw = $TEST_NGINX_RAND_PORT_5
            local p1, p2, p3 = "$TEST_NGINX_RAND_PORT_1", "$TEST_NGINX_RAND_PORT_2", "$TEST_NGINX_RAND_PORT_3"
            local function shares(n)
                local res = t.load { port = gw, path = "/", concurrency = 4, requests = n }
                return (res.by_key[p1 .. "\n"] or 0), (res.by_key[p2 .. "\n"] or 0), (res.by_key[p3 .. "\n"] or 0), res.errors
            end
            local function epoch() return autoscale.status_all().region.config_epoch end

            local bad = {
                { c.add_peer, { "nope", "127.0.0.1:1" }, "unknown upstream nope" },
                { c.add_peer, { "backend", "backend:80" }, "host must be an IPv4 address" },
                { c.add_peer, { "backend", "127.0.0.1:" .. p1 }, "is already in this upstream" },
                { c.add_peer, { "backend", "127.0.0.1:99999" }, "port out of range" },
                { c.add_peer, { "backend", "127.0.0.1:7", 0 }, "weight must be an integer between 1 and 10000" },
                { c.add_peer, { "backend", 42 }, "address must be a string" },
                { c.set_weight, { "backend", "127.0.0.1:7", 2 }, "is not in this upstream" },
                { c.set_weight, { "backend", "127.0.0.1:" .. p1, 1.5 }, "weight must be an integer" },
                { c.drain, { "backend", "127.0.0.1:7" }, "is not in this upstream" },
                { c.remove_peer, { "backend", "127.0.0.1:7" }, "is not in this upstream" },
                { c.tune, { "backend", { retries = -1 } }, "upstreams.backend.retries: must be between 0 and 100 (got -1)" },
                { c.tune, { "backend", { balancer = "fastest" } }, "upstreams.backend.balancer: must be" },
                { c.tune, { "backend", { peers = {} } }, "peers: use add_peer/remove_peer" },
                { c.tune, { "backend", "x" }, "options must be a table" },
            }
            local before = epoch()
            for i, case in ipairs(bad) do
                local ok, err = case[1](unpack(case[2]))
                if ok or not err or not err:find(case[3], 1, true) then
                    ngx.say("case ", i, " not refused as expected: ", tostring(ok), " ", tostring(err))
                end
            end
            ngx.say("bad input refused, nothing changed: ", epoch() == before)

            local a, b, x = shares(200)
            ngx.say("before: ", a, " ", b, " ", x)
            assert(c.add_peer("backend", "127.0.0.1:" .. p3))
            a, b, x = shares(300)
            ngx.say("added: ", a, " ", b, " ", x)
            assert(c.set_weight("backend", "127.0.0.1:" .. p3, 2))
            a, b, x = shares(400)
            ngx.say("weight 2: ", a, " ", b, " ", x)
            ngx.say("drain: ", c.drain("backend", "127.0.0.1:" .. p1), " again: ", c.drain("backend", "127.0.0.1:" .. p1))
            a, b, x = shares(300)
            ngx.say("drained: ", a, " ", b, " ", x)
            assert(c.enable("backend", "127.0.0.1:" .. p1))
            assert(c.remove_peer("backend", "127.0.0.1:" .. p2))
            a, b, x = shares(300)
            ngx.say("removed: ", a, " ", b, " ", x)
            assert(c.tune("backend", { balancer = "random" }))
            ngx.say("tuned: ", autoscale.status_all().region.config_epoch > before)
            local kinds = {}
            for _, e in ipairs(autoscale.events(100)) do kinds[#kinds + 1] = e.event end
            ngx.say(table.concat(kinds, " "))
        }
    }
--- request
GET /t
--- timeout: 20
--- response_body
bad input refused, nothing changed: true
before: 100 100 0
added: 100 100 100
weight 2: 100 100 200
drain: true again: false
drained: 0 100 200
removed: 100 0 200
tuned: true
config config peer_added config weight draining enabled config peer_removed config tuned
--- no_error_log
[error]



=== TEST 2: with every peer drained, the request gets nginx's 502 (no live upstreams), so that error_page 502 can serve a fallback
--- http_config eval: $::HttpConfig
--- config
    location = /t {
        content_by_lua_block {
            local t = require "autoscale_test"
            local gw = $TEST_NGINX_RAND_PORT_5
            local c = autoscale.control
            assert(c.drain("backend", "127.0.0.1:$TEST_NGINX_RAND_PORT_1"))
            assert(c.drain("backend", "127.0.0.1:$TEST_NGINX_RAND_PORT_2"))
            local codes = {}
            for i = 1, 4 do codes[i] = (t.get(gw, "/", 2000)) end
            ngx.say(table.concat(codes, " "))
        }
    }
--- request
GET /t
--- response_body
502 502 502 502
--- error_log
no peer available
