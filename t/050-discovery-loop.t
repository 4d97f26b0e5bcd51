# vim:set ft= ts=4 sw=4 et:
# The whole loop on one machine: load on a service held by one instance -> the gateway's scaler decides -> a signed
# webhook -> tools/orchestrator starts backend processes and registers them in a real etcd -> discovery -> the new
# instances take traffic, without reload and without a failed client request.

use lib 't';
use Autoscale;

workers(2);
worker_connections(1024); # the gateway, its backends and their keepalive connections share the workers
master_on();

our $Have_etcd = grep { -x "$_/etcd" } split /:/, $ENV{PATH};
diag("etcd not found (Debian package etcd-server): skipped") unless $Have_etcd;

# etcd on 26712/26713, the orchestrator on 26722, its backends on 26760-26763 (control ports 26770-26773).
our $HttpConfig = <<'_EOC_';
    lua_shared_dict autoscale_scaling 1m;
    lua_socket_log_errors off;
    init_by_lua_block {
        autoscale = require "resty.autoscale"
        autoscale.configure { upstreams = { api = {
            peers = { "127.0.0.1:26760" },
            discovery = { keep_static = false,
                          etcd = { endpoints = { "http://127.0.0.1:26712" }, prefix = "/loop/api/", interval = 0.2 } },
            -- 3 requests in flight per instance is on target
            scaling = { min = 1, max = 4, utilization = { capacity = 4, target = 0.75 }, scale_up_window = 0.5,
                        cooldown = 1, provision_timeout = 30,
                        actuator = { type = "webhook", url = "http://127.0.0.1:26722/scale", secret = "loop-secret-0123456789" } },
        } } }
    }
    init_worker_by_lua_block { autoscale.init_worker() }
    upstream api {
        server 0.0.0.1;
        balancer_by_lua_block { autoscale.balance("api") }
        keepalive 32;
    }
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_5 reuseport;
        location / {
            proxy_pass http://api;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            log_by_lua_block { autoscale.log() }
        }
    }
_EOC_

run_tests();

__DATA__

=== TEST 1: a load step scales the service up through the orchestrator and etcd, and the new instances serve
--- skip_eval: 3: !$::Have_etcd
--- http_config eval: $::HttpConfig
--- config
    location = /t {
        content_by_lua_block {
            local t = require "autoscale_test"
            local process = require "autoscale_process"
            local cjson = require "cjson"
            local gw = $TEST_NGINX_RAND_PORT_5
            local dir = ngx.config.prefix() .. "logs/"
            local function now() ngx.update_time() return ngx.now() end
            os.execute("rm -rf " .. dir .. "etcd-data")
            process.write(dir .. "secret", "loop-secret-0123456789")
            process.write(dir .. "orchestrator.json", cjson.encode {
                listen = "127.0.0.1:26722", secret_file = dir .. "secret",
                services = { api = { ports = "26760-26763", ctl_offset = 10, initial = 1, min = 1, drain = 1,
                                     settings = { latency_ms = 50 },
                                     register = { etcd = "http://127.0.0.1:26712", prefix = "/loop/api/" } } },
            })
            local function running()
                local code, body = t.get(26722, "/state", 1000)
                return code == 200 and #cjson.decode(body).api.running or 0
            end

            local etcd, orch
            local ok, err = pcall(function()
                etcd = process.etcd(dir, 26712)
                orch = process.start("python3 $TEST_NGINX_REPO/tools/orchestrator --config " .. dir .. "orchestrator.json",
                                     dir .. "orchestrator.log")
                assert(t.poll(function() return running() == 1 end, 10),
                       "orchestrator did not start: " .. process.read(dir .. "orchestrator.log"))

                -- 12 clients on one instance of 50 ms: 12 in flight against a target of 3
                local first, up = {}, {}
                local step = now()
                local watcher = ngx.thread.spawn(function()
                    while now() - step < 8 do
                        local n = running()
                        for k = 2, n do up[k] = up[k] or now() end
                        ngx.sleep(0.05)
                    end
                end)
                local res = t.load { port = gw, path = "/", concurrency = 12, duration = 8, timeout = 5000,
                                     key = function(status, body, headers)
                                         local name = headers["x-backend"]
                                         if name then first[name] = first[name] or now() end
                                         return name
                                     end }
                ngx.thread.wait(watcher)
                local c = cjson.decode((select(2, t.get(26722, "/calls"))))
                local once = true
                for _, n in pairs(c.by_decision) do once = once and n == 1 end
                local served, late = 0, 0
                for port = 26761, 26763 do
                    local name = "api-" .. port
                    if first[name] then
                        served = served + 1
                        -- from the moment the orchestrator showed the instance running (registered just before)
                        local since = up[port - 26759]
                        if since and first[name] - since > 1 then late = late + 1 end
                    end
                end
                ngx.log(ngx.NOTICE, "load step to first scale-up action: ", up[2] and (up[2] - step) or "none",
                        " s; new instances first served at ", cjson.encode(first), "; running since ", cjson.encode(up))
                ngx.say("scaled up within 2 s of the step: ", up[2] ~= nil and up[2] - step <= 2)
                ngx.say("instances running: ", running(), "; new ones that served: ", served,
                        "; served later than 1 s after they ran: ", late)
                ngx.say("client requests: ", res.total > 500, ", errors ", res.errors, " (", tostring(res.first_error), ")")
                ngx.say("orchestrator: applied ", c.applied >= 1, ", each decision applied once ", once,
                        ", refused ", cjson.encode(c.refused))
            end)
            if orch then orch:stop() end
            if etcd then etcd:stop() end
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
scaled up within 2 s of the step: true
instances running: 4; new ones that served: 3; served later than 1 s after they ran: 0
client requests: true, errors 0 (nil)
orchestrator: applied true, each decision applied once true, refused {}
--- no_error_log
[error]
