# vim:set ft= ts=4 sw=4 et:
# tools/orchestrator end to end, with a real etcd: a signed scaling webhook starts backend processes, registers them
# in etcd, and the gateway sends them traffic without reload; a replayed idempotency key, a bad signature and a
# deposed leader's fencing token change nothing; a scale-down drains the instances (their in-flight requests finish
# with 200) before their processes stop; SIGTERM stops every backend and deregisters it.

use lib 't';
use Autoscale;

workers(2);
worker_connections(1024); # the gateway, its backends and their keepalive connections share the workers
master_on();

our $Have_etcd = grep { -x "$_/etcd" } split /:/, $ENV{PATH};
diag("etcd not found (Debian package etcd-server): skipped") unless $Have_etcd;

# etcd on 26710/26711, the orchestrator on 26720, its backends on 26730-26733 (control ports 26740-26743) for "api"
# (registered in etcd) and on 26734-26736 (control ports 26744-26746) for "pool" (the gateway's standby pool).
$ENV{AUTOSCALE_T_ADMIN_TOKEN} = 'orchestrator-test-token-0123456789';

our $HttpConfig = <<'_EOC_';
    lua_socket_log_errors off;
    init_by_lua_block {
        autoscale = require "resty.autoscale"
        autoscale.configure { upstreams = { api = {
            peers = { "127.0.0.1:26730" }, retries = 0,
            discovery = { keep_static = false, drain_timeout = 10,
                          etcd = { endpoints = { "http://127.0.0.1:26710" }, prefix = "/svc/api/", interval = 0.2 } },
        }, pool = {
            peers = { "127.0.0.1:26734" }, retries = 0,
            discovery = { standby = { "127.0.0.1:26735", "127.0.0.1:26736" }, drain_timeout = 10 },
        } } }
        -- the orchestrator activates standby peers through the discovery handler: a state change, so it
        -- needs the admin API's token
        autoscale.admin { token_env = "AUTOSCALE_T_ADMIN_TOKEN", allow = { "127.0.0.1" } }
    }
    init_worker_by_lua_block { autoscale.init_worker() }
    upstream api {
        server 0.0.0.1;
        balancer_by_lua_block { autoscale.balance("api") }
        keepalive 16;
    }
    upstream pool {
        server 0.0.0.1;
        balancer_by_lua_block { autoscale.balance("pool") }
    }
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_5 reuseport;
        location = /discovery { content_by_lua_block { autoscale.discovery_handler() } }
        location /pool {
            proxy_pass http://pool;
            log_by_lua_block { autoscale.log() }
        }
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

=== TEST 1: webhook -> processes -> etcd -> traffic, and back down with a graceful drain
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
            os.execute("rm -rf " .. dir .. "etcd-data")
            process.write(dir .. "secret", "s3cret\n")
            process.write(dir .. "admin.token", "orchestrator-test-token-0123456789")
            process.write(dir .. "orchestrator.json", cjson.encode {
                listen = "127.0.0.1:26720", secret_file = dir .. "secret",
                services = { api = { ports = "26730-26733", ctl_offset = 10, initial = 1, min = 1, drain = 1.5,
                                     settings = { latency_ms = 1 },
                                     register = { etcd = "http://127.0.0.1:26710", prefix = "/svc/api/" } },
                             pool = { ports = "26734-26736", ctl_offset = 10, initial = 1, min = 1, drain = 1,
                                      register = { standby = "http://127.0.0.1:" .. gw .. "/discovery",
                                                   upstream = "pool", static = 1,
                                                   token_file = dir .. "admin.token" } } },
            })

            local function sign(body) -- the reference HMAC-SHA256: Python's hmac module
                process.write(dir .. "body.json", body)
                local f = io.popen("python3 -c 'import hmac, hashlib, sys; print(hmac.new(open(sys.argv[1], \"rb\").read().strip(),"
                                   .. " open(sys.argv[2], \"rb\").read(), hashlib.sha256).hexdigest())' "
                                   .. dir .. "secret " .. dir .. "body.json")
                local hex = f:read("*l")
                f:close()
                return "sha256=" .. hex
            end
            local seq = 0
            local function webhook(desired, token, opts) -- a decision as the scaler sends it
                opts = opts or {}
                seq = seq + 1
                local key = opts.key or ("api-" .. token .. "-" .. seq)
                local body = cjson.encode { service = opts.service or "api", current = 0, desired = desired,
                                            reason = "test", decision_id = "gw1-api-" .. seq, idempotency_key = key,
                                            gateway = "gw1", fencing_token = token, ts = ngx.now() }
                local code, reply = t.request { port = 26720, method = "POST", path = "/", body = body, timeout = 20000,
                    headers = { ["Content-Type"] = "application/json", ["Idempotency-Key"] = key,
                                ["X-Autoscale-Signature"] = opts.signature or sign(body) } }
                return code, reply and cjson.decode(reply), key
            end
            local function backend(status, body, headers) return headers["x-backend"] end
            local function served_by(names, timeout, path) -- poll in bursts until every backend in `names` answered
                local seen = {}
                return t.poll(function()
                    local res = t.load { port = gw, path = path or "/", concurrency = 4, requests = 16, key = backend }
                    for name in pairs(res.by_key) do seen[name] = true end
                    for _, name in ipairs(names) do
                        if not seen[name] then return false end
                    end
                    return true
                end, timeout or 5)
            end
            local function peers()
                local out = {}
                for _, p in ipairs(autoscale.status("api").peers) do
                    if p.state ~= "draining" then out[#out + 1] = p.addr:match(":(%d+)$") end
                end
                table.sort(out)
                return table.concat(out, ",")
            end
            local function calls() return cjson.decode((select(2, t.get(26720, "/calls")))) end

            local etcd, orch
            local ok, err = pcall(function()
                etcd = process.etcd(dir, 26710)
                orch = process.start("python3 $TEST_NGINX_REPO/tools/orchestrator --config " .. dir .. "orchestrator.json",
                                     dir .. "orchestrator.log")
                assert(t.poll(function() return t.get(26720, "/state", 500) == 200 end, 10),
                       "orchestrator did not start: " .. process.read(dir .. "orchestrator.log"))
                assert(served_by { "api-26730" }, "the first instance serves no traffic")
                ngx.say("booted: ", peers())

                local code, r, key = webhook(3, 1)
                ngx.update_time()
                local t0 = ngx.now()
                local both = served_by({ "api-26731", "api-26732" }, 5)
                ngx.update_time()
                ngx.log(ngx.NOTICE, "registered in etcd to traffic on both new instances: ", ngx.now() - t0, " s")
                ngx.say("scale to 3: ", code, " running ", table.concat(r.running, ","), "; both new ones serve within 1 s: ",
                        both and ngx.now() - t0 < 1, "; peers ", peers())

                local code2, r2 = webhook(3, 1, { key = key })
                local c = calls()
                ngx.say("replayed key: ", code2, " same answer ", cjson.encode(r2) == cjson.encode(r), "; calls ", c.calls,
                        ", applied ", c.applied, ", replayed ", c.replayed, ", by token ", c.by_token.api["1"])
                ngx.say("bad signature: ", (webhook(4, 1, { signature = "sha256=00" })))
                ngx.say("stale fencing token: ", (webhook(4, 0)))
                ngx.say("unknown service: ", (webhook(4, 1, { service = "web" })))
                ngx.say("after the refusals: ", cjson.encode(cjson.decode((select(2, t.get(26720, "/state")))).api.running),
                        ", applied ", calls().applied)

                -- scale down while the instances that go hold requests (they answer after 0.5 s)
                for _, port in ipairs { 26741, 26742 } do
                    local code, body = t.get(port, "/set?latency_ms=500")
                    assert(code == 200, "control port " .. port .. ": " .. tostring(code) .. " " .. tostring(body))
                end
                local load = ngx.thread.spawn(t.load, { port = gw, path = "/", concurrency = 6, requests = 24, key = backend })
                assert(t.poll(function()
                    local p = t.peer(autoscale.status("api"), "127.0.0.1:26732")
                    return p and p.inflight >= 1
                end, 5), "no request in flight on 26732")
                code, r = webhook(1, 2)
                local _, res = ngx.thread.wait(load)
                assert(t.poll(function() return peers() == "26730" end, 5), "not drained: " .. peers())
                local gone = t.poll(function()
                    return not process.listening(26731) and not process.listening(26732)
                end, 10)
                ngx.say("scale to 1: ", code, " running ", table.concat(r.running, ","), "; load ", res.total, " requests, ",
                        res.errors, " errors; peers ", peers(), "; processes stopped ", gone)

                -- the same for a service whose instances are the gateway's standby peers
                local function pool() return autoscale.discovery.state("pool").standby end
                code, r = webhook(3, 1, { service = "pool" })
                local served = served_by({ "pool-26735", "pool-26736" }, 5, "/pool")
                ngx.say("pool to 3: ", code, " running ", table.concat(r.running, ","), "; standby active ", pool().active,
                        "; both serve ", served)
                code, r = webhook(1, 2, { service = "pool" })
                local out = t.poll(function() return pool().active == 0 and pool().draining == 0 end, 5)
                gone = t.poll(function() return not process.listening(26735) and not process.listening(26736) end, 10)
                res = t.load { port = gw, path = "/pool", concurrency = 4, requests = 40, key = backend }
                ngx.say("pool to 1: ", code, " running ", table.concat(r.running, ","), "; standby drained and removed ", out,
                        "; processes stopped ", gone, "; 40 requests to pool-26734 ", res.by_key["pool-26734"] == 40)
            end)
            -- SIGTERM to the orchestrator alone: it deregisters and stops its children itself
            local stopped = orch and orch:signal("TERM") and t.poll(function() return not orch:alive() end, 10)
            if orch then orch:stop() end
            local left = 0
            for port = 26730, 26736 do left = left + (process.listening(port) and 1 or 0) end
            local _, keys = t.request { port = 26710, method = "POST", path = "/v3/kv/range",
                                        body = cjson.encode { key = ngx.encode_base64("/svc/api/"),
                                                              range_end = ngx.encode_base64("/svc/api0") } }
            ngx.say("SIGTERM: orchestrator gone ", stopped, ", backends left ", left, ", keys left ",
                    keys and (cjson.decode(keys).count or "0"))
            if etcd then etcd:stop() end
            if not ok then
                ngx.say("FAILED: ", err)
            end
        }
    }
--- log_level: notice
--- request
GET /t
--- timeout: 90
--- response_body
booted: 26730
scale to 3: 200 running 26730,26731,26732; both new ones serve within 1 s: true; peers 26730,26731,26732
replayed key: 200 same answer true; calls 2, applied 1, replayed 1, by token 2
bad signature: 401
stale fencing token: 409
unknown service: 404
after the refusals: [26730,26731,26732], applied 1
scale to 1: 200 running 26730; load 24 requests, 0 errors; peers 26730; processes stopped true
pool to 3: 200 running 26734,26735,26736; standby active 2; both serve true
pool to 1: 200 running 26734; standby drained and removed true; processes stopped true; 40 requests to pool-26734 true
SIGTERM: orchestrator gone true, backends left 0, keys left 0
--- no_error_log
[error]
