# vim:set ft= ts=4 sw=4 et:
# A worker killed with SIGKILL in the middle of a configuration change, under load: the writer is paused inside its
# critical section (the writer lock held, the upstream's seqlock odd) by the test hook AUTOSCALE_TEST_WRITER_PAUSE,
# then killed. The gateway keeps serving, the upkeep repairs what the dead writer left, the next change succeeds.

use lib 't';
use Autoscale;

workers(2);
worker_connections(1024);
master_on();

# The hook's file: while it exists, a configuration writer pauses in its critical section and writes its pid into
# "<file>.held". Per port, so parallel runs do not share it.
our $Pause = "/tmp/autoscale-writer-pause-" . ($ENV{TEST_NGINX_SERVER_PORT} // 1984);
$ENV{AUTOSCALE_TEST_WRITER_PAUSE} = $Pause;
unlink $Pause, "$Pause.held";

our $HttpConfig = <<'_EOC_';
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1;
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_2;
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_3;
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_4;
        location / { content_by_lua_block { ngx.say(ngx.var.server_port) } }
    }
    init_by_lua_block {
        autoscale = require "resty.autoscale"
        -- Window buckets of 0.4 s: the upkeep, which repairs what a killed writer left, runs every 0.2 s.
        local peers = { "127.0.0.1:$TEST_NGINX_RAND_PORT_1", "127.0.0.1:$TEST_NGINX_RAND_PORT_2" }
        autoscale.configure { window = { buckets = 10, bucket = 0.4 }, upstreams = { backend = { peers = peers } } }
    }
    init_worker_by_lua_block { autoscale.init_worker() }
    upstream backend {
        server 0.0.0.1;
        balancer_by_lua_block { autoscale.balance("backend") }
        # No keepalive: the backends are served by the same two workers, and a kept connection whose server side is
        # the paused worker would hang whoever reuses it.
    }
    # The gateway: a reuseport listener, where the kernel spreads connections over both workers (a worker that does
    # not run its event loop gets some), and a shared one, accepted by whichever worker is running.
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_5 reuseport;
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_6;
        location / {
            proxy_pass http://backend;
            log_by_lua_block { autoscale.log() }
        }
        location = /status { content_by_lua_block { autoscale.status_handler() } }
        # A configuration change, refused (409) on the worker named by ?not_on= so the test can aim at the other.
        location = /reconf {
            content_by_lua_block {
                if ngx.worker.pid() == tonumber(ngx.var.arg_not_on) then
                    ngx.status = 409
                    ngx.say("same worker")
                    return
                end
                local ok, err = autoscale.control.add_peer("backend", "127.0.0.1:" .. ngx.var.arg_port, 1)
                ngx.say(ok and "ok" or ("failed: " .. tostring(err)))
            }
        }
    }
_EOC_

run_tests();

__DATA__

=== TEST 1: SIGKILL of a worker paused inside a reconfiguration, under load: no client error on the running worker, repaired by the upkeep, the next change succeeds, no hung worker
--- main_config
env AUTOSCALE_TEST_WRITER_PAUSE;
--- http_config eval: $::HttpConfig
--- config
location = /t {
    content_by_lua_block {
        local t = require "autoscale_test"
        local shared, reuse = $TEST_NGINX_RAND_PORT_6, $TEST_NGINX_RAND_PORT_5
        local arm = assert(os.getenv("AUTOSCALE_TEST_WRITER_PAUSE"))
        local held = arm .. ".held"
        os.remove(arm)
        os.remove(held)
        local function exists(path)
            local f = io.open(path)
            if f then f:close() end
            return f ~= nil
        end
        local warm = t.load { port = reuse, concurrency = 4, requests = 200 }
        local me = ngx.worker.pid()

        -- Arm the hook and send the change until it lands on the other worker (which then pauses and never answers).
        assert(io.open(arm, "w")):close()
        local paused = false
        for _ = 1, 40 do
            ngx.thread.spawn(t.get, reuse, "/reconf?port=$TEST_NGINX_RAND_PORT_3&not_on=" .. me, 10000)
            if t.poll(function() return exists(held) end, 0.3) then
                paused = true
                break
            end
        end
        local f = paused and io.open(held)
        local victim = f and tonumber(f:read("*l"))
        if f then f:close() end
        -- The running worker answers its status at once; the upstream being changed answers busy.
        ngx.update_time()
        local asked = ngx.now()
        local during = t.status(shared).region
        local st, st_err = autoscale.status("backend")
        ngx.update_time()
        local status_s = ngx.now() - asked

        -- While the writer is paused (lock held, the upstream's seqlock odd), the running worker serves all new
        -- connections of the shared listener; then the writer is killed and the master forks a replacement.
        local pause_load = t.load { port = shared, concurrency = 4, duration = 0.5 }
        local load = ngx.thread.spawn(t.load, { port = shared, concurrency = 4, duration = 3, timeout = 2000 })
        ngx.sleep(0.2)
        if victim then
            assert(os.execute("kill -9 " .. victim) == 0)
        end
        os.remove(arm)

        -- The dead writer's lock is taken over and its upstream repaired by the running worker's upkeep.
        local region
        local repaired = t.poll(function()
            region = t.status(shared).region
            return region.writer == nil and region.writer_takeovers >= 1
        end, 5)
        local _, res = ngx.thread.wait(load)
        -- Every worker answers within a bound: the running one and the master's replacement.
        local answered, pids = 0, {}
        local all = t.poll(function()
            local code, body = t.get(reuse, "/status", 1000)
            if code == 200 then
                local pid = require("cjson").decode(body).worker.pid
                if pid ~= victim and not pids[pid] then
                    pids[pid], answered = true, answered + 1
                end
            end
            return answered == 2
        end, 10)
        local after = t.load { port = reuse, concurrency = 8, requests = 400 }
        -- The next change succeeds (no writer left in the way) and its peer serves.
        local ok, err = autoscale.control.add_peer("backend", "127.0.0.1:$TEST_NGINX_RAND_PORT_4", 1)
        local last = t.load { port = reuse, concurrency = 4, requests = 400 }
        os.remove(held)
        ngx.log(ngx.NOTICE, "crash test: victim ", victim, ", during the pause ", pause_load.total, " requests, ",
            pause_load.errors, " errors (", pause_load.first_error, "); through the kill ", res.total, ", ",
            res.errors, " errors (", res.first_error, "); repaired markers ", region.repaired_markers)

        ngx.say("warm errors ", warm.errors)
        ngx.say("writer paused in another worker ", paused and victim ~= me and during.writer ~= nil and during.writer.pid == victim)
        ngx.say("status while paused within 1 s ", status_s < 1, ", upstream: ", st and "answered" or st_err)
        ngx.say("while paused: errors ", pause_load.errors, ", served ", pause_load.total > 0)
        ngx.say("through the kill and the respawn: errors ", res.errors, ", served ", res.total > 0)
        ngx.say("lock taken over and repaired ", repaired, " ", region.repaired_markers >= 1)
        ngx.say("every worker answers ", all)
        ngx.say("after the respawn: errors ", after.errors)
        ngx.say("next change ", ok and "ok" or err, ", errors ", last.errors, ", new peer served ",
            (last.by_key["$TEST_NGINX_RAND_PORT_4\n"] or 0) > 0)
    }
}
--- request
GET /t
--- timeout: 40
--- response_body
warm errors 0
writer paused in another worker true
status while paused within 1 s true, upstream: upstream backend is being changed by another process; retry
while paused: errors 0, served true
through the kill and the respawn: errors 0, served true
lock taken over and repaired true true
every worker answers true
after the respawn: errors 0
next change ok, errors 0, new peer served true
--- no_error_log
[crit]
