# vim:set ft= ts=4 sw=4 et:
# Every dependency failing under load. A gateway of its own (nginx, 2 workers) whose upstream `api` takes peers from
# DNS (dnsmasq, SRV) and etcd besides its static one, scales on an external signal read from Prometheus (a real
# server), coordinates through Redis (`cluster`, acting alone while Redis is away: actuate_without_redis) and calls a
# webhook receiver. Under steady keepalive load (t/lib/soak_client.lua), each of Redis, etcd, the DNS server,
# Prometheus and the receiver is in turn SIGKILLed and started again, then SIGSTOPped and continued: no client request
# fails, the last good state is kept (the peers a failing source gave, the scaling decision), each episode is one
# dependency_down and one dependency_up event (not one per attempt), and the dependency is used again within its
# retry interval once it is back. Every process is stopped by PID. Ports: TEST_NGINX_SERVER_PORT + 82 .. + 91.

use lib 't';
use Autoscale;

my $base = $ENV{TEST_NGINX_SERVER_PORT} || 1984;
my @names = qw(REDIS ETCD ETCDPEER DNS PROM HOOK GW B0 B1 B2);
$ENV{"TEST_NGINX_$names[$_]_PORT"} = $base + 82 + $_ for 0 .. $#names;

workers(1);
worker_connections(1024);
master_on();

our %Have = map { my $tool = $_; ($tool => scalar grep { -x "$_/$tool" } split /:/, "$ENV{PATH}:/usr/sbin") }
    qw(redis-server etcd dnsmasq prometheus);
my @missing = grep { !$Have{$_} } sort keys %Have;
diag("not found: @missing (Debian packages redis-server, etcd-server, dnsmasq-base, prometheus): skipped") if @missing;
our $Skip = @missing ? 1 : 0;

run_tests();

__DATA__

=== TEST 1: Redis, etcd, DNS, Prometheus and the receiver each killed, then stopped, then restored under load: 0 client errors, one event per episode
--- skip_eval: 1: $::Skip
--- log_level: warn
--- http_config
    server {
        listen 127.0.0.1:$TEST_NGINX_B0_PORT;
        listen 127.0.0.1:$TEST_NGINX_B1_PORT;
        listen 127.0.0.1:$TEST_NGINX_B2_PORT;
        location / { return 200 "$server_port"; }
    }
--- config
location = /t { content_by_lua_block {
    local t = require "autoscale_test"
    local process = require "autoscale_process"
    local client = require "soak_client"
    local cjson = require "cjson"
    local dir = ngx.config.prefix() .. "logs/"
    local GW = $TEST_NGINX_GW_PORT
    local B0, B1, B2 = "127.0.0.1:$TEST_NGINX_B0_PORT", "127.0.0.1:$TEST_NGINX_B1_PORT", "127.0.0.1:$TEST_NGINX_B2_PORT"
    local function now() ngx.update_time() return ngx.now() end
    local procs = {}
    local dnsmasq = (io.open("/usr/sbin/dnsmasq") and "/usr/sbin/" or "") .. "dnsmasq"
    process.write(dir .. "dnsmasq.conf", table.concat({ "port=$TEST_NGINX_DNS_PORT", "listen-address=127.0.0.1", "bind-interfaces",
        "no-resolv", "no-hosts", "keep-in-foreground", "user=root", "local-ttl=1", "pid-file=",
        "host-record=b.faults.test,127.0.0.1", "srv-host=_api._tcp.faults.test,b.faults.test,$TEST_NGINX_B1_PORT,0,1" }, "\n") .. "\n")
    process.write(dir .. "prometheus.yml", "global:\n  scrape_interval: 1h\n")
    os.execute("rm -rf " .. dir .. "etcd-data " .. dir .. "prometheus-data")
    -- how each dependency is started (again) and found listening
    local deps = {
        redis = { cmd = "redis-server --port $TEST_NGINX_REDIS_PORT --bind 127.0.0.1 --save '' --appendonly no --dir " .. dir, port = $TEST_NGINX_REDIS_PORT },
        dns = { cmd = dnsmasq .. " -C " .. dir .. "dnsmasq.conf", port = $TEST_NGINX_DNS_PORT, udp = true },
        prometheus = { cmd = "prometheus --config.file=" .. dir .. "prometheus.yml --storage.tsdb.path=" .. dir
                             .. "prometheus-data --web.listen-address=127.0.0.1:$TEST_NGINX_PROM_PORT", port = $TEST_NGINX_PROM_PORT },
        actuator = { cmd = "python3 $TEST_NGINX_REPO/t/lib/scale_receiver.py --port $TEST_NGINX_HOOK_PORT --secret 0123456789abcdef-secret",
                     port = $TEST_NGINX_HOOK_PORT },
    }
    local function start(name)
        local d = deps[name]
        if name == "etcd" then
            d.proc = process.etcd(dir, $TEST_NGINX_ETCD_PORT)
        else
            d.proc = process.start(d.cmd, dir .. name .. ".log", 120)
            assert(t.poll(function() return process.listening(d.port, d.udp and "udp" or "tcp") end, 10),
                   name .. " did not start: " .. process.read(dir .. name .. ".log"):sub(-1000))
        end
        procs[#procs + 1] = d.proc
    end
    deps.etcd = {}
    local function events(kind, dep)
        local n, last = 0, nil
        for _, e in ipairs(process.events(GW, kind)) do
            if e.dependency == dep then n, last = n + 1, e end
        end
        return n, last
    end
    local function peers()
        local out = {}
        for _, p in ipairs(t.status(GW).upstreams.api.peers) do
            if p.state ~= "draining" then out[#out + 1] = p.addr end
        end
        table.sort(out)
        return table.concat(out, " ")
    end
    local function scaling()
        return cjson.decode((select(2, t.get(GW, "/scaling?service=api&decisions=100"))))
    end
    local lines, figures = {}, {}
    local done = false
    local ok, err = pcall(function()
        for _, name in ipairs { "redis", "etcd", "dns", "prometheus", "actuator" } do start(name) end
        local put = { key = ngx.encode_base64("/faults/api/b2"), value = ngx.encode_base64(B2) }
        assert(t.request { port = $TEST_NGINX_ETCD_PORT, method = "POST", path = "/v3/kv/put", body = cjson.encode(put) } == 200)
        procs[#procs + 1] = process.gateway { dir = dir, name = "gw", port = GW, workers = 2,
            http = "lua_socket_log_errors off;",
            init = [==[
                autoscale.configure {
                    cluster = { gateway_id = "gw-1", redis = { port = $TEST_NGINX_REDIS_PORT, timeout = 0.2 }, actuate_without_redis = true },
                    upstreams = { api = {
                        peers = { "127.0.0.1:$TEST_NGINX_B0_PORT" },
                        discovery = {
                            dns = { name = "_api._tcp.faults.test", type = "SRV", nameservers = { "127.0.0.1:$TEST_NGINX_DNS_PORT" },
                                    min_ttl = 0.5, max_ttl = 1, timeout = 0.3, retries = 1 },
                            etcd = { endpoints = { "http://127.0.0.1:$TEST_NGINX_ETCD_PORT" }, prefix = "/faults/api/", interval = 0.5, timeout = 0.3 },
                        },
                        scaling = { min = 1, max = 8, cooldown = 0.5, provision_timeout = 0.5,
                                    external = { url = "http://127.0.0.1:$TEST_NGINX_PROM_PORT", query = "vector(5)", target = 1,
                                                 interval = 0.5, timeout = 0.3 },
                                    actuator = { type = "webhook", url = "http://127.0.0.1:$TEST_NGINX_HOOK_PORT/scale",
                                                 secret = "0123456789abcdef-secret", retries = 0, timeout = 0.3 } },
                    } },
                }
            ]==] }
        local all = table.concat((function() local x = { B0, B1, B2 } table.sort(x) return x end)(), " ")
        assert(t.poll(function() return peers() == all and scaling().desired == 5 end, 15),
               "not ready: peers " .. peers() .. ", desired " .. tostring(scaling().desired))
        local load = ngx.thread.spawn(client.run, { port = GW, rate = 300, concurrency = 8, duration = 120, timeout = 5000,
                                                   stop = function() return done end })
        for _, name in ipairs { "redis", "etcd", "dns", "prometheus", "actuator" } do
            local d = deps[name]
            local f = { name = name }
            figures[#figures + 1] = f
            local base_down, base_up = events("dependency_down", name), events("dependency_up", name)
            for _, fault in ipairs { "kill", "stop" } do
                local t0 = now()
                if fault == "kill" then d.proc:signal("KILL") else d.proc:signal("STOP") end
                local down = t.poll(function() return events("dependency_down", name) > base_down end, 8)
                f[fault .. "_seen"] = down and now() - t0
                local kept = peers()
                ngx.sleep(1) -- a few failed attempts: still one event
                -- the last good state: the same peers, and no scale-down decided for want of a signal
                local downs = 0
                for _, dec in ipairs(scaling().decisions or {}) do
                    if dec.time >= t0 and dec.action and dec.desired < dec.current then downs = downs + 1 end
                end
                if peers() ~= kept or downs > 0 then
                    f[fault .. "_changed"] = kept .. " -> " .. peers() .. ", scale-downs " .. downs
                end
                if fault == "kill" then d.proc:stop() start(name) else d.proc:signal("CONT") end
                local back = now() -- listening (etcd: answering) again
                local up = t.poll(function() return events("dependency_up", name) > base_up end, 8)
                local _, last = events("dependency_up", name)
                f[fault .. "_recovered"] = up and last and last.time - back
                base_down, base_up = base_down + 1, base_up + 1
            end
            f.down, f.up = events("dependency_down", name), events("dependency_up", name)
        end
        done = true
        local res = select(2, assert(ngx.thread.wait(load)))
        figures.client = { sent = res.sent, failed = res.failed, retried = res.retried, first = res.failures[1] }
    end)
    done = true
    for i = #procs, 1, -1 do procs[i]:stop() end
    os.execute("rm -rf " .. dir .. "prometheus-data")
    if not ok then error(err) end
    ngx.log(ngx.WARN, "dependency faults: ", cjson.encode(figures))
    local c = figures.client
    ngx.say("client requests failed: ", c.failed, " of more than 1000: ", c.sent > 1000, " ", cjson.encode(c.first))
    for _, f in ipairs(figures) do
        -- back within its retry interval: 0.5 s (Redis: its backoff, at most 2 s) plus a tick
        local bound = f.name == "redis" and 2.6 or f.name == "actuator" and 1.6 or 1.1
        ngx.say(f.name, ": killed seen ", f.kill_seen ~= nil, ", stopped seen ", f.stop_seen ~= nil,
                ", state kept ", f.kill_changed == nil and f.stop_changed == nil, " ", f.kill_changed or "", f.stop_changed or "",
                ", events ", f.down, " down ", f.up, " up, back in time ",
                (f.kill_recovered or 99) <= bound and (f.stop_recovered or 99) <= bound)
    end
} }
--- request
GET /t
--- timeout: 150
--- response_body
client requests failed: 0 of more than 1000: true null
redis: killed seen true, stopped seen true, state kept true , events 2 down 2 up, back in time true
etcd: killed seen true, stopped seen true, state kept true , events 2 down 2 up, back in time true
dns: killed seen true, stopped seen true, state kept true , events 2 down 2 up, back in time true
prometheus: killed seen true, stopped seen true, state kept true , events 2 down 2 up, back in time true
actuator: killed seen true, stopped seen true, state kept true , events 2 down 2 up, back in time true
