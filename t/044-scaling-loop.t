# vim:set ft= ts=4 sw=4 et:
# The whole loop on one machine: the scaler's signed webhook reaches tools/orchestrator, which starts backend
# processes (lab/backend.py) and activates them in the gateway's standby pool; the gateway sees them (pending ends)
# and sends them traffic. Figures: step -> call, and appearing in discovery -> first request.

use lib 't';
use Autoscale;
require './t/lib/scaling_ports.pl';
scaling_ports('ORCH');

# Four consecutive free ports for the backends and the four control ports 10 above them.
our $Base;
for my $b (map { 26500 + 20 * $_ } 0 .. 4) {
    my $free = 1;
    for my $p ($b .. $b + 3, $b + 10 .. $b + 13) {
        my $s = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => $p, Listen => 1);
        if ($s) { close $s } else { $free = 0; last }
    }
    if ($free) { $Base = $b; last }
}
die "no free backend ports\n" unless $Base;
$ENV{"TEST_NGINX_B$_"} = $Base + $_ for 0 .. 3;

workers(1);
worker_connections(1024);
master_on();

$ENV{AUTOSCALE_T_ADMIN_TOKEN} = 'orchestrator-test-token-0123456789';

our $HttpConfig = <<'_EOC_';
    lua_shared_dict autoscale_scaling 1m;
    lua_socket_log_errors off;
    init_by_lua_block {
        autoscale = require "resty.autoscale"
        autoscale.configure { upstreams = { pool = {
            peers = { "127.0.0.1:$TEST_NGINX_B0" }, retries = 0,
            discovery = { standby = { "127.0.0.1:$TEST_NGINX_B1", "127.0.0.1:$TEST_NGINX_B2", "127.0.0.1:$TEST_NGINX_B3" },
                          drain_timeout = 5 },
            -- 3 in flight per instance is on target
            scaling = { min = 1, max = 4, utilization = { capacity = 4, target = 0.75 }, provision_timeout = 10,
                        actuator = { type = "webhook", url = "http://127.0.0.1:$TEST_NGINX_ORCH_PORT/",
                                     secret = "0123456789abcdef-secret" } },
        } } }
        -- the orchestrator activates standby peers through the discovery handler: a state change, so it
        -- needs the admin API's token
        autoscale.admin { token_env = "AUTOSCALE_T_ADMIN_TOKEN", allow = { "127.0.0.1" } }
    }
    init_worker_by_lua_block { autoscale.init_worker() }
    upstream pool { server 0.0.0.1; balancer_by_lua_block { autoscale.balance("pool") } }
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_5;
        location = /discovery { content_by_lua_block { autoscale.discovery_handler() } }
        location / { proxy_pass http://pool; log_by_lua_block { autoscale.log() } }
    }
_EOC_

run_tests();

__DATA__

=== TEST 1: 1x -> 4x load on 1 instance: webhook, new processes in the standby pool, traffic to them, pending ends
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
        process.write(dir .. "secret", "0123456789abcdef-secret")
        process.write(dir .. "admin.token", "orchestrator-test-token-0123456789")
        process.write(dir .. "orchestrator.json", cjson.encode {
            listen = "127.0.0.1:$TEST_NGINX_ORCH_PORT", secret_file = dir .. "secret",
            services = { pool = { ports = "$TEST_NGINX_B0-$TEST_NGINX_B3", ctl_offset = 10, initial = 1, min = 1,
                                  drain = 1, settings = { latency_ms = 50 },
                                  register = { standby = "http://127.0.0.1:" .. gw .. "/discovery", upstream = "pool",
                                               static = 1, token_file = dir .. "admin.token" } } },
        })
        local function serving()
            local n, used = 0, 0
            for _, p in ipairs(autoscale.status("pool").peers) do
                if p.state ~= "draining" and p.state ~= "retired" then
                    n = n + 1
                    if p.addr ~= "127.0.0.1:$TEST_NGINX_B0" and p.totals.requests > 0 then used = used + 1 end
                end
            end
            return n, used
        end
        local orch = process.start("python3 $TEST_NGINX_REPO/tools/orchestrator --config " .. dir .. "orchestrator.json",
                                   dir .. "orchestrator.log", 60)
        local ok, err = pcall(function()
            assert(t.poll(function() return t.get($TEST_NGINX_ORCH_PORT, "/state", 500) == 200 end, 10),
                   "orchestrator did not start: " .. process.read(dir .. "orchestrator.log"))
            assert(t.poll(function() return t.get(gw, "/") == 200 end, 5), "the first instance serves nothing")
            local calm = t.load { port = gw, path = "/", concurrency = 2, duration = 2 } -- 1x: 2 in flight
            local calls_1x = cjson.decode((select(2, t.get($TEST_NGINX_ORCH_PORT, "/calls")))).calls
            local step = now()
            local busy = ngx.thread.spawn(t.load, { port = gw, path = "/", concurrency = 8, duration = 6 }) -- 4x
            local t_call, t_seen, t_used
            t.poll(function()
                local c = cjson.decode((select(2, t.get($TEST_NGINX_ORCH_PORT, "/calls"))))
                if not t_call and c.calls > calls_1x then t_call = now() end
                local n, used = serving()
                if not t_seen and n > 1 then t_seen = now() end
                if t_seen and not t_used and used > 0 then t_used = now() end
                return t_used ~= nil
            end, 5)
            local res = select(2, assert(ngx.thread.wait(busy)))
            local st = autoscale.scaling.state("pool")
            local n = serving()
            ngx.log(ngx.WARN, string.format("webhook %.2f s after the step; peers appeared %.2f s after it; "
                    .. "first request to a new one %.2f s after they appeared", (t_call or 99) - step,
                    (t_seen or 99) - step, (t_used or 99) - (t_seen or 0)))
            ngx.say("client errors: ", calm.errors + res.errors, ", calls during 1x: ", calls_1x)
            ngx.say("webhook within 2 s of the step: ", t_call ~= nil and t_call - step <= 2)
            ngx.say("new instance served within 1 s of appearing: ", t_used ~= nil and t_used - t_seen <= 1)
            ngx.say("serving now = desired (3 for 8 in flight): ", n == st.desired and n == 3, ", pending: ", st.pending)
        end)
        orch:stop()
        assert(ok, err)
    }
}
--- request
GET /t
--- timeout: 40
--- response_body
client errors: 0, calls during 1x: 0
webhook within 2 s of the step: true
new instance served within 1 s of appearing: true
serving now = desired (3 for 8 in flight): true, pending: false
--- no_error_log
[error]
