# vim:set ft= ts=4 sw=4 et:
# etcd v3 discovery against a real etcd (Debian etcd-server) that the test starts and stops by PID: a key put under
# the prefix reaches the balancer without reload and its peer takes traffic within 1 s; a deleted key drains its
# peer out; a bad value is skipped and logged once; etcd going away keeps the last good set (logged once), also across
# a reload.

use lib 't';
use Autoscale;

workers(2);
worker_connections(1024); # the gateway, its backends and their keepalive connections share the workers
master_on();

our $Have_etcd = grep { -x "$_/etcd" } split /:/, $ENV{PATH};
diag("etcd not found (Debian package etcd-server): skipped") unless $Have_etcd;

our $HttpConfig = <<'_EOC_';
    lua_socket_log_errors off; # a refused connection to etcd is reported by discovery, once
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1;
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_2;
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_3;
        location / { content_by_lua_block { ngx.say(ngx.var.server_port) } }
    }
    init_by_lua_block {
        autoscale = require "resty.autoscale"
        autoscale.configure { upstreams = { api = {
            peers = { "127.0.0.1:$TEST_NGINX_RAND_PORT_1" }, -- a seed: replaced by what etcd names (keep_static = false)
            discovery = { keep_static = false, drain_timeout = 5,
                          etcd = { endpoints = { "http://127.0.0.1:26700" }, prefix = "/svc/api/", interval = 0.2,
                                   timeout = 0.5 } },
        } } }
    }
    init_worker_by_lua_block { autoscale.init_worker() }
    upstream api {
        server 0.0.0.1;
        balancer_by_lua_block { autoscale.balance("api") }
        keepalive 16;
    }
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_5 reuseport;
        location / {
            proxy_pass http://api;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            log_by_lua_block { autoscale.log() }
        }
        location = /discovery { content_by_lua_block { autoscale.discovery_handler() } }
    }
_EOC_

run_tests();

__DATA__

=== TEST 1: etcd keys reach the balancer without reload; etcd stopped keeps the last good set
--- skip_eval: 3: !$::Have_etcd
--- http_config eval: $::HttpConfig
--- config
    location = /t {
        content_by_lua_block {
            local t = require "autoscale_test"
            local process = require "autoscale_process"
            local cjson = require "cjson"
            local gw = $TEST_NGINX_RAND_PORT_5
            local p1, p2, p3 = "$TEST_NGINX_RAND_PORT_1", "$TEST_NGINX_RAND_PORT_2", "$TEST_NGINX_RAND_PORT_3"
            local dir = ngx.config.prefix() .. "logs/"
            os.execute("rm -rf " .. dir .. "etcd-data")

            local function etcd(verb, key, value) -- put or deleterange through the HTTP gateway
                local body = { key = ngx.encode_base64(key), value = value and ngx.encode_base64(value) }
                local code = t.request { port = 26700, method = "POST", path = "/v3/kv/" .. verb,
                                         body = cjson.encode(body), timeout = 1000 }
                return code == 200
            end
            local function peers() -- the upstream's peers as "p1,p2" (those not draining)
                local out = {}
                for _, p in ipairs(autoscale.status("api").peers) do
                    if p.state ~= "draining" then
                        out[#out + 1] = p.addr:match(":(%d+)$") == p1 and "p1" or p.addr:match(":(%d+)$") == p2 and "p2" or "p3"
                    end
                end
                table.sort(out)
                return table.concat(out, ",")
            end
            local function until_served(port) return process.until_served(gw, "/", port .. "\n") end
            local function count(pattern) return process.count(dir .. "error.log", pattern) end
            local function owner_state() return process.asker(gw, "api", "etcd") end

            local server
            local ok, err = pcall(function()
                server = process.etcd(dir, 26700)
                ngx.say("before: ", peers())

                assert(etcd("put", "/svc/api/a", "127.0.0.1:" .. p2))
                local took = until_served(p2)
                ngx.say("key a put: p2 serves within 1 s: ", took ~= nil and took < 1)
                ngx.log(ngx.NOTICE, "etcd key to first request on the new peer: ", took, " s")
                t.poll(function() return peers() == "p2" end, 5)
                ngx.say("the seed p1 is replaced: ", peers())

                assert(etcd("put", "/svc/api/b", '{"addr":"127.0.0.1:' .. p3 .. '","weight":2}'))
                assert(etcd("put", "/svc/api/bad", "not an address"))
                took = until_served(p3)
                ngx.say("key b put: p3 serves within 1 s: ", took ~= nil and took < 1)
                ngx.log(ngx.NOTICE, "etcd key to first request on the new peer: ", took, " s")
                local w
                t.poll(function() w = t.peer(autoscale.status("api"), "127.0.0.1:" .. p3) return w end, 2)
                ngx.say("peers: ", peers(), ", p3 weight ", w and w.weight)

                -- etcd goes away: the last good set stays
                local failed, back = count("etcd failed"), count("etcd answers again")
                assert(server:stop(), "etcd did not stop")
                assert(t.poll(function() return count("etcd failed") > failed end, 5), "the failure was not logged")
                local st
                assert(t.poll(function() st = owner_state() return st.failures >= 5 end, 5), "fewer than 5 failed polls")
                local res = t.load { port = gw, path = "/", concurrency = 4, requests = 100 }
                ngx.say("etcd stopped: ", res.errors, " errors in ", res.total, " requests, all served by p2 or p3 ",
                        (res.by_key[p2 .. "\n"] or 0) + (res.by_key[p3 .. "\n"] or 0) == res.total, "; peers ", peers(),
                        "; source ok ", st.ok, ", error names the cause ", (st.error or ""):find("connection refused") ~= nil)

                -- a reload while etcd is away: the peers it named stay, with their statistics, and the seed stays out
                local before = t.peer(autoscale.status("api"), "127.0.0.1:" .. p2).totals.requests
                local epoch = autoscale.status_all().region.config_epoch
                local _, asker = owner_state()
                os.execute("kill -HUP " .. process.read(dir .. "nginx.pid"):match("%d+"))
                assert(t.poll(function() return autoscale.status_all().region.config_epoch > epoch end, 10), "no reload")
                assert(t.poll(function()
                    local src, worker = owner_state()
                    return worker ~= asker and src.failures >= 3
                end, 10), "no new worker asks etcd")
                res = t.load { port = gw, path = "/", concurrency = 4, requests = 100 }
                local after = t.peer(autoscale.status("api"), "127.0.0.1:" .. p2)
                ngx.say("reloaded while etcd is away: ", res.errors, " errors; peers ", peers(), "; p2 kept its statistics ",
                        after ~= nil and after.totals.requests >= before)

                -- etcd back: a deleted key drains its peer out
                server = process.etcd(dir, 26700)
                assert(etcd("deleterange", "/svc/api/a"))
                assert(t.poll(function() return peers() == "p3" end, 5), "p2 was not drained")
                local gone = t.poll(function() return t.peer(autoscale.status("api"), "127.0.0.1:" .. p2) == nil end, 5)
                res = t.load { port = gw, path = "/", concurrency = 4, requests = 50 }
                ngx.say("key a deleted: p2 removed ", gone, ", all of 50 requests served by p3 ",
                        res.by_key[p3 .. "\n"] == 50, ", errors ", res.errors)
                -- once per worker that asks: the old one, and the one that took over after the reload
                ngx.say("log lines while etcd was away: failed ", count("etcd failed") - failed, ", answers again ",
                        count("etcd answers again") - back, "; bad key ", count("key /svc/api/bad skipped"))
            end)
            if server then server:stop() end
            if not ok then
                ngx.say("FAILED: ", err)
            end
        }
    }
--- log_level: notice
--- request
GET /t
--- timeout: 60
--- response_body
before: p1
key a put: p2 serves within 1 s: true
the seed p1 is replaced: p2
key b put: p3 serves within 1 s: true
peers: p2,p3, p3 weight 2
etcd stopped: 0 errors in 100 requests, all served by p2 or p3 true; peers p2,p3; source ok false, error names the cause true
reloaded while etcd is away: 0 errors; peers p2,p3; p2 kept its statistics true
key a deleted: p2 removed true, all of 50 requests served by p3 true, errors 0
log lines while etcd was away: failed 2, answers again 1; bad key 2
--- no_error_log
[error]
