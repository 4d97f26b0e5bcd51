# vim:set ft= ts=4 sw=4 et:
# Admission against a real backend of limited capacity: an nginx location that serves 16 requests at once in 100 ms +- 20 % (uniform, like the lab backends' default jitter)
# each and queues the rest (ngx.semaphore), driven open-loop at 3x its capacity. Figures go to the test output.

use lib 't';
use Autoscale;
use File::Temp qw(tempfile);

my (undef, $figures) = tempfile("admission-figures-XXXXXX", TMPDIR => 1, UNLINK => 1);
$ENV{ADMISSION_FIGURES} = $figures;
env_to_nginx("ADMISSION_FIGURES");
worker_connections(8192);
no_shuffle();

our $MainConfig = "worker_rlimit_nofile 20000;";

our $HttpConfig = <<'_EOC_';
    init_by_lua_block {
        autoscale = require "resty.autoscale"
        -- A scale-up "in flight" for upstream rated while the test sets knobs.pending (the scaler's own answer else).
        local scaler = require "resty.autoscale.scaler"
        local pending = scaler.pending
        scaler.pending = function(name)
            return name == "rated" and ngx.shared.knobs:get("pending") or pending(name)
        end
        local peers = { "127.0.0.1:$TEST_NGINX_RAND_PORT_1" }
        autoscale.configure { upstreams = {
            plain = { peers = peers, retries = 0 },
            adaptive = { peers = peers, retries = 0, admission = {
                concurrency = { algorithm = "gradient", buffer = 0, initial = 16, min_rtt_requests = 40, interval = 0.5 } } },
            classes = { peers = peers, retries = 0, admission = {
                concurrency = { algorithm = "gradient", buffer = 0, initial = 16, min_rtt_requests = 40, interval = 0.5 },
                classes = { { name = "critical", share = 0.5, header = "X-Priority", value = "critical" },
                            { name = "sheddable" } } } },
            rated = { peers = peers, retries = 0, admission = {
                concurrency = { algorithm = "gradient", buffer = 0, initial = 32, min_rtt_requests = 40 },
                rate_limits = { { key = "upstream", rate = 100, burst = 10 } },
                tighten = 0.5, relax_after = 2 } },
        } }
    }
    init_worker_by_lua_block {
        autoscale.init_worker()
        backend_slots = require("ngx.semaphore").new(16)
    }
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1;
        location / {
            access_log off;
            content_by_lua_block {
                if not backend_slots:wait(30) then return ngx.exit(504) end
                ngx.sleep(0.1 * (tonumber(ngx.shared.knobs:get("slow")) or 1) * (0.8 + 0.4 * math.random()))
                backend_slots:post(1)
                ngx.say("ok")
            }
        }
    }
    lua_shared_dict knobs 1m;
    upstream plain { server 0.0.0.1; balancer_by_lua_block { autoscale.balance("plain") } keepalive 64; }
    upstream adaptive { server 0.0.0.1; balancer_by_lua_block { autoscale.balance("adaptive") } keepalive 64; }
    upstream classes { server 0.0.0.1; balancer_by_lua_block { autoscale.balance("classes") } keepalive 64; }
    upstream rated { server 0.0.0.1; balancer_by_lua_block { autoscale.balance("rated") } keepalive 64; }
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_2;
        access_log off;
        location ~ ^/(plain|adaptive|classes|rated)$ {
            set $up $1;
            access_by_lua_block { autoscale.admit(ngx.var.up) }
            proxy_pass http://$up;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            log_by_lua_block { autoscale.log() }
        }
    }
_EOC_

our $Drive = <<'_EOC_';
    local t = require "autoscale_test"
    local front = $TEST_NGINX_RAND_PORT_2
    local spawn, wait, now, update_time = ngx.thread.spawn, ngx.thread.wait, ngx.now, ngx.update_time
    -- Open loop: `rate` requests/s for `duration` s, each in its own light thread; latencies of the 200s by class.
    local function drive(path, rate, duration, class_of, skip)
        local r = { lat = {}, n = {}, shed = {}, statuses = {}, retry_after = {}, all = {}, all_shed = {} }
        local threads = {}
        update_time()
        local start, sent = now(), 0
        local function one(i)
            local class = class_of and class_of(i) or "all"
            update_time()
            local t0 = now()
            local st, _, h = t.request { port = front, path = path, timeout = 20000,
                                         headers = class == "critical" and { ["X-Priority"] = "critical" } or nil }
            update_time()
            st = st or 0
            r.statuses[st] = (r.statuses[st] or 0) + 1
            r.all[class] = (r.all[class] or 0) + 1
            if st ~= 200 then r.all_shed[class] = (r.all_shed[class] or 0) + 1 end
            if t0 - start < (skip or 0) then return end
            r.n[class] = (r.n[class] or 0) + 1
            if st == 200 then
                r.lat[class] = r.lat[class] or {}
                table.insert(r.lat[class], now() - t0)
            else
                r.shed[class] = (r.shed[class] or 0) + 1
                if h and h["retry-after"] then r.retry_after[h["retry-after"]] = true end
            end
        end
        while true do
            update_time()
            local elapsed = now() - start
            if elapsed >= duration then break end
            while sent < elapsed * rate do
                sent = sent + 1
                threads[#threads + 1] = spawn(one, sent)
            end
            ngx.sleep(0.002)
        end
        for _, th in ipairs(threads) do wait(th) end
        return r
    end
    local function p99(list)
        if not list or #list == 0 then return 0 end
        table.sort(list)
        return list[math.max(1, math.ceil(#list * 0.99))]
    end
    local function figure(line)
        local f = io.open(os.getenv("ADMISSION_FIGURES"), "a")
        f:write(line, "\n")
        f:close()
        ngx.say(line)
    end
_EOC_

run_tests();

open my $fh, '<', $figures or die "$figures: $!";
diag("figures: $_") while <$fh>;

__DATA__

=== TEST 1: at 3x capacity, adaptive concurrency keeps the admitted p99 within 1.5x the unloaded p99; without it p99 grows with the queue
--- main_config eval: $::MainConfig
--- http_config eval: $::HttpConfig
--- config eval
"location = /t { content_by_lua_block { $::Drive" . <<'_EOC_'
    -- Capacity: 16 / 0.1 s = 160 requests/s. Unloaded: 80/s (8 at once); 3x: 480/s. (The load generator, the gateway
    -- and the backend share one nginx worker: at 3x of a 320/s backend it ran at 95-100 % of a core, and the
    -- test measured its own event loop's lag, not admission.)
    local unloaded = drive("/plain", 80, 2)
    local base = p99(unloaded.lat.all)
    local a = drive("/adaptive", 480, 6, nil, 2) -- the first 2 s measure min RTT and settle the limit
    local st = autoscale.admission_status("adaptive")
    local admitted = p99(a.lat.all)
    local p = drive("/plain", 480, 1.5)
    local grown = p99(p.lat.all)
    figure(string.format("unloaded p99 %.1f ms; 3x load with adaptive concurrency: admitted p99 %.1f ms (%.2fx) "
        .. "over %d admitted, %d shed (limit %.1f, min RTT %.1f ms); 3x load without: p99 %.1f ms (%.1fx), %d shed",
        base * 1000, admitted * 1000, admitted / base, #(a.lat.all or {}), a.shed.all or 0, st.limit,
        st.min_rtt * 1000, grown * 1000, grown / base, p.shed.all or 0))
    ngx.say(admitted <= 1.5 * base and "adaptive ok" or "adaptive too slow")
    ngx.say(grown > 3 * base and "plain grows" or "plain did not grow")
    ngx.say(next(a.retry_after) and "retry-after set" or "no retry-after")
    ngx.say(a.statuses[503] and a.statuses[503] > 0 and "503s" or "no 503")
}}
_EOC_
--- request
GET /t
--- timeout: 60
--- response_body_like
adaptive ok
plain grows
retry-after set
503s
--- no_error_log
[error]

=== TEST 2: critical and sheddable at 3x capacity: critical is shed at most 1 % (from the first second of the surge), sheddable absorbs the rest
--- main_config eval: $::MainConfig
--- http_config eval: $::HttpConfig
--- config eval
"location = /t { content_by_lua_block { $::Drive" . <<'_EOC_'
    -- One request in ten is critical (96/s, 0.3x the capacity), the rest sheddable (864/s).
    local r = drive("/classes", 480, 6, function(i) return i % 10 == 0 and "critical" or "sheddable" end, 2)
    local st = autoscale.admission_status("classes")
    local crit = (r.shed.critical or 0) / math.max(1, r.n.critical or 0)
    local shed = (r.shed.sheddable or 0) / math.max(1, r.n.sheddable or 0)
    -- from the first request of the surge on, while the limit adapts and the minimum RTT is measured
    local crit_all = (r.all_shed.critical or 0) / math.max(1, r.all.critical or 0)
    figure(string.format("classes at 3x: critical %d requests, %.2f %% shed (p99 %.1f ms); sheddable %d requests, "
        .. "%.1f %% shed; limit %.1f; from the first second: critical %.2f %% shed of %d; counters critical shed %d, "
        .. "sheddable shed %d", r.n.critical or 0, crit * 100, p99(r.lat.critical) * 1000, r.n.sheddable or 0,
        shed * 100, st.limit, crit_all * 100, r.all.critical or 0, st.classes.critical.shed.concurrency,
        st.classes.sheddable.shed.concurrency))
    ngx.say(crit <= 0.01 and crit_all <= 0.01 and "critical ok" or "critical shed")
    ngx.say(shed >= 0.5 and "sheddable absorbs" or "sheddable not shed")
}}
_EOC_
--- request
GET /t
--- timeout: 60
--- response_body_like
critical ok
sheddable absorbs
--- no_error_log
[error]

=== TEST 3: a rate limit tightened while the backend is overloaded relaxes within relax_after of its recovery
--- main_config eval: $::MainConfig
--- http_config eval: $::HttpConfig
--- config eval
"location = /t { content_by_lua_block { $::Drive" . <<'_EOC_'
    local function factor() return autoscale.admission_status("rated").rate_factor end
    -- Warm up (min RTT), then slow the backend down 4x: latency over twice the min RTT is overload.
    drive("/rated", 40, 1.5)
    ngx.shared.knobs:set("slow", 4)
    local t0 = ngx.now()
    local load = ngx.thread.spawn(drive, "/rated", 40, 1.5)
    local tightened = t.poll(function() return factor() < 1 end, 5)
    ngx.thread.wait(load)
    -- While tightened, 100/s becomes 50/s: 150/s offered gets 429s.
    local r = drive("/rated", 150, 1)
    ngx.shared.knobs:set("slow", 1)
    ngx.update_time()
    local recovered = ngx.now()
    local relaxed = t.poll(function() return factor() == 1 end, 6)
    ngx.update_time()
    local took = ngx.now() - recovered
    -- A scale-up in flight tightens too, and its end relaxes after relax_after.
    ngx.shared.knobs:set("pending", true)
    local scale_tightened = t.poll(function() return factor() < 1 end, 3)
    ngx.shared.knobs:delete("pending")
    ngx.update_time()
    local ended = ngx.now()
    local scale_relaxed = t.poll(function() return factor() == 1 end, 6)
    ngx.update_time()
    local took2 = ngx.now() - ended
    local kinds, pending_event = {}, false
    for _, e in ipairs(autoscale.events(100)) do
        kinds[#kinds + 1] = e.event
        pending_event = pending_event or (e.event == "rate_tightened" and e.scale_up_pending == 1)
    end
    kinds = table.concat(kinds, ",")
    figure(string.format("rate limit 100/s: tightened to %.0f/s after the backend slowed 4x (%d of 150 requests in 1 s "
        .. "got 429); relaxed %.2f s after recovery (relax_after 2 s); tightened while a scale-up was pending, relaxed "
        .. "%.2f s after it ended", 100 * 0.5, r.statuses[429] or 0, took, took2))
    ngx.say(tightened and "tightened" or "not tightened")
    ngx.say((r.statuses[429] or 0) > 20 and "429s" or "no 429s")
    ngx.say(relaxed and took <= 2.5 and "relaxed in time" or "not relaxed in time")
    ngx.say(kinds:find("rate_tightened", 1, true) and kinds:find("rate_relaxed", 1, true) and "events" or kinds)
    ngx.say(scale_tightened and pending_event and scale_relaxed and took2 <= 2.5 and "scale-up pending ok"
            or "scale-up pending not handled")
}}
_EOC_
--- request
GET /t
--- timeout: 60
--- response_body_like
tightened
429s
relaxed in time
events
scale-up pending ok
--- no_error_log
[error]

=== TEST 4: bad admission settings stop nginx with the field path and the reason
--- http_config
    init_by_lua_block {
        local ok, err = pcall(require("resty.autoscale").configure, { upstreams = { api = { peers = { "127.0.0.1:1" },
            admission = { classes = { { name = "gold", share = 0.7 }, { name = "bronze", share = 0.6 } } } } } })
        ngx.log(ngx.WARN, "E1 ", err)
        ok, err = pcall(require("resty.autoscale").configure, { upstreams = { api = { peers = { "127.0.0.1:1" },
            admission = { rate_limits = { { key = "cookie", rate = 5 } } } } } })
        ngx.log(ngx.WARN, "E2 ", err)
        ok, err = pcall(require("resty.autoscale").configure, { upstreams = { api = { peers = { "127.0.0.1:1" },
            admission = { concurrency = { algorithm = "vegas" } } } } })
        ngx.log(ngx.WARN, "E3 ", err)
        ok, err = pcall(require("resty.autoscale").configure, { upstreams = { api = { peers = { "127.0.0.1:1" },
            admission = { rate_limits = { { rate = 5, from = "25:00", to = "21:00" } } } } } })
        ngx.log(ngx.WARN, "E4 ", err)
        ok, err = pcall(require("resty.autoscale").configure, { upstreams = { api = { peers = { "127.0.0.1:1" },
            admission = { queue = 1, oops = 1 } } } })
        ngx.log(ngx.WARN, "E5 ", err)
    }
--- config
    location = /t { return 200; }
--- request
GET /t
--- error_log
E1 resty.autoscale: upstreams.api.admission.classes: the shares add up to 1.3 (at most 1)
E2 resty.autoscale: upstreams.api.admission.rate_limits[1].key: must be "upstream", "ip", "route", "consumer", "header:<name>" or "jwt:<claim>" (got "cookie")
E3 resty.autoscale: upstreams.api.admission.concurrency.algorithm: must be "gradient", "aimd" or "fixed" (got "vegas")
E4 resty.autoscale: upstreams.api.admission.rate_limits[1].from: must be "HH:MM" or "YYYY-MM-DD HH:MM" (got "25:00")
E5 resty.autoscale: upstreams.api.admission.oops: unknown option

=== TEST 5: hostile requests never raise: classification, JWT and header keys, per-key buckets, unknown upstream
--- http_config
    init_by_lua_block {
        autoscale = require "resty.autoscale"
        autoscale.configure { upstreams = { api = { peers = { "127.0.0.1:$TEST_NGINX_SERVER_PORT" }, admission = {
            consumer_header = "X-Consumer",
            classes = { { name = "vip", consumer = "gold", share = 0.2 }, { name = "web", route = "^/w" },
                        { name = "rest" } },
            rate_limits = { { key = "jwt:sub", rate = 1, burst = 2 }, { key = "header:X-Api-Key", rate = 1, burst = 3,
                             route = "^/k" }, { key = "ip", rate = 1000 }, { key = "consumer", rate = 1000 },
                            { key = "route", rate = 1000, from = "00:00", to = "23:59" } } } } } }
    }
--- config
    location = /t {
        content_by_lua_block {
            local t = require "autoscale_test"
            local port = $TEST_NGINX_SERVER_PORT
            local function get(path, headers)
                local st, body, h = t.request { port = port, path = path, headers = headers }
                return st, h and h["retry-after"], body
            end
            local jwt = "Bearer x." .. ngx.encode_base64('{"sub":"alice"}'):gsub("=", "") .. ".sig"
            local seen = {}
            for _, h in ipairs {
                { Authorization = jwt }, { Authorization = "Bearer !!!" }, { Authorization = "Bearer a.%%%.b" },
                { Authorization = "Bearer a." .. ngx.encode_base64("[1,2]") .. ".b" }, { ["X-Consumer"] = "gold" },
                { ["X-Consumer"] = string.rep("z", 5000) }, {},
            } do
                local st = get("/x", h)
                seen[#seen + 1] = st
            end
            ngx.say("mixed: ", table.concat(seen, " "))
            -- jwt:sub alice has burst 2 (her first request was above): her third within the second gets 429.
            get("/x", { Authorization = jwt })
            local st, ra, body = get("/x", { Authorization = jwt })
            ngx.say("alice: ", st, " retry-after ", ra)
            ngx.print(body)
            local k = {}
            for i = 1, 4 do k[i] = get("/k", { ["X-Api-Key"] = "k1" }) end
            ngx.say("key k1: ", table.concat(k, " "), "; key k2: ", (get("/k", { ["X-Api-Key"] = "k2" })))
            local s = autoscale.admission_status("api")
            ngx.say("rate shed: ", s.classes.rest.shed.rate, " vip admitted: ", s.classes.vip.admitted)
            ngx.say("unknown: ", tostring(autoscale.admit("nope")))
            -- The counters in the status JSON and the Prometheus text (checked by promtool when it is installed).
            local _, sbody = t.get(port, "/status")
            local json = require("cjson").decode(sbody)
            ngx.say("status: limit ", json.upstreams.api.admission.limit, " rate ", json.upstreams.api.admission.classes.rest.shed.rate)
            local _, text = t.get(port, "/metrics")
            ngx.say(text:match('autoscale_admission_shed_total{upstream="api",class="rest",reason="rate"} %d+'))
            local f = io.open("/tmp/admission-030-metrics-" .. ngx.worker.pid(), "w")
            f:write(text)
            f:close()
            local ok = os.execute("command -v promtool >/dev/null || exit 0; promtool check metrics < /tmp/admission-030-metrics-"
                                  .. ngx.worker.pid() .. " >/dev/null 2>&1")
            os.remove("/tmp/admission-030-metrics-" .. ngx.worker.pid())
            ngx.say("promtool: ", (ok == 0 or ok == true) and "clean" or "complaints")
        }
    }
    location = /status { content_by_lua_block { autoscale.status_handler() } }
    location = /metrics { content_by_lua_block { autoscale.prometheus_handler() } }
    location ~ ^/[xk] {
        access_by_lua_block { autoscale.admit("api") }
        content_by_lua_block { ngx.say("ok") }
        log_by_lua_block { autoscale.log() }
    }
--- request
GET /t
--- response_body_like
mixed: 200 200 200 200 200 200 200
alice: 429 retry-after 1
\{"error":"rate limited","reason":"rate","upstream":"api","class":"rest","retry_after":1\}
key k1: 200 200 200 429; key k2: 200
rate shed: 2 vip admitted: 1
unknown: true
status: limit 20 rate 2
autoscale_admission_shed_total\{upstream="api",class="rest",reason="rate"\} 2
promtool: clean
--- error_log
resty.autoscale.admit: unknown upstream nope (admitted)

=== TEST 6: no Lua allocation in admit() and log() when nothing is shed (one class, no rate rule)
--- http_config
    init_by_lua_block {
        autoscale = require "resty.autoscale"
        autoscale.configure { upstreams = { backend = { peers = { "127.0.0.1:$TEST_NGINX_RAND_PORT_1" },
            admission = { concurrency = { algorithm = "gradient", min = 100, initial = 100, min_concurrency = 100 } } } } }
        alloc = { on = false, bytes = 0, calls = 0 }
        function measured(f, ...)
            local a = alloc
            if not a.on then return f(...) end
            local before = collectgarbage("count")
            f(...)
            a.bytes = a.bytes + (collectgarbage("count") - before) * 1024
            a.calls = a.calls + 1
        end
    }
    init_worker_by_lua_block { autoscale.init_worker() }
    upstream backend {
        server 0.0.0.1;
        balancer_by_lua_block { autoscale.balance("backend") }
        keepalive 8;
    }
    server { listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1; location / { return 200 "a"; } }
--- config
    location /p {
        access_by_lua_block { measured(autoscale.admit, "backend") }
        proxy_pass http://backend;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        log_by_lua_block { measured(autoscale.log) }
    }
    location = /t {
        content_by_lua_block {
            local t = require "autoscale_test"
            local port = ngx.var.server_port
            t.load { port = port, path = "/p", concurrency = 4, requests = 1000 }   -- warm up, JIT
            collectgarbage("stop")
            alloc.on = true
            local res = t.load { port = port, path = "/p", concurrency = 4, requests = 2000 }
            alloc.on = false
            collectgarbage("restart")
            local st = autoscale.admission_status("backend")
            ngx.say("errors ", res.errors, ", measured calls ", alloc.calls, ", bytes allocated ", alloc.bytes,
                    ", admitted ", st.classes.default.admitted, ", in flight ", st.in_flight)
        }
    }
--- request
GET /t
--- timeout: 20
--- response_body
errors 0, measured calls 4000, bytes allocated 0, admitted 3000, in flight 0
--- no_error_log
[error]

=== TEST 7: admit() is JIT-compiled, with no trace aborts in admission.lua
--- http_config
    init_by_lua_block {
        autoscale = require "resty.autoscale"
        autoscale.configure { upstreams = { backend = { peers = { "127.0.0.1:$TEST_NGINX_RAND_PORT_1" },
            admission = { concurrency = { algorithm = "gradient", min = 100, initial = 100, min_concurrency = 100 } } } } }
    }
    init_worker_by_lua_block {
        autoscale.init_worker()
        package.path = package.path .. ";/usr/share/luajit-2.1.0-beta3/?.lua"
        require("jit.v").on(ngx.config.prefix() .. "logs/jit.log")
    }
    upstream backend {
        server 0.0.0.1;
        balancer_by_lua_block { autoscale.balance("backend") }
        keepalive 8;
    }
    server { listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1; location / { return 200 "a"; } }
--- config
    location /p {
        access_by_lua_block { autoscale.admit("backend") }
        proxy_pass http://backend;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        log_by_lua_block { autoscale.log() }
    }
    location = /t {
        content_by_lua_block {
            local t = require "autoscale_test"
            local res = t.load { port = ngx.var.server_port, path = "/p", concurrency = 4, requests = 3000 }
            local f = assert(io.open(ngx.config.prefix() .. "logs/jit.log"))
            local log = f:read("*a")
            f:close()
            local compiled, aborted = 0, {}
            for line in log:gmatch("[^\n]+") do
                if line:find("admission.lua", 1, true) then
                    if line:find("^%[TRACE%s+%d+ .-admission%.lua") then compiled = compiled + 1 end
                    if line:find("abort", 1, true) then aborted[#aborted + 1] = line end
                end
            end
            ngx.say("errors ", res.errors, ", traces in admission.lua ", compiled > 0, ", aborts ", #aborted)
            if #aborted > 0 then ngx.log(ngx.WARN, table.concat(aborted, "\n")) end
        }
    }
--- request
GET /t
--- timeout: 20
--- response_body
errors 0, traces in admission.lua true, aborts 0
--- no_error_log
[error]
