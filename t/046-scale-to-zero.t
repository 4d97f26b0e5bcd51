# vim:set ft= ts=4 sw=4 et:
# Scale to zero and back, end to end with real processes: tools/orchestrator starts lab/backend.py instances on the
# signed scaling webhook and registers them in a real etcd, which the gateway's discovery reads. With no ready peer a
# request is held in the gateway (the fallback location, autoscale.fallback) instead of answered 502, the first held
# request wakes the scaler at once, and the held requests are released to the first instance; a full queue and a
# failing actuator give the fallback (503 + Retry-After); after idle_window the service goes back to zero.

use lib 't';
use Autoscale;

workers(2);
worker_connections(2048); # 200 held client connections, their proxied connections and the test's own
master_on();

our $Have_etcd = grep { -x "$_/etcd" } split /:/, $ENV{PATH};
diag("etcd not found (Debian package etcd-server): skipped") unless $Have_etcd;

# The processes' ports, derived from TEST_NGINX_SERVER_PORT: etcd P+0/P+1, the orchestrator P+2, the never-listening
# placeholder peer P+3, backends P+4..P+6 (control ports P+14..P+16).
{
    my $p = 10 * ($ENV{TEST_NGINX_SERVER_PORT} || 1984);
    $p -= 40000 while $p > 60000;
    $ENV{TEST_NGINX_Z_PORT} = $p;
    $ENV{"TEST_NGINX_Z${_}_PORT"} = $p + $_ for 1 .. 16;
}

our $HttpConfig = <<'_EOC_';
    lua_shared_dict autoscale_scaling 4m;
    lua_socket_log_errors off;
    init_by_lua_block {
        autoscale = require "resty.autoscale"
        autoscale.configure { upstreams = { api = {
            peers = { "127.0.0.1:$TEST_NGINX_Z3_PORT" }, retries = 0,
            discovery = { keep_static = false, drain_timeout = 1,
                          etcd = { endpoints = { "http://127.0.0.1:$TEST_NGINX_Z_PORT" }, prefix = "/svc/api/",
                                   interval = 0.05 } },
            fallback = { retry_after = 7 },
            scaling = { min = 0, max = 3, interval = 0.2, cooldown = 1, rps = { target = 100000 },
                        idle_window = ZERO_IDLE, provision_timeout = 10,
                        hold = { max_requests = ZERO_MAX, timeout = ZERO_TIMEOUT, release_rate = 2000 },
                        actuator = { type = "webhook", url = "http://127.0.0.1:$TEST_NGINX_Z2_PORT/",
                                     secret = "0123456789abcdef-zero", retries = 2, backoff = 0.1, timeout = 3 } },
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
        location = /scaling { content_by_lua_block { autoscale.scaling_handler() } }
        location = /metrics { content_by_lua_block { autoscale.prometheus_handler() } }
        location / {
            proxy_pass http://api;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            recursive_error_pages on;
            error_page 502 504 = @api_fallback;
            log_by_lua_block { autoscale.log() }
        }
        location @api_fallback { content_by_lua_block { autoscale.fallback("api") } }
    }
_EOC_

our $Helpers = <<'_EOC_';
    local t = require "autoscale_test"
    local process = require "autoscale_process"
    local cjson = require "cjson"
    local gw = $TEST_NGINX_RAND_PORT_5
    local dir = ngx.config.prefix() .. "logs/"
    local ORCH = $TEST_NGINX_Z2_PORT
    os.execute("rm -rf " .. dir .. "etcd-data")
    process.write(dir .. "secret", "0123456789abcdef-zero\n")
    process.write(dir .. "orchestrator.json", cjson.encode {
        listen = "127.0.0.1:" .. ORCH, secret_file = dir .. "secret",
        services = { api = { ports = "$TEST_NGINX_Z4_PORT-$TEST_NGINX_Z6_PORT", ctl_offset = 10, initial = 0, min = 0,
                             drain = 0.5, settings = { latency_ms = 2 },
                             register = { etcd = "http://127.0.0.1:$TEST_NGINX_Z_PORT", prefix = "/svc/api/" } } },
    })
    local function ready() -- peers taking traffic
        local n = 0
        for _, p in ipairs(autoscale.status("api").peers) do
            if p.state ~= "draining" then n = n + 1 end
        end
        return n
    end
    local function state() return cjson.decode((select(2, t.get(gw, "/scaling?service=api")))) end
    local function calls() return cjson.decode((select(2, t.get(ORCH, "/calls")))) end
    local function running() return #cjson.decode((select(2, t.get(ORCH, "/state")))).api.running end
    local function start_orchestrator()
        local orch = process.start("python3 $TEST_NGINX_REPO/tools/orchestrator --config " .. dir .. "orchestrator.json",
                                   dir .. "orchestrator.log")
        assert(t.poll(function() return t.get(ORCH, "/state", 500) == 200 end, 10),
               "orchestrator did not start: " .. process.read(dir .. "orchestrator.log"))
        return orch
    end
    -- n requests, spread evenly over `spread` seconds, each from its own light thread: statuses, latencies, headers
    local function burst(n, spread)
        local out, threads = { status = {}, latency = {}, retry_after = {}, sent = {} }, {}
        ngx.update_time()
        local t0 = ngx.now()
        for i = 1, n do
            threads[i] = ngx.thread.spawn(function()
                ngx.update_time()
                local s = ngx.now()
                out.sent[i] = s
                local status, _, headers = t.request { port = gw, path = "/", timeout = 20000 }
                ngx.update_time()
                out.status[i], out.latency[i] = status or 0, ngx.now() - s
                out.retry_after[i] = headers and headers["retry-after"]
            end)
            if spread > 0 then ngx.sleep(spread / n) end
        end
        for i = 1, n do ngx.thread.wait(threads[i]) end
        out.t0 = t0
        return out
    end
    -- runs fn(procs) with etcd started, then stops every process it started (procs.orch too), and reports a failure
    local function with_etcd(fn)
        local procs = {}
        local ok, err = pcall(function()
            procs.etcd = process.etcd(dir, $TEST_NGINX_Z_PORT)
            assert(t.poll(function() return ready() == 0 end, 10), "the placeholder peer was not drained")
            fn(procs)
        end)
        if procs.orch then procs.orch:stop() end
        if procs.etcd then procs.etcd:stop() end
        if not ok then ngx.say("FAILED: ", err) end
    end
    local function tally(res)
        local by = {}
        for _, s in ipairs(res.status) do by[s] = (by[s] or 0) + 1 end
        local keys = {}
        for s, c in pairs(by) do keys[#keys + 1] = s .. "x" .. c end
        table.sort(keys)
        return table.concat(keys, " ")
    end
_EOC_

run_tests();

__DATA__

=== TEST 1: from zero, 200 requests in 1 s: none lost, the actuator called at once; idle back to zero and again up
--- skip_eval: 3: !$::Have_etcd
--- http_config eval: my $c = $::HttpConfig; $c =~ s/ZERO_IDLE/2/; $c =~ s/ZERO_MAX/250/; $c =~ s/ZERO_TIMEOUT/10/; $c
--- config eval
"location = /t { content_by_lua_block { $::Helpers " . <<'_EOC_';
    with_etcd(function(procs)
        procs.orch = start_orchestrator()
        ngx.say("at zero: ready ", ready(), ", running ", running())

        local res = burst(200, 1)
        local c = calls()
        local first = c.log[1]
        local max_lat, first_lat = 0, res.latency[1]
        for _, l in ipairs(res.latency) do max_lat = math.max(max_lat, l) end
        local wake = first.at - res.sent[1]
        local start = first.done - first.at
        local added -- when the gateway had the new peer (its peer_added event)
        for _, e in ipairs(autoscale.events(100)) do
            if e.event == "peer_added" and e.peer == "127.0.0.1:$TEST_NGINX_Z4_PORT" then added = added or e.time end
        end
        ngx.log(ngx.NOTICE, string.format("scale from zero: actuator called %.1f ms after the first request; "
            .. "instance started and registered %.0f ms later; peer in the gateway %.0f ms after the first request; "
            .. "first request answered after %.0f ms; slowest %.0f ms", wake * 1000, start * 1000,
            (added - res.sent[1]) * 1000, first_lat * 1000, max_lat * 1000))
        ngx.say("burst: ", tally(res), "; actuator calls ", c.applied, " desired ", first.desired,
                "; called within 50 ms ", wake <= 0.05,
                "; first answer within 100 ms of the peer ", first_lat <= added - res.sent[1] + 0.1)
        local st = state()
        local held = st.hold.total
        ngx.say("hold: held now ", st.hold.held, ", some held ", held >= 1, ", all released ", st.hold.released == held,
                ", timeouts ", st.hold.timeouts, ", rejected ", st.hold.rejected,
                "; episodes ", #st.episodes, " ", st.episodes[1].event, " ", st.episodes[2].event,
                ", cold start > 0 ", st.cold_start.last > 0)

        -- idle for idle_window (2 s): back to zero
        assert(t.poll(function() return running() == 0 and ready() == 0 end, 10), "not scaled to zero")
        st = state()
        ngx.say("idle: running ", running(), ", ready ", ready(), ", desired ", st.desired, ", idle decided ",
                st.decisions_total > 0 and (st.reason == "idle" or st.reason == "zero"))
        local status = t.request { port = gw, path = "/", timeout = 20000 }
        ngx.say("next request: ", status, ", running ", running(), ", applied ", calls().applied)
        local _, metrics = t.get(gw, "/metrics")
        local kinds = {}
        for _, e in ipairs(autoscale.events(200)) do
            if e.event:find("^activat") then
                kinds[#kinds + 1] = e.event .. (e.event == "activated" and (e.cold_start > 0 and "(cold_start > 0)" or "(0)")
                                                or "")
            end
        end
        ngx.say("events: ", table.concat(kinds, " "))
        ngx.say("metrics: released = held + 1 ", tonumber(metrics:match(
                    'autoscale_hold_requests_total{upstream="api",outcome="released"} (%d+)')) == held + 1,
                ", observed = released ", metrics:match('autoscale_hold_seconds_count{upstream="api"} (%d+)')
                    == metrics:match('autoscale_hold_requests_total{upstream="api",outcome="released"} (%d+)'),
                ", cold starts ", metrics:match('autoscale_scaling_cold_start_seconds_count{upstream="api"} (%d+)'))
        process.write(dir .. "scrape.prom", metrics)
        local out = "rc=0" -- without promtool (Debian package prometheus) the scrape is not linted
        local have = os.execute("command -v promtool >/dev/null")
        if have == 0 or have == true then
            local promtool = io.popen("promtool check metrics < " .. dir .. "scrape.prom 2>&1; echo rc=$?")
            out = promtool:read("*a")
            promtool:close()
        end
        ngx.say("promtool: ", out:match("rc=(%d+)"), " ", (out:gsub("rc=%d+%s*$", "")))
    end)
} }
_EOC_
--- log_level: notice
--- request
GET /t
--- timeout: 60
--- response_body
at zero: ready 0, running 0
burst: 200x200; actuator calls 1 desired 1; called within 50 ms true; first answer within 100 ms of the peer true
hold: held now 0, some held true, all released true, timeouts 0, rejected 0; episodes 2 activating activated, cold start > 0 true
idle: running 0, ready 0, desired 0, idle decided true
next request: 200, running 1, applied 3
events: activating activated(cold_start > 0) activating activated(cold_start > 0)
metrics: released = held + 1 true, observed = released true, cold starts 2
promtool: 0 
--- no_error_log
[alert]
[crit]
actuator_failed
lua entry thread aborted



=== TEST 2: hold.max_requests = 50: the 51st gets the fallback at once; a failing actuator: the held ones get it within hold.timeout, then the next instance serves
--- skip_eval: 3: !$::Have_etcd
--- http_config eval: my $c = $::HttpConfig; $c =~ s/ZERO_IDLE/300/; $c =~ s/ZERO_MAX/50/; $c =~ s/ZERO_TIMEOUT/1/; $c
--- config eval
"location = /t { content_by_lua_block { $::Helpers " . <<'_EOC_';
    with_etcd(function(procs)
        -- no orchestrator yet: the webhook is refused (connection refused), retried after the backoff, fails
        local res = burst(60, 0)
        local fast, slow, late, ra = 0, 0, 0, 0
        for i, s in ipairs(res.status) do
            if s == 503 and res.latency[i] < 0.5 then fast = fast + 1 end
            if s == 503 and res.latency[i] >= 0.95 and res.latency[i] <= 1.2 then slow = slow + 1 end
            if res.latency[i] > 1.2 then late = late + 1 end
            if res.retry_after[i] == "7" then ra = ra + 1 end
        end
        local lats = {}
        for i, l in ipairs(res.latency) do lats[i] = string.format("%.3f", l) end
        table.sort(lats)
        ngx.log(ngx.NOTICE, "60 at once, latencies: ", table.concat(lats, " "))
        ngx.say("60 at once: ", tally(res), "; at once ", fast, ", after hold.timeout ", slow, ", later ", late,
                ", Retry-After ", ra)
        local st = state()
        ngx.say("hold: total ", st.hold.total, ", timeouts ", st.hold.timeouts, ", rejected ", st.hold.rejected,
                "; actuator failures ", st.actuator_failures, "; last episode ", st.episodes[#st.episodes].event)

        -- the client's own deadline (X-Request-Timeout, seconds) is shorter than hold.timeout
        ngx.update_time()
        local t1 = ngx.now()
        local code = t.request { port = gw, path = "/", headers = { ["X-Request-Timeout"] = "0.3" } }
        ngx.update_time()
        ngx.say("client deadline 0.3 s: ", code, " after 0.3-0.5 s ", ngx.now() - t1 >= 0.29 and ngx.now() - t1 < 0.5)

        -- the actuator comes back: after the cooldown the next held request brings an instance up
        procs.orch = start_orchestrator()
        local status
        assert(t.poll(function()
            status = t.request { port = gw, path = "/", timeout = 5000 }
            return status == 200
        end, 15), "no instance came up")
        ngx.say("actuator back: ", status, ", running ", running(), "; last episode ",
                state().episodes[#state().episodes].event)
    end)
} }
_EOC_
--- log_level: notice
--- request
GET /t
--- timeout: 60
--- response_body
60 at once: 503x60; at once 10, after hold.timeout 50, later 0, Retry-After 60
hold: total 50, timeouts 50, rejected 10; actuator failures 1; last episode activation_failed
client deadline 0.3 s: 503 after 0.3-0.5 s true
actuator back: 200, running 1; last episode activated
--- error_log
activation_failed



=== TEST 3: nginx -s reload while requests are held: they finish in the old workers (released to the instance that comes up), none is reset
--- skip_eval: 3: !$::Have_etcd
--- http_config eval: my $c = $::HttpConfig; $c =~ s/ZERO_IDLE/300/; $c =~ s/ZERO_MAX/50/; $c =~ s/ZERO_TIMEOUT/15/; $c
--- config eval
"location = /t { content_by_lua_block { $::Helpers " . <<'_EOC_';
    with_etcd(function(procs)
        local function children() -- the master's worker PIDs
            local f = assert(io.open(ngx.config.prefix() .. "logs/nginx.pid"))
            local master = f:read("*l")
            f:close()
            local p = io.popen("ps -o pid= --ppid " .. master)
            local out = p:read("*a")
            p:close()
            return out
        end
        local before = children()
        local res
        local load = ngx.thread.spawn(function() res = burst(10, 0) end)
        assert(t.poll(function() return require("resty.autoscale.hold").held("api") == 10 end, 5), "not held")
        t.reload(dir .. "reload.txt", "")
        assert(t.poll(function() return children() ~= before end, 10), "no new workers")
        ngx.say("reloaded with 10 held: new workers ", children() ~= before)
        procs.orch = start_orchestrator() -- the webhook has failed meanwhile: the new workers' scaler tries again
        ngx.thread.wait(load)
        ngx.say("held across the reload: ", tally(res))
    end)
} }
_EOC_
--- log_level: notice
--- request
GET /t
--- timeout: 60
--- response_body
reloaded with 10 held: new workers true
held across the reload: 200x10



=== TEST 4: SIGKILL of a worker that holds requests: its slot stops counting within 2 s, the bound is whole again
--- skip_eval: 3: !$::Have_etcd
--- http_config eval: my $c = $::HttpConfig; $c =~ s/ZERO_IDLE/300/; $c =~ s/ZERO_MAX/10/; $c =~ s/ZERO_TIMEOUT/12/; $c
--- config eval
"location = /t { content_by_lua_block { $::Helpers " . <<'_EOC_';
    with_etcd(function(procs)
        local hold = require "resty.autoscale.hold"
        local dict = ngx.shared.autoscale_scaling
        local me = ngx.worker.pid()
        local function other() -- the other worker's slot, when it holds something: pid, count
            for i = 1, 64 do
                local pid, n = dict:get("hold_owner:api:" .. i), dict:get("hold:api:" .. i)
                if pid and pid ~= me and n and n > 0 then return pid, n end
            end
        end
        local threads = {}
        local function send(n)
            for _ = 1, n do
                threads[#threads + 1] = ngx.thread.spawn(t.request, { port = gw, path = "/", timeout = 10000 })
            end
        end
        -- requests until the other worker holds some (the kernel spreads the connections over both)
        assert(t.poll(function()
            if hold.held("api") < 10 then send(1) end
            return other() ~= nil and hold.held("api") == 10
        end, 5), "the other worker holds nothing")
        local pid, n = other()
        os.execute("kill -KILL " .. pid)
        local reclaimed = t.poll(function() return hold.held("api") == 10 - n end, 4)
        ngx.say("killed a worker holding some: its share stopped counting ", reclaimed)
        local rejected = cjson.decode((select(2, t.get(gw, "/scaling?service=api")))).hold.rejected
        local extra = {}
        for i = 1, n do
            extra[i] = ngx.thread.spawn(t.request, { port = gw, path = "/", timeout = 10000 })
        end
        local full = t.poll(function() return hold.held("api") == 10 end, 3)
        local now_rejected = cjson.decode((select(2, t.get(gw, "/scaling?service=api")))).hold.rejected
        ngx.say("as many again are held: ", full, ", none rejected ", now_rejected == rejected)
        procs.orch = start_orchestrator()
        local statuses = {}
        for _, th in ipairs(extra) do
            local _, code = ngx.thread.wait(th)
            statuses[#statuses + 1] = code
        end
        for _, th in ipairs(threads) do ngx.thread.wait(th) end
        local ok200 = 0
        for _, c in ipairs(statuses) do if c == 200 then ok200 = ok200 + 1 end end
        ngx.say("the new ones served once the instance is up: ", ok200 == #statuses or table.concat(statuses, " "))
    end)
} }
_EOC_
--- log_level: notice
--- request
GET /t
--- timeout: 60
--- response_body
killed a worker holding some: its share stopped counting true
as many again are held: true, none rejected true
the new ones served once the instance is up: true



=== TEST 5: held requests are released at hold.release_rate, the most important admission class first
--- http_config
    lua_shared_dict autoscale_scaling 1m;
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1;
        location / { return 200 "ok\n"; }
    }
    init_by_lua_block {
        autoscale = require "resty.autoscale"
        autoscale.configure { upstreams = { api = {
            peers = { "127.0.0.1:$TEST_NGINX_RAND_PORT_1" }, retries = 0,
            admission = { classes = { { name = "gold", header = "X-Tier", value = "gold" }, { name = "default" } } },
            scaling = { min = 0, max = 1, rps = { target = 1000 }, hold = { timeout = 10, release_rate = 20 } },
        } } }
    }
    init_worker_by_lua_block { autoscale.init_worker() }
    upstream api {
        server 0.0.0.1;
        balancer_by_lua_block { autoscale.balance("api") }
    }
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_5;
        location / {
            proxy_pass http://api;
            add_header X-Worker $pid;   # which worker held and released it
            recursive_error_pages on;
            error_page 502 504 = @api_fallback;
            log_by_lua_block { autoscale.log() }
        }
        location @api_fallback { content_by_lua_block { autoscale.fallback("api") } }
    }
--- config
    location = /t {
        content_by_lua_block {
            local t = require "autoscale_test"
            local hold = require "resty.autoscale.hold"
            local gw, peer = $TEST_NGINX_RAND_PORT_5, "127.0.0.1:$TEST_NGINX_RAND_PORT_1"
            assert(autoscale.control.drain("api", peer)) -- no ready peer: requests are held
            local done, threads = {}, {}
            local function send(tier)
                threads[#threads + 1] = ngx.thread.spawn(function()
                    local status, _, h = t.request { port = gw, path = "/", timeout = 15000, headers = { ["X-Tier"] = tier } }
                    ngx.update_time()
                    done[#done + 1] = { tier = tier, status = status, at = ngx.now(), worker = h and h["x-worker"] }
                end)
            end
            for _ = 1, 6 do send("none") end
            assert(t.poll(function() return hold.held("api") == 6 end, 5), "not held")
            for _ = 1, 6 do send("gold") end
            assert(t.poll(function() return hold.held("api") == 12 end, 5), "not held")
            ngx.update_time()
            local t0 = ngx.now()
            assert(autoscale.control.enable("api", peer))
            for _, th in ipairs(threads) do ngx.thread.wait(th) end
            -- each worker releases its own held requests: in each, every gold one before any default one
            local ok, order, first = 0, {}, true
            local seen_default = {}
            for _, d in ipairs(done) do
                ok = ok + (d.status == 200 and 1 or 0)
                local w = d.worker or "?"
                order[#order + 1] = w .. ":" .. d.tier
                if d.tier == "none" then seen_default[w] = true
                elseif seen_default[w] then first = false end
            end
            local span = done[#done].at - t0
            ngx.log(ngx.NOTICE, "12 held requests released over ", span, " s in the order ", table.concat(order, " "))
            ngx.say("released: ", ok, " of 12 answered 200; gold ones first: ", first,
                    "; at 20/s, over 0.4-1.5 s: ", span >= 0.4 and span <= 1.5)
        }
    }
--- request
GET /t
--- timeout: 20
--- response_body
released: 12 of 12 answered 200; gold ones first: true; at 20/s, over 0.4-1.5 s: true
--- no_error_log
[alert]
[crit]
lua entry thread aborted



=== TEST 6: bad hold and idle options stop nginx with the field path and the reason
--- http_config
    lua_shared_dict autoscale_scaling 1m;
    init_by_lua_block {
        local config = require "resty.autoscale.config"
        local peers = { "127.0.0.1:1" }
        config_errors = {}
        for _, case in ipairs {
            { rps = { target = 10 }, min = 0, hold = { max_requests = 0 } },
            { rps = { target = 10 }, min = 0, hold = { timeout = "5" } },
            { rps = { target = 10 }, min = 0, hold = { deadline_header = "bad header" } },
            { rps = { target = 10 }, min = 0, hold = { release_rate = 0 } },
            { rps = { target = 10 }, min = 0, hold = { queue = 1 } },
            { rps = { target = 10 }, min = 0, hold = 5 },
            { rps = { target = 10 }, min = 1, idle_window = 60 },
            { rps = { target = 10 }, min = 0, idle_window = 0 },
        } do
            local _, err = config.validate { upstreams = { api = { peers = peers, scaling = case } } }
            config_errors[#config_errors + 1] = tostring(err)
        end
        local both = { peers = peers, fallback = { upstream = "spare" }, scaling = { rps = { target = 10 }, min = 0 } }
        local spare = { peers = peers }
        local c2 = config.validate { upstreams = { api = both, spare = spare } }
        config_errors[#config_errors + 1] = "fallback.upstream: hold " .. tostring(c2.upstreams.api.scaling.hold)
        both.scaling.hold = { timeout = 5 }
        config_errors[#config_errors + 1] = tostring(select(2, config.validate { upstreams = { api = both, spare = spare } }))
        local c = config.validate { upstreams = { api = { peers = peers, scaling = { rps = { target = 10 }, min = 0 } } } }
        local h = c.upstreams.api.scaling.hold
        config_errors[#config_errors + 1] = string.format("defaults: max_requests %d, timeout %d, header %s, idle %d",
            h.max_requests, h.timeout, h.deadline_header, c.upstreams.api.scaling.idle_window)
    }
--- config
    location = /t { content_by_lua_block { ngx.say(table.concat(config_errors, "\n")) } }
--- request
GET /t
--- response_body
upstreams.api.scaling.hold.max_requests: must be between 1 and 100000 (got 0)
upstreams.api.scaling.hold.timeout: must be a number (got string "5")
upstreams.api.scaling.hold.deadline_header: must be a header name (letters, digits, '-') or false (got "bad header")
upstreams.api.scaling.hold.release_rate: must be between 1 and 1000000 (got 0)
upstreams.api.scaling.hold.queue: unknown option (valid: deadline_header, max_requests, release_rate, timeout)
upstreams.api.scaling.hold: must be a table or false (got number)
upstreams.api.scaling.idle_window: scales to zero: needs min = 0 (got min = 1)
upstreams.api.scaling.idle_window: must be between 1 and 86400 (got 0)
fallback.upstream: hold false
upstreams.api.scaling.hold: cannot hold requests that fallback.upstream takes at once (remove one)
defaults: max_requests 100, timeout 30, header X-Request-Timeout, idle 300
