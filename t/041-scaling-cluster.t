# vim:set ft= ts=4 sw=4 et:
# Several gateways coordinated through a real Redis (redis-server started and stopped here by PID): with 2 gateways
# sharing it, exactly one actuator call is made per decision, by the leader, for the demand of both gateways; killing
# Redis mid-test loses no client request and stops actuation until it returns.
# Ports (random free ones in 26400-26599): Redis REDIS_PORT, the receiver HOOK_PORT, the gateways of TEST 1 GWA_PORT
# and GWB_PORT.

use lib 't';
use Autoscale;
require './t/lib/scaling_ports.pl';
scaling_ports(qw(REDIS HOOK GWA GWB));

workers(1);
worker_connections(1024);
master_on();

our %Have = map { my $tool = $_; ($tool => scalar grep { -x "$_/$tool" } split /:/, $ENV{PATH}) } qw(redis-server);
diag("redis-server not found (Debian package redis-server): skipped") unless $Have{'redis-server'};

# The gateway's upstream, shared by both gateways of TEST 1 (each written from it by the test).
our $Upstream = <<'_EOC_';
        autoscale.configure {
            cluster = { gateway_id = "GATEWAY", redis = { port = $TEST_NGINX_REDIS_PORT, timeout = 0.2 }, lease = 1.5, demand_ttl = 1.5 },
            upstreams = { api = { peers = { "127.0.0.1:$TEST_NGINX_RAND_PORT_1", "127.0.0.1:$TEST_NGINX_RAND_PORT_2" },
                scaling = { min = 2, max = 20, utilization = { capacity = 4, target = 0.75 }, cooldown = 1,
                            provision_timeout = PROVISION,
                            actuator = { type = "webhook", url = "http://127.0.0.1:$TEST_NGINX_HOOK_PORT/scale",
                                         secret = "0123456789abcdef-secret", retries = 1 } } } },
        }
_EOC_

# The two backends (ports 1 and 2) that the gateways balance.
our $Backends = <<'_EOC_';
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1;
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_2;
        location / { content_by_lua_block { ngx.sleep(0.05) ngx.say("ok") } }
    }
_EOC_

# The test's nginx as the gateway (port 5), with the backends.
sub http_config {
    my ($provision) = @_;
    (my $up = $Upstream) =~ s/GATEWAY/gw-a/;
    $up =~ s/PROVISION/$provision/;
    return <<_EOC_;
    lua_shared_dict autoscale_scaling 1m;
$Backends
    init_by_lua_block {
        autoscale = require "resty.autoscale"
$up
    }
    init_worker_by_lua_block { autoscale.init_worker() }
    upstream api { server 0.0.0.1; balancer_by_lua_block { autoscale.balance("api") } }
    server {
        listen 127.0.0.1:\$TEST_NGINX_RAND_PORT_5;
        location = /scaling { content_by_lua_block { autoscale.scaling_handler() } }
        location / { proxy_pass http://api; log_by_lua_block { autoscale.log() } }
    }
_EOC_
}

our $Helpers = <<'_EOC_';
    local t = require "autoscale_test"
    local process = require "autoscale_process"
    local cjson = require "cjson"
    local gw_a, gw_b = $TEST_NGINX_RAND_PORT_5, $TEST_NGINX_GWB_PORT
    local dir = ngx.config.prefix() .. "logs/"
    local function now() ngx.update_time() return ngx.now() end
    local procs = {}

    local function start(name, cmd, port)
        local p = process.start(cmd, dir .. name .. ".log", 60)
        procs[#procs + 1] = p
        assert(t.poll(function() return process.listening(port) end, 5), name .. " did not start: " .. process.read(dir .. name .. ".log"))
        return p
    end
    local function redis()
        return start("redis", "redis-server --port $TEST_NGINX_REDIS_PORT --bind 127.0.0.1 --save '' --appendonly no --dir " .. dir, $TEST_NGINX_REDIS_PORT)
    end
    local function receiver()
        return start("receiver", "python3 $TEST_NGINX_REPO/t/lib/scale_receiver.py --port $TEST_NGINX_HOOK_PORT --secret 0123456789abcdef-secret", $TEST_NGINX_HOOK_PORT)
    end
    -- a gateway of its own: another nginx (in logs/`name`/) on `port` with the upstream api configured by `upstream`
    local function gateway(name, port, upstream, extra)
        local root = dir .. name .. "/"
        os.execute("mkdir -p " .. root .. "conf " .. root .. "logs")
        process.write(root .. "conf/nginx.conf", table.concat({
            "load_module /usr/lib/nginx/modules/ndk_http_module.so;",
            "load_module /usr/lib/nginx/modules/ngx_http_lua_module.so;",
            "pid " .. root .. "logs/nginx.pid;", "error_log " .. root .. "logs/error.log notice;",
            "worker_processes 1;", "events { worker_connections 1024; }", "http {",
            "access_log off;",
            "client_body_temp_path " .. root .. "cb; proxy_temp_path " .. root .. "px; fastcgi_temp_path " .. root .. "fc;",
            "uwsgi_temp_path " .. root .. "uw; scgi_temp_path " .. root .. "sc;",
            "lua_package_path '" .. package.path .. "'; lua_package_cpath '" .. package.cpath .. "';",
            "lua_shared_dict autoscale_scaling 1m;",
            "init_by_lua_block { autoscale = require 'resty.autoscale'\n" .. upstream .. "\n}",
            "init_worker_by_lua_block { autoscale.init_worker() }",
            "upstream api { server 0.0.0.1; balancer_by_lua_block { autoscale.balance('api') } }",
            "server { listen 127.0.0.1:" .. port .. ";",
            "location = /scaling { content_by_lua_block { autoscale.scaling_handler() } }",
            extra or "location / { proxy_pass http://api; log_by_lua_block { autoscale.log() } }", "}", "}",
        }, "\n"))
        return start(name, "/usr/sbin/nginx -p " .. root .. " -c conf/nginx.conf -g 'daemon off;'", port)
    end
    -- the [error] (and worse) lines in the error log of gateway `name`
    local function gateway_errors(name)
        local out = {}
        for line in process.read(dir .. name .. "/logs/error.log"):gmatch("[^\n]+") do
            if line:find("%[error%]") or line:find("%[crit%]") or line:find("%[alert%]") or line:find("%[emerg%]") then
                out[#out + 1] = line
            end
        end
        return #out .. (#out > 0 and ":\n" .. table.concat(out, "\n") or "")
    end
    local function stop_all()
        for i = #procs, 1, -1 do procs[i]:stop() end
    end
    local function calls()
        local status, body = t.get($TEST_NGINX_HOOK_PORT, "/calls")
        assert(status == 200, "receiver: " .. tostring(status))
        return cjson.decode(body)
    end
    local function state(port)
        local _, body = t.get(port, "/scaling?service=api&decisions=400")
        return cjson.decode(body)
    end
    local function background(port, clients, seconds)
        return ngx.thread.spawn(t.load, { port = port, path = "/", concurrency = clients, duration = seconds })
    end
_EOC_

run_tests();

__DATA__

=== TEST 1: two gateways share Redis: one leader calls the actuator once per decision, for the demand of both
--- skip_eval: 3: !$::Have{'redis-server'}
--- http_config eval: $::Backends
--- config eval
my ($a, $b) = map { $::Upstream =~ s/GATEWAY/$_/r =~ s/PROVISION/30/r } qw(gw-a gw-b);
"location = /t { content_by_lua_block { $::Helpers " . <<'_EOC_' =~ s/UPSTREAM_A/$a/r =~ s/UPSTREAM_B/$b/r;
    -- Both gateways are nginx processes of their own, started once Redis and the receiver listen and stopped before
    -- them (a scaler that ticks while Redis is not there logs [error] lines, its connection's), and away from this
    -- worker, which blocks while it starts processes.
    gw_a = $TEST_NGINX_GWA_PORT
    local ok, err = pcall(function()
        redis()
        receiver()
        gateway("gw-a", gw_a, [==[UPSTREAM_A]==])
        gateway("gw-b", gw_b, [==[UPSTREAM_B]==])
        assert(t.poll(function() -- both gateways have met in Redis
            local a, b = state(gw_a), state(gw_b)
            return (a.mode == "leader" and b.mode == "follower") or (a.mode == "follower" and b.mode == "leader")
        end, 5), "no leader and follower")
        -- 8 clients on each gateway: 8 in flight is 3 instances' worth on one gateway, 16 (6 instances) on both
        local a, b = background(gw_a, 8, 4), background(gw_b, 8, 4)
        local ra, rb = select(2, assert(ngx.thread.wait(a))), select(2, assert(ngx.thread.wait(b)))
        ngx.sleep(0.5) -- a call decided at the end of the load arrives
        local c = calls()
        local sa, sb = state(gw_a), state(gw_b)
        local keys, gateways, tokens = {}, {}, {}
        local dup = 0
        for _, x in ipairs(c) do
            if keys[x.decision.idempotency_key] then dup = dup + 1 end
            keys[x.decision.idempotency_key] = true
            gateways[x.decision.gateway] = true
            tokens[x.decision.fencing_token] = true
        end
        local ng, nt = 0, 0
        for _ in pairs(gateways) do ng = ng + 1 end
        for _ in pairs(tokens) do nt = nt + 1 end
        local leader, follower = sa, sb
        if sb.mode == "leader" then leader, follower = sb, sa end
        local actions = sa.actions.up + sa.actions.down + sb.actions.up + sb.actions.down
        -- the largest action: the two loads start a moment apart, so an early action may see one gateway's demand only
        local first
        for _, d in ipairs(leader.decisions) do
            if d.action and (not first or d.desired > first.desired) then first = d end
        end
        ngx.say("client errors: ", ra.errors + rb.errors)
        ngx.say("calls: ", #c > 0, ", from gateways: ", ng, ", fencing tokens: ", nt, ", repeated keys: ", dup,
                ", all verified and 200: ", (function() for _, x in ipairs(c) do if not x.verified or x.status ~= 200 then return false end end return true end)())
        ngx.say("calls = actions decided by both gateways: ", #c == actions, ", by the follower: ",
                follower.actions.up + follower.actions.down)
        ngx.say("modes: ", leader.mode, " and ", follower.mode, ", follower shows the leader's desired: ",
                follower.desired == leader.desired)
        ngx.say("largest decision from both gateways' demand: gateways ", first.inputs.gateways, ", in flight > 8 (one gateway's clients) ",
                first.inputs.inflight > 8, ", desired > 3 ", first.desired > 3)
    end)
    stop_all() -- the gateways first, then the receiver and Redis
    assert(ok, err)
    ngx.say("[error] lines in the logs of gw-a: ", gateway_errors("gw-a"), ", of gw-b: ", gateway_errors("gw-b"))
} }
_EOC_
--- request
GET /t
--- timeout: 30
--- response_body
client errors: 0
calls: true, from gateways: 1, fencing tokens: 1, repeated keys: 0, all verified and 200: true
calls = actions decided by both gateways: true, by the follower: 0
modes: leader and follower, follower shows the leader's desired: true
largest decision from both gateways' demand: gateways 2, in flight > 8 (one gateway's clients) true, desired > 3 true
[error] lines in the logs of gw-a: 0, of gw-b: 0
--- no_error_log
[error]



=== TEST 2: Redis killed mid-test: no client request lost, no actuator call until Redis is back, then calls resume
--- skip_eval: 3: !$::Have{'redis-server'}
--- http_config eval: main::http_config(1)
--- config eval
"location = /t { content_by_lua_block { $::Helpers " . <<'_EOC_';
    local ok, err = pcall(function()
        local r = redis()
        receiver()
        local t0 = now()
        local load = background(gw_a, 16, 10) -- wants 6 instances; with provision_timeout 1 s it keeps asking
        assert(t.poll(function() return #calls() > 0 end, 3), "no call with Redis up")
        local killed = now()
        r:stop()
        local down = #calls()
        ngx.sleep(3)
        local during = 0
        for _, x in ipairs(calls()) do
            if x.decision.ts > killed then during = during + 1 end
        end
        local st = state(gw_a)
        local back = now()
        redis()
        local resumed = t.poll(function()
            for _, x in ipairs(calls()) do
                if x.decision.ts > back then return true end
            end
        end, 5)
        local res = select(2, assert(ngx.thread.wait(load)))
        local modes = {}
        for _, d in ipairs(state(gw_a).decisions) do
            modes[#modes + 1] = d.mode
        end
        ngx.log(ngx.WARN, "requests ", res.total, " errors ", res.errors, "; modes ", table.concat(modes, ","))
        ngx.say("client requests lost: ", res.errors, " of more than 1000: ", res.total > 1000)
        ngx.say("calls decided while Redis was down: ", during, ", mode then: ", st.mode, ", suppressed actions: ",
                st.suppressed > 0)
        ngx.say("calls resumed after Redis returned: ", resumed)
    end)
    stop_all()
    assert(ok, err)
} }
_EOC_
--- request
GET /t
--- timeout: 30
--- response_body
client requests lost: 0 of more than 1000: true
calls decided while Redis was down: 0, mode then: no_redis, suppressed actions: true
calls resumed after Redis returned: true
--- error_log
deciding locally, not acting



=== TEST 3: scale from zero with two gateways: requests held on the follower wake the leader, whose one call counts them
--- skip_eval: 3: !$::Have{'redis-server'}
--- http_config eval: $::Backends
--- config eval
my ($a, $b) = map { my $g = $_; $::Upstream =~ s/GATEWAY/$g/r =~ s/PROVISION/30/r
    =~ s/min = 2, max = 20, utilization = \{ capacity = 4, target = 0.75 \}/min = 0, max = 4, interval = 0.2, rps = { target = 1000 }, hold = { max_requests = 20, timeout = 10 }/r
    =~ s/peers = \{ "127.0.0.1:\$TEST_NGINX_RAND_PORT_1", /peers = { /r } qw(gw-a gw-b);
"location = /t { content_by_lua_block { $::Helpers " . <<'_EOC_' =~ s/UPSTREAM_A/$a/r =~ s/UPSTREAM_B/$b/r;
    gw_a = $TEST_NGINX_GWA_PORT
    local peer = "127.0.0.1:$TEST_NGINX_RAND_PORT_2"
    local extra = table.concat({
        "location / { proxy_pass http://api; recursive_error_pages on; error_page 502 504 = @fallback;",
        "             log_by_lua_block { autoscale.log() } }",
        "location @fallback { content_by_lua_block { autoscale.fallback('api') } }",
        "location = /drain { content_by_lua_block { ngx.say(autoscale.control.drain('api', '" .. peer .. "')) } }",
        "location = /enable { content_by_lua_block { ngx.say(autoscale.control.enable('api', '" .. peer .. "')) } }",
    }, "\n")
    local ok, err = pcall(function()
        redis()
        receiver()
        gateway("gw-a", gw_a, [==[UPSTREAM_A]==], extra)
        gateway("gw-b", gw_b, [==[UPSTREAM_B]==], extra)
        assert(t.poll(function()
            local a, b = state(gw_a), state(gw_b)
            return (a.mode == "leader" and b.mode == "follower") or (a.mode == "follower" and b.mode == "leader")
        end, 5), "no leader and follower")
        local leader, follower = gw_a, gw_b
        if state(gw_b).mode == "leader" then leader, follower = gw_b, gw_a end
        -- zero instances: the one peer drained on both gateways
        t.get(gw_a, "/drain")
        t.get(gw_b, "/drain")
        local held = {}
        for i = 1, 3 do
            held[i] = ngx.thread.spawn(t.request, { port = follower, path = "/", timeout = 15000 })
        end
        local called = t.poll(function() return #calls() > 0 end, 5)
        local c = calls()
        local ls, fs = state(leader), state(follower)
        local from_leader = c[1] and c[1].decision.gateway == ls.decisions[#ls.decisions].gateway
        local counted
        for _, d in ipairs(ls.decisions) do
            if d.reason == "activate" then counted = d.inputs.held end
        end
        ngx.say("held on the follower: ", fs.held, "; leader called: ", called, ", calls ", #c, ", desired ",
                c[1] and c[1].decision.desired, ", current ", c[1] and c[1].decision.current,
                "; from the leader ", from_leader, ", the follower's held counted ", counted,
                "; follower's own actions ", fs.actions.up)
        -- the instance is up: on both gateways
        t.get(gw_a, "/enable")
        t.get(gw_b, "/enable")
        local codes = {}
        for i = 1, 3 do codes[i] = select(2, ngx.thread.wait(held[i])) end
        ngx.say("released: ", table.concat(codes, " "), "; calls ", #calls())
    end)
    stop_all()
    assert(ok, err)
} }
_EOC_
--- request
GET /t
--- timeout: 30
--- response_body
held on the follower: 3; leader called: true, calls 1, desired 1, current 0; from the leader true, the follower's held counted 3; follower's own actions 0
released: 200 200 200; calls 1
