# vim:set ft= ts=4 sw=4 et:
# The standby actuator: the scaler activates peers of the upstream's own standby pool (instances kept running out of
# rotation) when the load steps up, and deactivates them, drained, once the scale-down window has passed; no request
# fails on the way. A `standby` actuator without a standby pool is a configuration error.

use lib 't';
use Autoscale;

workers(2);
worker_connections(1024);
master_on();

# Four backends (ports 1-4) that answer their port after 50 ms: 4 clients keep ~4 requests in flight.
our $HttpConfig = <<'_EOC_';
    lua_shared_dict autoscale_scaling 1m;
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1;
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_2;
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_3;
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_4;
        location / { content_by_lua_block { ngx.sleep(0.05) ngx.say(ngx.var.server_port) } }
    }
    init_by_lua_block {
        autoscale = require "resty.autoscale"
        autoscale.configure { upstreams = { pool = {
            balancer = "round_robin", slow_start = 0, retries = 1,
            peers = { "127.0.0.1:$TEST_NGINX_RAND_PORT_1" },
            discovery = { standby = { "127.0.0.1:$TEST_NGINX_RAND_PORT_2", "127.0.0.1:$TEST_NGINX_RAND_PORT_3",
                                      "127.0.0.1:$TEST_NGINX_RAND_PORT_4" }, drain_timeout = 5 },
            -- 3 in flight per instance is on target; a short scale-down window for the test
            scaling = { min = 1, max = 4, utilization = { capacity = 4, target = 0.75 }, scale_down_window = 2,
                        cooldown = 0.5, actuator = { type = "standby" } },
        } } }
    }
    init_worker_by_lua_block { autoscale.init_worker() }
    upstream pool {
        server 0.0.0.1;
        balancer_by_lua_block { autoscale.balance("pool") }
        keepalive 16;
    }
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_5 reuseport;
        location / {
            proxy_pass http://pool;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            log_by_lua_block { autoscale.log() }
        }
    }
_EOC_

run_tests();

__DATA__

=== TEST 1: 1x -> 4x load: standby peers activated within 2 s and served at once; back to one after the window, drained
--- http_config eval: $::HttpConfig
--- config
location = /t {
    content_by_lua_block {
        local t = require "autoscale_test"
        local gw = $TEST_NGINX_RAND_PORT_5
        local function now() ngx.update_time() return ngx.now() end
        local function serving()
            local n, used = 0, 0
            for _, p in ipairs(autoscale.status("pool").peers) do
                if p.state ~= "draining" and p.state ~= "retired" then
                    n = n + 1
                    if p.addr ~= "127.0.0.1:$TEST_NGINX_RAND_PORT_1" and p.totals.requests > 0 then used = used + 1 end
                end
            end
            return n, used
        end
        local calm = t.load { port = gw, path = "/", concurrency = 2, duration = 2 } -- 1x: 2 in flight
        local n_calm = serving()
        local step = now()
        local busy = ngx.thread.spawn(t.load, { port = gw, path = "/", concurrency = 8, duration = 5 }) -- 4x
        local t_seen, t_used
        t.poll(function()
            local n, used = serving()
            if not t_seen and n > 1 then t_seen = now() end
            if t_seen and not t_used and used > 0 then t_used = now() end
            return t_used ~= nil
        end, 5)
        local res = select(2, assert(ngx.thread.wait(busy)))
        local st = autoscale.scaling.state("pool")
        local n_busy = serving()
        local stop = now()
        -- the scale-down waits for the window (2 s) after the last high recommendation, then drains
        local t_down
        t.poll(function()
            if serving() == 1 then t_down = now() return true end
        end, 15)
        local pool = autoscale.discovery.state("pool").standby
        ngx.log(ngx.WARN, string.format("standby peers serving %.2f s after the step, first request to one %.2f s "
                .. "after that; back to 1 instance %.2f s after the load stopped", (t_seen or 99) - step,
                (t_used or 99) - (t_seen or 0), (t_down or 99) - stop))
        ngx.say("serving at 1x: ", n_calm, ", client errors: ", calm.errors + res.errors)
        ngx.say("activated within 2 s of the step: ", t_seen ~= nil and t_seen - step <= 2)
        ngx.say("a new peer served within 1 s: ", t_used ~= nil and t_used - t_seen <= 1)
        ngx.say("serving under 4x = desired (3 for 8 in flight): ", n_busy == 3 and st.desired == 3)
        -- the window counts from the last recommendation of 3 or more (the load may fade before the client stops)
        local t_high, t_first_down
        for _, d in ipairs(autoscale.scaling.decisions("pool", 1000)) do
            if (d.recommendation or 0) >= 3 then t_high = d.time end
        end
        for _, e in ipairs(autoscale.events(1000)) do
            if e.event == "scale_down" and not t_first_down then t_first_down = e.time end
        end
        ngx.log(ngx.WARN, string.format("first scale_down %.2f s after the last recommendation of 3+",
                (t_first_down or 0) - (t_high or 0)))
        ngx.say("scaled down, not before the window: ", t_down ~= nil and t_high ~= nil and t_first_down ~= nil
                and t_first_down - t_high >= 1.95)
        ngx.say("pool after: ", pool.active, " active")
        -- each action is one event: scale_up(s) from 1 up to 3 (one or two steps as the load ramps), then
        -- scale_down(s) back to 1
        local ups, downs, first, top, bottom = 0, 0, nil, 0, math.huge
        for _, e in ipairs(autoscale.events(1000)) do
            if e.event == "scale_up" then
                ups = ups + 1
                first = first or e
                top = math.max(top, e.desired)
            elseif e.event == "scale_down" then
                downs = downs + 1
                bottom = math.min(bottom, e.desired)
            end
        end
        ngx.say("events: scale_up ", ups >= 1, " from ", first and first.current, " up to ", top,
                ", scale_down ", downs >= 1, " down to ", bottom, ", upstream ", first and first.upstream)
    }
}
--- request
GET /t
--- timeout: 40
--- response_body
serving at 1x: 1, client errors: 0
activated within 2 s of the step: true
a new peer served within 1 s: true
serving under 4x = desired (3 for 8 in flight): true
scaled down, not before the window: true
pool after: 0 active
events: scale_up true from 1 up to 3, scale_down true down to 1, upstream pool
--- no_error_log
[error]



=== TEST 2: a standby actuator needs a standby pool
--- http_config
    init_by_lua_block {
        require("resty.autoscale").configure { upstreams = { api = { peers = { "127.0.0.1:1" },
            scaling = { utilization = { capacity = 4 }, actuator = { type = "standby" } } } } }
    }
--- config
    location = /t { return 200; }
--- must_die
--- error_log
upstreams.api.scaling.actuator.type: "standby" needs discovery.standby (the pool it activates)
