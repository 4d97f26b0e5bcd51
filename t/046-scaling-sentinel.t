# vim:set ft= ts=4 sw=4 et:
# Redis as production runs it: one master, one replica and three Sentinels (Debian redis-server, redis-sentinel) on
# loopback, with an ACL user for the gateways and a password on the Sentinels; two gateways (nginx processes of their
# own) find the master through the Sentinels. Under load on both gateways the master is SIGKILLed: Sentinel promotes
# the replica, both gateways follow it, one leader again with a larger fencing token (the master's configuration
# epoch is part of it), the demand of both gateways aggregated again, no client request lost and no actuator call
# refused by the receiver (which refuses a token lower than one it has seen). Then the new master stops answering
# (SIGSTOP, a partition): both gateways decide alone and say so (mode no_redis, one dependency_down event each), and
# one leader again once it answers. Every process is stopped by PID.
# TEST 3: cluster.redis over TLS (redis-server --tls-port), the certificate checked. Ports: TEST_NGINX_SERVER_PORT + 60 .. + 68.

use lib 't';
use Autoscale;

my $base = $ENV{TEST_NGINX_SERVER_PORT} || 1984;
my @names = qw(MASTER REPLICA SENT1 SENT2 SENT3 HOOK GWA GWB TLSREDIS);
$ENV{"TEST_NGINX_$names[$_]_PORT"} = $base + 60 + $_ for 0 .. $#names;

workers(1);
worker_connections(1024);
master_on();

our %Have = map { my $tool = $_; ($tool => scalar grep { -x "$_/$tool" } split /:/, $ENV{PATH}) } qw(redis-server redis-sentinel);
diag("redis-server / redis-sentinel not found (Debian packages redis-server, redis-sentinel): skipped")
    unless $Have{'redis-server'} && $Have{'redis-sentinel'};

# A self-signed certificate for redis.test (TEST 3), made before nginx reads lua_ssl_trusted_certificate.
use File::Temp ();
our $TlsDir = File::Temp::tempdir(CLEANUP => 1);
our $Have_tls = system("openssl req -x509 -newkey rsa:2048 -nodes -keyout $TlsDir/key.pem -out $TlsDir/cert.pem -days 1"
    . " -subj /CN=redis.test -addext subjectAltName=DNS:redis.test >/dev/null 2>&1") == 0;
chmod 0644, "$TlsDir/key.pem";
chmod 0755, $TlsDir;
$ENV{TEST_NGINX_TLS_DIR} = $TlsDir;

run_tests();

__DATA__

=== TEST 1: the master killed under load: a new master within Sentinel's failover time, both gateways follow it, one leader at a time, 0 client errors
--- skip_eval: 1: !($::Have{'redis-server'} && $::Have{'redis-sentinel'})
--- http_config
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1;
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_2;
        location / { content_by_lua_block { ngx.sleep(0.05) ngx.say("ok") } }
    }
--- config
location = /t { content_by_lua_block {
    local t = require "autoscale_test"
    local process = require "autoscale_process"
    local cjson = require "cjson"
    local redis = require "nginx.redis"
    local dir = ngx.config.prefix() .. "logs/"
    local M, R = $TEST_NGINX_MASTER_PORT, $TEST_NGINX_REPLICA_PORT
    local S = { $TEST_NGINX_SENT1_PORT, $TEST_NGINX_SENT2_PORT, $TEST_NGINX_SENT3_PORT }
    local HOOK, GWA, GWB = $TEST_NGINX_HOOK_PORT, $TEST_NGINX_GWA_PORT, $TEST_NGINX_GWB_PORT
    local function now() ngx.update_time() return ngx.now() end
    local procs = {}
    local function start(name, cmd, port)
        local p = process.start(cmd, dir .. name .. ".log", 90)
        procs[#procs + 1] = p
        assert(t.poll(function() return process.listening(port) end, 5), name .. " did not start: " .. process.read(dir .. name .. ".log"))
        return p
    end
    -- one command to a Redis or Sentinel on `port` (nil, err when it does not answer)
    local function ask(port, password, ...)
        local red = redis:new()
        red:set_timeout(500)
        local ok, err = red:connect("127.0.0.1", port)
        if not ok then return nil, err end
        if password then red:auth(password) end
        local res
        res, err = red[select(1, ...)](red, select(2, ...))
        red:close()
        return res, err
    end
    local function sentinel_master()
        local a = ask(S[1], "sentinel-secret", "sentinel", "get-master-addr-by-name", "main")
        return type(a) == "table" and tonumber(a[2]) or nil
    end
    local function state(port)
        local _, body = t.get(port, "/scaling?service=api&decisions=400")
        return cjson.decode(body)
    end
    local function calls()
        local status, body = t.get(HOOK, "/calls")
        assert(status == 200, "receiver: " .. tostring(status))
        return cjson.decode(body)
    end
    local ACL = "user default on >admin-secret ~* &* +@all\nuser gw on >gw-secret ~autoscale:* +@all -@dangerous +role +info\n"
    local function redis_conf(port, replica_of)
        local conf = dir .. "redis-" .. port .. ".conf"
        process.write(conf, "port " .. port .. "\nbind 127.0.0.1\nsave \"\"\nappendonly no\ndir " .. dir .. "\n"
            .. "dbfilename dump-" .. port .. ".rdb\nmasterauth admin-secret\n" .. ACL
            .. (replica_of and ("replicaof 127.0.0.1 " .. replica_of .. "\nreplica-read-only no\n") or ""))
        return conf
    end
    local function sentinel_conf(port)
        local conf = dir .. "sentinel-" .. port .. ".conf"
        process.write(conf, "port " .. port .. "\nbind 127.0.0.1\ndir " .. dir .. "\n"
            .. "requirepass sentinel-secret\nsentinel sentinel-pass sentinel-secret\n"
            .. "sentinel monitor main 127.0.0.1 " .. M .. " 2\n"
            .. "sentinel auth-pass main admin-secret\n"
            .. "sentinel down-after-milliseconds main 1000\nsentinel failover-timeout main 10000\n"
            .. "sentinel parallel-syncs main 1\n")
        return conf
    end
    local upstream = [==[
        autoscale.configure {
            cluster = { gateway_id = "GATEWAY", lease = 1.5, demand_ttl = 1.5,
                        redis = { sentinels = { "127.0.0.1:$TEST_NGINX_SENT1_PORT", "127.0.0.1:$TEST_NGINX_SENT2_PORT",
                                                "127.0.0.1:$TEST_NGINX_SENT3_PORT" },
                                  master_name = "main", username = "gw", password = "gw-secret",
                                  sentinel_password = "sentinel-secret", timeout = 0.2 } },
            upstreams = { api = { peers = { "127.0.0.1:$TEST_NGINX_RAND_PORT_1", "127.0.0.1:$TEST_NGINX_RAND_PORT_2" },
                scaling = { min = 2, max = 20, utilization = { capacity = 4, target = 0.75 }, cooldown = 1,
                            provision_timeout = 1.5,
                            actuator = { type = "webhook", url = "http://127.0.0.1:$TEST_NGINX_HOOK_PORT/scale",
                                         secret = "0123456789abcdef-secret", retries = 1 } } } },
        }
    ]==]
    local report = {}
    local ok, err = pcall(function()
        local master = start("master", "redis-server " .. redis_conf(M), M)
        local replica = start("replica", "redis-server " .. redis_conf(R, M), R)
        for i, port in ipairs(S) do
            start("sentinel" .. i, "redis-sentinel " .. sentinel_conf(port), port)
        end
        -- the Sentinels know the replica and each other
        assert(t.poll(function()
            local m = ask(S[1], "sentinel-secret", "sentinel", "master", "main")
            if type(m) ~= "table" then return false end
            local f = {}
            for i = 1, #m - 1, 2 do f[m[i]] = m[i + 1] end
            return tonumber(f["num-slaves"]) == 1 and tonumber(f["num-other-sentinels"]) == 2
        end, 20), "the Sentinels did not meet")
        start("receiver", "python3 $TEST_NGINX_REPO/t/lib/scale_receiver.py --port " .. HOOK .. " --secret 0123456789abcdef-secret", HOOK)
        for name, port in pairs { ["gw-a"] = GWA, ["gw-b"] = GWB } do
            procs[#procs + 1] = process.gateway { dir = dir, name = name, port = port, seconds = 90,
                                                 init = upstream:gsub("GATEWAY", name) }
        end
        local function modes()
            local a, b = state(GWA), state(GWB)
            return a.mode, b.mode, a, b
        end
        local function met()
            local a, b = modes()
            return (a == "leader" and b == "follower") or (a == "follower" and b == "leader")
        end
        local function why() local a, b = modes() return a .. " and " .. b end
        if not t.poll(met, 10) then error("no leader and follower: " .. why()) end
        local la = ngx.thread.spawn(t.load, { port = GWA, concurrency = 8, duration = 22, timeout = 3000 })
        local lb = ngx.thread.spawn(t.load, { port = GWB, concurrency = 8, duration = 22, timeout = 3000 })
        -- the leader sees both gateways' demand and has called the receiver
        local function aggregated(since)
            local _, _, a, b = modes()
            local leader = a.mode == "leader" and a or b.mode == "leader" and b
            if not leader then return false end
            for _, d in ipairs(leader.decisions) do
                if d.time > since and d.mode == "leader" and d.inputs.gateways == 2 then return d end
            end
            return false
        end
        assert(t.poll(function() return aggregated(0) and #calls() > 0 end, 6), "no aggregated decision and call")
        local before = calls()
        -- the replica has lost the last increments of the fencing counter and the lease (asynchronous replication:
        -- written here on the replica, which takes writes, just before the master dies), so that the leader after
        -- the failover starts a new leadership from a smaller counter than any before
        report.fence_master = tonumber(ask(M, "admin-secret", "get", "autoscale:api:fence"))
        ask(R, "admin-secret", "set", "autoscale:api:fence", "0")
        ask(R, "admin-secret", "del", "autoscale:api:lease")
        local killed = now()
        master:signal("KILL")
        assert(t.poll(function() return sentinel_master() == R end, 15), "no failover")
        report.failover = now() - killed
        if not t.poll(function() return met() and aggregated(killed + report.failover) end, 10) then
            error("the gateways did not follow the new master: " .. why())
        end
        report.recovered = now() - killed
        assert(t.poll(function()
            for _, x in ipairs(calls()) do
                if x.decision.ts > killed + report.recovered then return true end
            end
        end, 6), "no call after the failover")
        -- a partition: the new master stops answering (SIGSTOP) for 2 s: each gateway decides alone and says so
        -- (mode no_redis, a dependency_down event), then one leader again
        local down_before = #process.events(GWA, "dependency_down") + #process.events(GWB, "dependency_down")
        replica:signal("STOP")
        local alone = t.poll(function()
            local a, b = modes()
            return a == "no_redis" and b == "no_redis"
        end, 4)
        report.partition = alone and (#process.events(GWA, "dependency_down") + #process.events(GWB, "dependency_down") - down_before)
        ngx.sleep(1) -- more failed attempts: still one event per gateway
        replica:signal("CONT")
        report.rejoined = t.poll(met, 6)
        local ra, rb = select(2, assert(ngx.thread.wait(la))), select(2, assert(ngx.thread.wait(lb)))
        report.errors, report.requests = ra.errors + rb.errors, ra.total + rb.total
        report.first_error = ra.first_error or rb.first_error
        -- the leader decisions of both gateways in time order: a token, once used, is never followed by a smaller
        -- one (at most one leader at a time), and two gateways never share a token
        local leads = {}
        for _, st in ipairs { state(GWA), state(GWB) } do
            for _, d in ipairs(st.decisions) do
                if d.mode == "leader" then leads[#leads + 1] = d end
            end
        end
        table.sort(leads, function(x, y) return x.time < y.time end)
        local owner, top, back = {}, 0, 0
        report.shared = 0
        for _, d in ipairs(leads) do
            if owner[d.fencing_token] and owner[d.fencing_token] ~= d.gateway then report.shared = report.shared + 1 end
            owner[d.fencing_token] = d.gateway
            if d.fencing_token < top then back = back + 1 end
            top = math.max(top, d.fencing_token)
        end
        report.backwards = back
        local pre, post, refused = 0, math.huge, 0
        for _, x in ipairs(calls()) do
            if x.status == 409 then refused = refused + 1 end
            if x.decision.ts < killed then pre = math.max(pre, x.decision.fencing_token)
            elseif x.decision.ts > killed + report.recovered then post = math.min(post, x.decision.fencing_token) end
        end
        report.refused, report.larger = refused, post > pre
        report.calls_before = #before
        -- one dependency_down and one dependency_up event per gateway for the episode, not one per attempt
        report.episodes = {}
        for _, port in ipairs { GWA, GWB } do
            report.episodes[#report.episodes + 1] = #process.events(port, "dependency_down") .. " down, "
                .. #process.events(port, "dependency_up") .. " up"
        end
    end)
    for i = #procs, 1, -1 do procs[i]:stop() end
    assert(ok, err)
    ngx.log(ngx.WARN, "sentinel failover: ", cjson.encode(report))
    ngx.say("client errors: ", report.errors, " of more than 1000 requests: ", report.requests > 1000, " ", tostring(report.first_error))
    ngx.say("new master within 10 s: ", report.failover < 10, ", gateways follow it within 5 s more: ", report.recovered - report.failover < 5)
    ngx.say("leader decisions with a smaller token than one before: ", report.backwards, ", tokens of two gateways: ", report.shared)
    ngx.say("counter on the old master above the promoted replica's: ", (report.fence_master or 0) > 0)
    ngx.say("calls refused as stale: ", report.refused, ", tokens after the failover larger: ", report.larger)
    ngx.say("partition: both gateways alone, dependency_down events: ", report.partition, ", one leader again: ", report.rejoined)
    ngx.say("events of the two episodes on each gateway: ", table.concat(report.episodes, "; "))
} }
--- request
GET /t
--- timeout: 60
--- response_body
client errors: 0 of more than 1000 requests: true nil
new master within 10 s: true, gateways follow it within 5 s more: true
leader decisions with a smaller token than one before: 0, tokens of two gateways: 0
counter on the old master above the promoted replica's: true
calls refused as stale: 0, tokens after the failover larger: true
partition: both gateways alone, dependency_down events: 2, one leader again: true
events of the two episodes on each gateway: 2 down, 2 up; 2 down, 2 up



=== TEST 2: bad Sentinel options are refused with the field path and the reason
--- http_config
    init_by_lua_block {
        local config = require "resty.autoscale.config"
        local out = {}
        for _, r in ipairs {
            { sentinels = { "127.0.0.1:26379" } },
            { master_name = "main" },
            { master_name = "main", sentinels = {} },
            { master_name = "a b", sentinels = { "127.0.0.1:26379" } },
            { master_name = "main", sentinels = { "127.0.0.1" } },
            { master_name = "main", sentinels = { "127.0.0.1:0" } },
            { master_name = "main", sentinels = { 26379 } },
            { master_name = "main", sentinels = { "127.0.0.1:26379" }, host = "10.0.0.1" },
            { master_name = "main", sentinels = { "127.0.0.1:26379" }, username = "gw" },
            { master_name = "main", sentinels = { "127.0.0.1:26379" }, sentinel_username = "s", password = "p" },
            { master_name = "main", sentinels = { "127.0.0.1:26379" }, password = "" },
            { ssl = "yes" },
            { ssl = true, server_name = "a b" },
            { master_name = "main", sentinels = { "127.0.0.1:26379", "[::1]:26380" }, username = "gw", password = "p",
              sentinel_username = "s", sentinel_password = "q" },
        } do
            local c, err = config.validate { upstreams = { api = { peers = { "127.0.0.1:1" } } }, cluster = { redis = r } }
            out[#out + 1] = c and ("ok: " .. #c.cluster.redis.sentinels .. " sentinels, " .. c.cluster.redis.sentinels[2].host) or err
        end
        results = table.concat(out, "\n")
    }
--- config
    location = /t { content_by_lua_block { ngx.say(results) } }
--- request
GET /t
--- response_body
cluster.redis.master_name: must be 1-100 of letters, digits, '_', '.', '-' (got nil)
cluster.redis.sentinels: must be a list of 1-16 "host:port" (got nil)
cluster.redis.sentinels: must be a list of 1-16 "host:port" (got 0 entries)
cluster.redis.master_name: must be 1-100 of letters, digits, '_', '.', '-' (got "a b")
cluster.redis.sentinels[1]: must be "host:port" (got "127.0.0.1")
cluster.redis.sentinels[1]: must be "host:port" (got "127.0.0.1:0")
cluster.redis.sentinels[1]: must be "host:port" (got 26379)
cluster.redis: takes either host/port or sentinels/master_name, not both
cluster.redis.username: needs a password
cluster.redis.sentinel_username: needs a sentinel_password
cluster.redis.password: must be a non-empty string without control characters
cluster.redis.ssl: must be true or false (got "yes")
cluster.redis.server_name: must be a host name (got "a b")
ok: 2 sentinels, ::1



=== TEST 3: cluster.redis over TLS: the exchange goes through with the certificate checked, and fails with another server name or without TLS
--- skip_eval: 1: !($::Have{'redis-server'} && $::Have_tls)
--- http_config
    lua_ssl_trusted_certificate $TEST_NGINX_TLS_DIR/cert.pem;
--- config
location = /t { content_by_lua_block {
    local t = require "autoscale_test"
    local process = require "autoscale_process"
    local cluster = require "resty.autoscale.cluster"
    local dir = ngx.config.prefix() .. "logs/"
    local P, tls = $TEST_NGINX_TLSREDIS_PORT, "$TEST_NGINX_TLS_DIR"
    local redis = process.start("redis-server --port 0 --tls-port " .. P .. " --bind 127.0.0.1 --save '' --appendonly no --dir " .. dir
        .. " --tls-cert-file " .. tls .. "/cert.pem --tls-key-file " .. tls .. "/key.pem --tls-ca-cert-file " .. tls .. "/cert.pem"
        .. " --tls-auth-clients no --requirepass tls-secret", dir .. "redis-tls.log", 30)
    local ok, err = pcall(function()
        assert(t.poll(function() return process.listening(P) end, 10), "redis did not start: " .. process.read(dir .. "redis-tls.log"))
        local function try(more)
            local r = { port = P, password = "tls-secret", timeout = 2 }
            for k, v in pairs(more) do r[k] = v end
            local c = assert(cluster.validate { gateway_id = "gw-tls", redis = r })
            local view, e = cluster.exchange(c, "api", { inflight = 1, ready = 1 })
            return view and ("leader " .. tostring(view.leader) .. ", token " .. view.token) or e:gsub("%d+", "N")
        end
        ngx.say("TLS, server name redis.test: ", try { ssl = true, server_name = "redis.test" })
        ngx.say("TLS again (a kept connection): ", try { ssl = true, server_name = "redis.test" })
        ngx.say("TLS, server name other.test: ", try { ssl = true, server_name = "other.test" })
        ngx.say("TLS, not checked: ", try { ssl = true, server_name = "other.test", ssl_verify = false })
        ngx.say("without TLS: ", try {})
    end)
    redis:stop()
    assert(ok, err)
} }
--- request
GET /t
--- response_body
TLS, server name redis.test: leader true, token 1
TLS again (a kept connection): leader true, token 1
TLS, server name other.test: redis N.N.N.N:N TLS: certificate host mismatch
TLS, not checked: leader true, token 1
without TLS: redis N.N.N.N:N auth: connection reset by peer
