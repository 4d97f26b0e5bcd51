# vim:set ft= ts=4 sw=4 et:
# Reload, worker death and soak under load. A gateway of its own (nginx, 2 workers) takes steady load from keepalive
# clients (t/lib/soak_client.lua, paced at SOAK_RATE requests/s, default 2,000) for SOAK_SECONDS (default 60; `make
# soak` runs 600), while discovery (a real etcd) adds and removes a peer every 2 s, the admin API changes a weight
# every 3 s, and the scaler decides from the request rate and calls a webhook receiver. The run has three phases:
#   reload   `nginx -s reload` (SIGHUP to the master) every 2 s;
#   kill     SIGKILL to one worker every 5 s (the master starts another);
#   steady   neither: the soak proper, where worker RSS, Lua memory, timers, sockets and peer records must stay flat.
# (In the 60 s run each phase lasts 20 s; with SOAK_SECONDS >= 180 the reload and kill phases last 60 s each.)
# Checks: 0 failed requests except those a killed worker was serving (counted); statistics, ejections and scaling
# state carried over reloads; no in-flight left once the load ends; no peer record leaked (records reused); the
# gateway's per-peer counts match the clients'. Writes the samples (logs/soak.json) and an HTML report with the time
# lines (SOAK_REPORT, default logs/soak.html, by tools/soak_report.py). Every process is stopped by PID.
# Ports: TEST_NGINX_SERVER_PORT + 70 .. + 81.

use lib 't';
use Autoscale;

my $base = $ENV{TEST_NGINX_SERVER_PORT} || 1984;
my @names = qw(ETCD ETCDPEER HOOK GW B0 B1 B2 B3 B4 B5 DEAD BACKENDS);
$ENV{"TEST_NGINX_$names[$_]_PORT"} = $base + 70 + $_ for 0 .. $#names;
$ENV{TEST_NGINX_SOAK_SECONDS} = $ENV{SOAK_SECONDS} || 60;
$ENV{TEST_NGINX_SOAK_RATE} = $ENV{SOAK_RATE} || 2000;
$ENV{TEST_NGINX_SOAK_REPORT} = $ENV{SOAK_REPORT} || '';

workers(1);
worker_connections(1024);
master_on();

our $Have_etcd = grep { -x "$_/etcd" } split /:/, $ENV{PATH};
diag("etcd not found (Debian package etcd-server): skipped") unless $Have_etcd;

run_tests();

__DATA__

=== TEST 1: steady keepalive load through reloads every 2 s, a worker SIGKILLed every 5 s, peer churn, admin changes and scaling
--- skip_eval: 1: !$::Have_etcd
--- config
location = /t { content_by_lua_block {
    local t = require "autoscale_test"
    local process = require "autoscale_process"
    local client = require "soak_client"
    local cjson = require "cjson"
    local dir = ngx.config.prefix() .. "logs/"
    local D, RATE = $TEST_NGINX_SOAK_SECONDS, $TEST_NGINX_SOAK_RATE
    local GW, HOOK, ETCD = $TEST_NGINX_GW_PORT, $TEST_NGINX_HOOK_PORT, $TEST_NGINX_ETCD_PORT
    local B = { $TEST_NGINX_B0_PORT, $TEST_NGINX_B1_PORT, $TEST_NGINX_B2_PORT, $TEST_NGINX_B3_PORT, $TEST_NGINX_B4_PORT, $TEST_NGINX_B5_PORT }
    local DEAD = $TEST_NGINX_DEAD_PORT
    local phase_len = D >= 180 and 60 or D / 3
    local phases = { { name = "reload", start = 0, ["end"] = phase_len }, { name = "kill", start = phase_len, ["end"] = 2 * phase_len },
                     { name = "steady", start = 2 * phase_len, ["end"] = D } }
    local TOKEN = "soak-admin-token-0123456789"
    local function now() ngx.update_time() return ngx.now() end
    local procs = {}
    local function sh(cmd)
        local f = io.popen(cmd)
        local out = f:read("*a")
        f:close()
        return out
    end
    local function etcd(verb, key, value)
        local body = { key = ngx.encode_base64(key), value = value and ngx.encode_base64(value) }
        return t.request { port = ETCD, method = "POST", path = "/v3/kv/" .. verb, body = cjson.encode(body), timeout = 2000 } == 200
    end
    local function admin(method, path, body)
        return t.request { port = GW, method = method, path = "/autoscale/admin" .. path, body = body, timeout = 2000,
                           headers = { Authorization = "Bearer " .. TOKEN, ["Content-Type"] = "application/json" } }
    end
    local gw_root = dir .. "gw/"
    local function master() return tonumber(process.read(gw_root .. "logs/nginx.pid"):match("%d+")) end
    -- the gateway's workers: pid, whether it is shutting down (after a reload), RSS (kB), sockets
    local function workers()
        local m = master()
        local out = {}
        for pid in process.read("/proc/" .. m .. "/task/" .. m .. "/children"):gmatch("%d+") do
            local status = process.read("/proc/" .. pid .. "/status")
            local cmd = process.read("/proc/" .. pid .. "/cmdline")
            if status ~= "" then
                -- RSS in all, and its private part (RssAnon: the heap; RssShmem grows as the worker first touches
                -- pages of the shared region and of the shared dicts, up to their size)
                out[#out + 1] = { pid = tonumber(pid), rss = tonumber(status:match("VmRSS:%s*(%d+)")),
                                  anon = tonumber(status:match("RssAnon:%s*(%d+)")), shmem = tonumber(status:match("RssShmem:%s*(%d+)")),
                                  leaving = cmd:find("shutting down", 1, true) ~= nil }
            end
        end
        if #out > 0 then
            local pids = {}
            for _, w in ipairs(out) do pids[#pids + 1] = w.pid end
            local counts = sh("for p in " .. table.concat(pids, " ") .. "; do echo $p $(find /proc/$p/fd -lname 'socket:*' 2>/dev/null | wc -l); done")
            for _, w in ipairs(out) do
                w.sockets = tonumber(counts:match("\n?" .. w.pid .. " (%d+)"))
            end
        end
        return out
    end
    local report = { phases = phases, samples = {}, actions = {}, rate = RATE, seconds = D }
    local ok, err = pcall(function()
        os.execute("rm -rf " .. dir .. "etcd-data")
        procs[#procs + 1] = process.etcd(dir, ETCD)
        -- the backends: an nginx of their own, each port answering its own number
        local bconf = dir .. "backends.conf"
        local listen = {}
        for _, p in ipairs(B) do
            listen[#listen + 1] = "server { listen 127.0.0.1:" .. p .. "; keepalive_requests 100000; location / { return 200 '" .. p .. "'; } }"
        end
        os.execute("mkdir -p " .. dir .. "backends/logs")
        process.write(bconf, "pid " .. dir .. "backends/nginx.pid;\nerror_log " .. dir .. "backends/error.log warn;\n"
            .. "worker_processes 1;\nevents { worker_connections 2048; }\nhttp { access_log off;\n"
            .. "client_body_temp_path " .. dir .. "backends/cb; proxy_temp_path " .. dir .. "backends/px;\n"
            .. "fastcgi_temp_path " .. dir .. "backends/fc; uwsgi_temp_path " .. dir .. "backends/uw; scgi_temp_path " .. dir .. "backends/sc;\n"
            .. table.concat(listen, "\n") .. "\n}\n")
        procs[#procs + 1] = process.start("/usr/sbin/nginx -p " .. dir .. "backends/ -c " .. bconf .. " -g 'daemon off;'", dir .. "backends.log", D + 60)
        assert(t.poll(function() return process.listening(B[6]) end, 5), "backends did not start: " .. process.read(dir .. "backends.log"))
        procs[#procs + 1] = process.start("python3 $TEST_NGINX_REPO/t/lib/scale_receiver.py --port " .. HOOK .. " --secret 0123456789abcdef-secret", dir .. "receiver.log", D + 60)
        assert(t.poll(function() return process.listening(HOOK) end, 5), "receiver did not start")
        process.write(dir .. "admin.token", TOKEN)
        local gw = process.gateway { dir = dir, name = "gw", port = GW, workers = 2, seconds = D + 60,
            http = "lua_shared_dict soak 1m; lua_socket_log_errors off;",
            init = [==[
                autoscale.configure { upstreams = { api = {
                    peers = { "127.0.0.1:$TEST_NGINX_B0_PORT", "127.0.0.1:$TEST_NGINX_B1_PORT", "127.0.0.1:$TEST_NGINX_DEAD_PORT" },
                    discovery = { etcd = { endpoints = { "http://127.0.0.1:$TEST_NGINX_ETCD_PORT" }, prefix = "/soak/api/", interval = 0.5 } },
                    scaling = { min = 1, max = 8, rps = { target = 400 }, cooldown = 2, provision_timeout = 3,
                                actuator = { type = "webhook", url = "http://127.0.0.1:$TEST_NGINX_HOOK_PORT/scale",
                                             secret = "0123456789abcdef-secret", retries = 1 } },
                } } }
                autoscale.admin { token_file = "]==] .. dir .. [==[admin.token" }
            ]==],
            init_worker = [==[
                local d = ngx.shared.soak
                ngx.timer.every(0.5, function()
                    d:set("w:" .. ngx.worker.pid(), collectgarbage("count") .. " " .. ngx.timer.running_count() .. " " .. ngx.timer.pending_count(), 3)
                end)
            ]==],
            server = [==[
                add_header X-Worker $pid always;
                location /autoscale/admin { content_by_lua_block { autoscale.admin_handler() } }
                location = /soak { content_by_lua_block {
                    local d, out = ngx.shared.soak, {}
                    for _, k in ipairs(d:get_keys(0)) do
                        local lua, running, pending = d:get(k):match("(%S+) (%S+) (%S+)")
                        out[k:sub(3)] = { lua = tonumber(lua), timers = tonumber(running) + tonumber(pending) }
                    end
                    ngx.say(require("cjson").encode(out))
                } }
            ]==] }
        procs[#procs + 1] = gw
        -- the dead peer is ejected before the load starts, so that its ejection can be followed through reloads
        assert(t.poll(function()
            t.load { port = GW, concurrency = 4, requests = 40, timeout = 2000 }
            local st = t.status(GW).upstreams.api
            local dead = t.peer(st, "127.0.0.1:" .. DEAD)
            return dead and dead.ejections and dead.ejections > 0
        end, 10), "the dead peer was not ejected")

        local function static_requests()
            local n = 0
            for _, p in ipairs(t.status(GW).upstreams.api.peers) do
                if p.addr == "127.0.0.1:" .. B[1] or p.addr == "127.0.0.1:" .. B[2] then n = n + p.totals.requests - p.totals.failures end
            end
            return n
        end
        local static_before = static_requests() -- the requests that ejected the dead peer
        local t0 = now()
        local function at() return now() - t0 end
        local load = ngx.thread.spawn(client.run, { port = GW, rate = RATE, concurrency = 16, duration = D, timeout = 5000 })
        local killed = {} -- pid -> time
        local kill_times = {}
        local reloads, kills = 0, 0
        local next_reload, next_kill, next_churn, next_admin, next_sample = 2, phase_len + 1, 1, 1.5, 0
        local churn_k, weight = 0, 1
        local present = {}
        local slots, addrs = {}, {}
        local problems = {}
        local last_ejections, last_seq, last_static = 0, 0, 0
        while at() < D do
            local s = at()
            if s >= next_sample then
                next_sample = next_sample + 1
                local st = t.status(GW)
                local api = st.upstreams.api
                local inflight, static = 0, 0
                local peers_now = {}
                for _, p in ipairs(api.peers) do
                    inflight = inflight + p.inflight
                    slots[p.slot] = true
                    addrs[p.addr] = true
                    peers_now[#peers_now + 1] = p.addr
                    if p.addr == "127.0.0.1:" .. B[1] or p.addr == "127.0.0.1:" .. B[2] then static = static + p.totals.requests end
                    if p.addr == "127.0.0.1:" .. DEAD then
                        if p.ejections < last_ejections then problems[#problems + 1] = string.format("%.1f s: ejections of the dead peer went down %d -> %d", s, last_ejections, p.ejections) end
                        last_ejections = p.ejections
                    end
                end
                if static < last_static then problems[#problems + 1] = string.format("%.1f s: requests of the static peers went down %d -> %d", s, last_static, static) end
                last_static = static
                local sc = api.scaling or {}
                if sc.seq and sc.seq < last_seq then problems[#problems + 1] = string.format("%.1f s: scaling decision seq went down %d -> %d", s, last_seq, sc.seq) end
                last_seq = sc.seq or last_seq
                local mem = cjson.decode((select(2, t.get(GW, "/soak"))) or "{}") or {}
                local ws = workers()
                for _, w in ipairs(ws) do
                    local m = mem[tostring(w.pid)]
                    w.lua, w.timers = m and m.lua, m and m.timers
                end
                local used = 0
                for _ in pairs(slots) do used = used + 1 end
                report.samples[#report.samples + 1] = { t = s, inflight = inflight, peers = #api.peers, records = used,
                    workers = ws, desired = sc.desired, errlog = #process.read(gw_root .. "logs/error.log") }
            end
            if s >= next_churn then -- discovery: one peer in or out of etcd
                next_churn = next_churn + 2
                local port = B[3 + churn_k % 4]
                churn_k = churn_k + 1
                local key = "/soak/api/" .. port
                if present[port] then etcd("deleterange", key) else etcd("put", key, "127.0.0.1:" .. port) end
                present[port] = not present[port]
            end
            if s >= next_admin then -- the admin API: a weight change
                next_admin = next_admin + 3
                weight = 3 - weight
                local code = admin("PUT", "/upstreams/api/peers/127.0.0.1:" .. B[1] .. "/weight", '{"weight":' .. weight .. '}')
                if code ~= 200 then problems[#problems + 1] = string.format("%.1f s: admin weight change answered %s", s, tostring(code)) end
            end
            if s >= next_reload and s < phase_len then
                next_reload = next_reload + 2
                os.execute("kill -HUP " .. master())
                reloads = reloads + 1
                report.actions[#report.actions + 1] = { t = s, backend = "gateway", set = "reload" }
            end
            if s >= next_kill and s >= phase_len and s < 2 * phase_len then
                next_kill = next_kill + 5
                local live = {}
                for _, w in ipairs(workers()) do if not w.leaving then live[#live + 1] = w.pid end end
                local victim = live[kills % #live + 1]
                if victim then
                    os.execute("kill -KILL " .. victim)
                    killed[victim] = s
                    kill_times[#kill_times + 1] = s
                    kills = kills + 1
                    report.actions[#report.actions + 1] = { t = s, backend = "gateway", set = "SIGKILL " .. victim }
                end
            end
            ngx.sleep(0.05)
        end
        local res = select(2, assert(ngx.thread.wait(load)))
        -- the failures: those of a killed worker (its connection's worker, or, on a fresh connection, a kill while
        -- the request was out) and any other
        local by_kill, other, in_reload = 0, {}, 0
        for _, f in ipairs(res.failures) do
            local kill_during = false
            for _, k in ipairs(kill_times) do
                if k >= f.t0 - 0.1 and k <= f.t1 + 0.1 then kill_during = true end
            end
            if (f.worker and killed[f.worker]) or (not f.worker and kill_during) then
                by_kill = by_kill + 1
            else
                other[#other + 1] = f
            end
            if f.t0 < phase_len then in_reload = in_reload + 1 end
        end
        -- nothing left in flight once the load has ended (killed workers' attempts are reclaimed)
        local phantom
        t.poll(function()
            phantom = 0
            for _, p in ipairs(t.status(GW).upstreams.api.peers) do phantom = phantom + p.inflight end
            return phantom == 0
        end, 5)
        local gw_static = static_requests() - static_before
        -- the requests sent again: on a connection of a killed worker, or one a reload closed
        local retried_kill, retried_reload = 0, 0
        for _, x in ipairs(res.retries) do
            if x.worker and killed[x.worker] then retried_kill = retried_kill + 1
            elseif x.t < phase_len then retried_reload = retried_reload + 1 end
        end
        local client_static = (res.by_key[tostring(B[1])] or 0) + (res.by_key[tostring(B[2])] or 0)
        local calls = cjson.decode((select(2, t.get(HOOK, "/calls"))))
        local nslots, naddrs = 0, 0
        for _ in pairs(slots) do nslots = nslots + 1 end
        for _ in pairs(addrs) do naddrs = naddrs + 1 end
        -- flat in the steady phase after 5 s of warm-up: each worker that lives through it, first against last
        -- quarter (RSS: the largest; Lua memory: the largest, a collector's sawtooth; timers, sockets: the largest)
        local from = 2 * phase_len + 5
        local per = {}
        for _, smp in ipairs(report.samples) do
            if smp.t >= from then
                for _, w in ipairs(smp.workers) do
                    local p = per[w.pid] or { n = 0, pts = {} }
                    per[w.pid] = p
                    p.pts[#p.pts + 1] = w
                end
            end
        end
        local flat = { rss_kb = 0, anon_kb = 0, shmem_kb = 0, lua_kb = 0, timers = 0, sockets = 0, workers = 0,
                       sockets_max = 0, per_worker = {} }
        for pid, p in pairs(per) do
            local n = #p.pts
            if n >= 8 then
                flat.workers = flat.workers + 1
                local q = math.floor(n / 4)
                local function top(field, a, b)
                    local m = 0
                    for i = a, b do m = math.max(m, p.pts[i][field] or 0) end
                    return m
                end
                for _, f in ipairs { "rss", "anon", "shmem", "lua", "timers", "sockets" } do
                    local grow = top(f, n - q + 1, n) - top(f, 1, q)
                    local key = (f == "rss" or f == "anon" or f == "shmem" or f == "lua") and f .. "_kb" or f
                    flat[key] = math.max(flat[key] or 0, grow)
                end
                flat.sockets_max = math.max(flat.sockets_max, top("sockets", 1, n))
                flat.per_worker[#flat.per_worker + 1] = { pid = pid, rss = { top("rss", 1, q), top("rss", n - q + 1, n) },
                    anon = { top("anon", 1, q), top("anon", n - q + 1, n) }, shmem = { top("shmem", 1, q), top("shmem", n - q + 1, n) },
                    lua = { top("lua", 1, q), top("lua", n - q + 1, n) } }
            end
        end
        local rate = 0
        for s = 2, D - 2 do rate = rate + (res.per_second[s] or 0) end
        rate = rate / (D - 3)
        report.result = { sent = res.sent, ok = res.ok, failed = res.failed, retried = res.retried, by_kill = by_kill,
            retried_kill = retried_kill, retried_reload = retried_reload,
            other = #other, other_first = other[1], in_reload = in_reload, reloads = reloads, kills = kills, rate = rate,
            connections = res.connections, phantom = phantom, gw_static = gw_static, client_static = client_static,
            records = nslots, addresses = naddrs, calls = #calls, flat = flat, problems = problems,
            errlog_bytes = #process.read(gw_root .. "logs/error.log") }
        local secs = {}
        for s = 0, D - 1 do secs[#secs + 1] = res.per_second[s] or 0 end
        report.per_second = secs
        process.write(dir .. "soak.json", cjson.encode(report))
    end)
    for i = #procs, 1, -1 do procs[i]:stop() end
    if not ok then error(err) end
    local out = "$TEST_NGINX_SOAK_REPORT" ~= "" and "$TEST_NGINX_SOAK_REPORT" or dir .. "soak.html"
    os.execute("python3 $TEST_NGINX_REPO/tools/soak_report.py " .. dir .. "soak.json " .. out)
    local r = report.result
    ngx.log(ngx.WARN, "soak: ", cjson.encode(r))
    ngx.say("rate above half the target: ", r.rate > RATE / 2, ", reloads: ", r.reloads >= phase_len / 2 - 1, ", kills: ", r.kills >= phase_len / 5 - 1)
    ngx.say("failed requests other than a killed worker's: ", r.other, " ", cjson.encode(r.other_first))
    ngx.say("failed during the reloads: ", r.in_reload, ", killed workers' requests counted (sent again or failed): ", r.retried_kill + r.by_kill > 0)
    ngx.say("in flight once the load ended: ", r.phantom)
    ngx.say("gateway and clients agree on the static peers' requests (within 2 per kill): ", math.abs(r.gw_static - r.client_static) <= 2 * r.kills + r.by_kill)
    ngx.say("peer records used: ", r.records <= r.addresses, " (", r.addresses, " addresses)")
    ngx.say("scaling calls: ", r.calls > 0, ", carried over (statistics, ejections, decisions): ", #r.problems == 0, " ", table.concat(r.problems, "; "))
    ngx.say("steady phase, workers followed: ", r.flat.workers >= 2, ", private RSS growth < 1 MB: ", r.flat.anon_kb < 1024,
            ", Lua memory growth < 2 MB: ", r.flat.lua_kb < 2048, ", timers growth <= 2: ", r.flat.timers <= 2,
            ", sockets within clients + upstream keepalive pool (16 + 32 + 16): ", r.flat.sockets_max <= 64)
    ngx.say("report written, charts: ", select(2, process.read(out):gsub('<figure class="chart"', "")))
} }
--- log_level: warn
--- request
GET /t
--- timeout eval: $ENV{TEST_NGINX_SOAK_SECONDS} + 60
--- response_body
rate above half the target: true, reloads: true, kills: true
failed requests other than a killed worker's: 0 null
failed during the reloads: 0, killed workers' requests counted (sent again or failed): true
in flight once the load ended: 0
gateway and clients agree on the static peers' requests (within 2 per kill): true
peer records used: true (7 addresses)
scaling calls: true, carried over (statistics, ejections, decisions): true 
steady phase, workers followed: true, private RSS growth < 1 MB: true, Lua memory growth < 2 MB: true, timers growth <= 2: true, sockets within clients + upstream keepalive pool (16 + 32 + 16): true
report written, charts: 8
