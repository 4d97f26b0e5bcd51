# vim:set ft= ts=4 sw=4 et:
# State shared by all workers, kept across `nginx -s reload`, and repaired after a worker is killed with SIGKILL.

use lib 't';
use Autoscale;

workers(2);
worker_connections(1024); # 20 held requests: client, gateway and backend sides of each share the two workers
master_on();

our $HttpConfig = <<'_EOC_';
    lua_shared_dict ctl 1m;
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1;
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_2;
        location / {
            content_by_lua_block {
                ngx.sleep(ngx.shared.ctl:get("hold") or 0.001)
                ngx.say(ngx.var.server_port)
            }
        }
    }
    init_by_lua_block {
        autoscale = require "resty.autoscale"
        autoscale.configure { upstreams = { backend = { peers = {
            "127.0.0.1:$TEST_NGINX_RAND_PORT_1", "127.0.0.1:$TEST_NGINX_RAND_PORT_2" } } } }
    }
    init_worker_by_lua_block { autoscale.init_worker() }
    upstream backend {
        server 0.0.0.1;
        balancer_by_lua_block { autoscale.balance("backend") }
        keepalive 16;
    }
    # The gateway, on a reuseport listener so the kernel spreads connections over both workers.
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_5 reuseport;
        location / {
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
    local function totals(st)
        local requests, inflight = 0, 0
        for _, p in ipairs(st.upstreams.backend.peers) do
            requests = requests + p.totals.requests
            inflight = inflight + p.inflight
        end
        return requests, inflight
    end
    local function master_pid()
        local f = assert(io.open(ngx.config.prefix() .. "logs/nginx.pid"))
        local pid = tonumber(f:read("*l"))
        f:close()
        return pid
    end
_EOC_

run_tests();

__DATA__

=== TEST 1: both workers serve, and both see the same counts
--- http_config eval: $::HttpConfig
--- config eval
"location = /t { content_by_lua_block { $::Helpers " . <<'_EOC_';
            local res = t.load { port = gw, path = "/", concurrency = 8, requests = 400 }
            -- Ask until both workers have answered with all 400 requests counted (the last log phases may still run).
            local pids, seen = {}, 0
            t.poll(function()
                local st = status()
                if not pids[st.worker.pid] and totals(st) == 400 then
                    pids[st.worker.pid] = true
                    seen = seen + 1
                end
                return seen == 2
            end, 5)
            ngx.say("errors ", res.errors, ", workers that see 400: ", seen)
        } }
_EOC_
--- request
GET /t
--- timeout: 10
--- response_body
errors 0, workers that see 400: 2



=== TEST 2: statistics survive nginx -s reload
--- http_config eval: $::HttpConfig
--- config eval
"location = /t { content_by_lua_block { $::Helpers " . <<'_EOC_';
            local res = t.load { port = gw, path = "/", concurrency = 4, requests = 200 }
            -- The last log phases may still be running when the client has its responses: wait for all 200.
            local before
            t.poll(function() before = status() return totals(before) == 200 end, 5)
            local epoch = before.region.config_epoch
            local old, n = {}, 0
            t.poll(function()
                local pid = status().worker.pid
                if not old[pid] then
                    old[pid], n = true, n + 1
                end
                return n == 2
            end, 5)
            assert(os.execute("kill -HUP " .. master_pid()) == 0)
            -- Poll until a worker of the new generation answers.
            local after
            local ok = t.poll(function()
                local st = status()
                if st and not old[st.worker.pid] and st.region.config_epoch > epoch then
                    after = st
                    return true
                end
            end, 10)
            ngx.say("reloaded ", ok, ", errors ", res.errors)
            ngx.say("totals kept ", (totals(after)), " of ", (totals(before)))
        } }
_EOC_
--- request
GET /t
--- timeout: 20
--- response_body
reloaded true, errors 0
totals kept 200 of 200



=== TEST 3: a worker killed with SIGKILL mid-request leaves no phantom in-flight load and no lost statistics
--- http_config eval: $::HttpConfig
--- config eval
"location = /t { content_by_lua_block { $::Helpers " . <<'_EOC_';
            t.load { port = gw, path = "/", concurrency = 4, requests = 100 }
            local done = (totals(status()))
            -- Hold 20 requests in flight at the backends, spread over both workers.
            ngx.shared.ctl:set("hold", 8)
            local threads = {}
            for i = 1, 20 do
                threads[i] = ngx.thread.spawn(t.get, gw, "/", 10000)
            end
            local busy = t.poll(function() local _, inflight = totals(status()) return inflight == 20 end, 6)
            ngx.shared.ctl:set("hold", 0.001)
            -- Kill the worker that is not running this handler.
            local me, victim = ngx.worker.pid(), nil
            t.poll(function() local pid = status().worker.pid if pid ~= me then victim = pid end return victim end, 5)
            assert(os.execute("kill -9 " .. victim) == 0)
            local ok_count, broken = 0, 0
            for i = 1, #threads do
                local _, code = ngx.thread.wait(threads[i])
                if code == 200 then ok_count = ok_count + 1 else broken = broken + 1 end
            end
            -- The master forks a replacement; its init_worker reclaims the dead worker's in-flight column.
            local settled = t.poll(function()
                local st = status()
                local _, inflight = totals(st)
                return st.worker.pid ~= victim and inflight == 0
            end, 10)
            local _, inflight = totals(status())
            ngx.log(ngx.NOTICE, "kill -9: ", ok_count, " completed, ", broken, " broken with the worker, in flight now ", inflight)
            ngx.say("20 in flight before the kill ", busy)
            ngx.say("some requests died with the worker ", broken > 0 and broken < 20)
            ngx.say("in flight back to 0 ", settled)
            ngx.say("statistics kept ", (totals(status())) >= done)
        } }
_EOC_
--- request
GET /t
--- timeout: 30
--- response_body
20 in flight before the kill true
some requests died with the worker true
in flight back to 0 true
statistics kept true
