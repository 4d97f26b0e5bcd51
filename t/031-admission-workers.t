# vim:set ft= ts=4 sw=4 et:
# Admission counts shared by two workers: requests aborted by their client and requests that die with a worker
# killed by SIGKILL leave no phantom in-flight count behind.

use lib 't';
use Autoscale;

workers(2);
master_on();
worker_connections(1024);

our $HttpConfig = <<'_EOC_';
    lua_shared_dict ctl 1m;
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1;
        location / {
            content_by_lua_block {
                ngx.sleep(ngx.shared.ctl:get("hold") or 0.001)
                ngx.say("ok")
            }
        }
    }
    init_by_lua_block {
        autoscale = require "resty.autoscale"
        autoscale.configure { upstreams = { backend = { peers = { "127.0.0.1:$TEST_NGINX_RAND_PORT_1" },
            admission = { concurrency = { algorithm = "fixed", initial = 100 } } } } }
    }
    init_worker_by_lua_block { autoscale.init_worker() }
    upstream backend {
        server 0.0.0.1;
        balancer_by_lua_block { autoscale.balance("backend") }
        keepalive 16;
    }
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_5 reuseport;
        location / {
            access_by_lua_block { autoscale.admit("backend") }
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_read_timeout 10s;
            log_by_lua_block { autoscale.log() }
        }
        location = /status { content_by_lua_block { autoscale.status_handler() } }
    }
_EOC_

our $Helpers = <<'_EOC_';
    local t = require "autoscale_test"
    local cjson = require "cjson"
    local gw = $TEST_NGINX_RAND_PORT_5
    local function status() return t.status(gw) end
    local function inflight() return status().upstreams.backend.admission.in_flight end
_EOC_

run_tests();

__DATA__

=== TEST 1: requests whose clients go away, and requests that die with a killed worker, are not counted in flight
--- http_config eval: $::HttpConfig
--- config eval
"location = /t { content_by_lua_block { $::Helpers " . <<'_EOC_';
            ngx.shared.ctl:set("hold", 8)
            -- Clients that give up after 200 ms: nginx ends their requests (499) in the log phase.
            local threads = {}
            for i = 1, 10 do
                threads[i] = ngx.thread.spawn(t.get, gw, "/", 200)
            end
            local held = t.poll(function() return inflight() == 10 end, 5)
            for i = 1, #threads do ngx.thread.wait(threads[i]) end
            ngx.shared.ctl:set("hold", 0.001)
            local aborted = t.poll(function() return inflight() == 0 end, 12)
            ngx.say("10 held ", held, "; back to 0 after the clients went away ", aborted)
            -- 20 requests held, spread over both workers; then the worker not running this handler is killed.
            ngx.shared.ctl:set("hold", 8)
            threads = {}
            for i = 1, 20 do
                threads[i] = ngx.thread.spawn(t.get, gw, "/", 10000)
            end
            local busy = t.poll(function() return inflight() == 20 end, 6)
            local before = inflight()
            ngx.shared.ctl:set("hold", 0.001)
            local me, victim = ngx.worker.pid(), nil
            t.poll(function() local pid = status().worker.pid if pid ~= me then victim = pid end return victim end, 5)
            assert(os.execute("kill -9 " .. victim) == 0)
            local broken = 0
            for i = 1, #threads do
                local _, code = ngx.thread.wait(threads[i])
                if code ~= 200 then broken = broken + 1 end
            end
            -- The replacement worker takes the dead worker's column and releases its counts on its first request.
            local settled = t.poll(function()
                t.get(gw, "/", 2000)
                return inflight() == 0
            end, 10)
            ngx.log(ngx.NOTICE, "kill -9: ", broken, " requests broken with the worker, admission in flight now ", inflight())
            ngx.say("20 in flight before the kill ", busy or before)
            ngx.say("some requests died with the worker ", broken > 0 and broken < 20)
            ngx.say("in flight back to 0 ", settled)
        } }
_EOC_
--- request
GET /t
--- timeout: 40
--- response_body
10 held true; back to 0 after the clients went away true
20 in flight before the kill true
some requests died with the worker true
in flight back to 0 true
