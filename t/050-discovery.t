# vim:set ft= ts=4 sw=4 et:
# Service discovery: bad `discovery` options stop nginx with the field path; the standby pool activates and
# deactivates peers in every worker at once, and a deactivated peer's in-flight requests finish with 200 before it is
# removed. (DNS: t/050-discovery-dns.t; etcd: t/050-discovery-etcd.t; the orchestrator: t/050-discovery-orchestrator.t)

use lib 't';
use Autoscale;

workers(2);
worker_connections(1024); # the gateway, its backends and their keepalive connections share the workers
master_on();

$ENV{AUTOSCALE_T_ADMIN_TOKEN} = 'discovery-test-token-0123456789';

# Backends on ports 1-4 answer their port after the delay stored under "delay:<port>" and count their requests.
our $HttpConfig = <<'_EOC_';
    lua_shared_dict ctl 1m;
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1;
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_2;
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_3;
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_4;
        location / {
            content_by_lua_block {
                local port = ngx.var.server_port
                ngx.shared.ctl:incr("hits:" .. port, 1, 0)
                local delay = ngx.shared.ctl:get("delay:" .. port)
                if delay then ngx.sleep(delay) end
                ngx.say(port)
            }
        }
    }
    init_by_lua_block {
        autoscale = require "resty.autoscale"
        autoscale.configure { upstreams = { api = {
            balancer = "round_robin", slow_start = 0,
            peers = { "127.0.0.1:$TEST_NGINX_RAND_PORT_1" },
            discovery = { standby = { "127.0.0.1:$TEST_NGINX_RAND_PORT_2", "127.0.0.1:$TEST_NGINX_RAND_PORT_3" },
                          drain_timeout = 10 },
        } } }
        autoscale.admin { token_env = "AUTOSCALE_T_ADMIN_TOKEN", allow = { "127.0.0.1", "unix:" } }
    }
    init_worker_by_lua_block { autoscale.init_worker() }
    upstream api {
        server 0.0.0.1;
        balancer_by_lua_block { autoscale.balance("api") }
        keepalive 16;
    }
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_5 reuseport;
        location / {
            proxy_pass http://api;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            log_by_lua_block { autoscale.log() }
        }
        location = /discovery { content_by_lua_block { autoscale.discovery_handler() } }
        location = /status { content_by_lua_block { autoscale.status_handler() } }
    }
_EOC_

run_tests();

__DATA__

=== TEST 1: bad discovery options are refused with the field path and the reason
--- config
    location = /t {
        content_by_lua_block {
            local config = require "resty.autoscale.config"
            local function check(d, peers)
                local c, err = config.validate { upstreams = { api = { peers = peers or { "127.0.0.1:1" }, discovery = d } } }
                ngx.say(c and "ok" or err)
            end
            check "x"
            check {}
            check { typo = 1 }
            check { standby = {} }
            check { standby = { "backend:80" } }
            check { standby = { "127.0.0.1:1" } }
            check { standby = { "127.0.0.1:2", "127.0.0.1:2" } }
            check { standby = { { addr = "127.0.0.1:2", weight = 0 } } }
            check { standby = { "127.0.0.1:2" }, drain_timeout = -1 }
            check { standby = { "127.0.0.1:2" }, keep_static = "no" }
            check { dns = { name = "api.service.consul", nameservers = { "127.0.0.1:53" } } }
            check { dns = { name = "bad name", port = 80 } }
            check { dns = { name = "_api._tcp.service.consul", type = "SRV", port = 80, nameservers = { "127.0.0.1" } } }
            check { dns = { name = "a.b", type = "MX", port = 80 } }
            check { dns = { name = "a.b", port = 80, nameservers = { "localhost" } } }
            check { dns = { name = "a.b", port = 80, nameservers = { "127.0.0.1" }, min_ttl = 5, max_ttl = 1 } }
            check { etcd = { endpoints = { "http://127.0.0.1:2379/v3" }, prefix = "/svc/" } }
            check { etcd = { endpoints = { "127.0.0.1:2379" }, prefix = "/svc/" } }
            check { etcd = { endpoints = { "http://127.0.0.1:2379" } } }
            check { etcd = { endpoints = { "http://127.0.0.1:2379" }, prefix = "/svc/", interval = 0 } }
            check({ standby = { "[::1]:80" } }, { "[0:0::1]:80" })
            check { standby = { { addr = "[2001:DB8:0:0:1::1]:80", weight = 2 } },
                    dns = { name = "_http._tcp.api.default.svc.cluster.local", type = "SRV", nameservers = { "[::1]:53" } },
                    etcd = { endpoints = { "http://127.0.0.1:2379", "https://[::1]:2379/" }, prefix = "/svc/api/" } }
        }
    }
--- request
GET /t
--- response_body
upstreams.api.discovery: must be a table (got string)
upstreams.api.discovery: names no source: give standby, dns, etcd, consul and/or kubernetes
upstreams.api.discovery.typo: unknown option (valid: consul, dns, drain_timeout, empty_grace, etcd, keep_static, kubernetes, standby)
upstreams.api.discovery.standby: must be a non-empty list of "ip:port" or { addr = "ip:port", weight = n }
upstreams.api.discovery.standby[1]: must be "ip:port", "[ipv6]:port" or { addr = ..., weight = n } (got "backend:80")
upstreams.api.discovery.standby[1]: 127.0.0.1:1 is also in peers
upstreams.api.discovery.standby[2]: 127.0.0.1:2 is listed twice
upstreams.api.discovery.standby[1].weight: must be between 1 and 10000 (got 0)
upstreams.api.discovery.drain_timeout: must be between 0 and 86400 (got -1)
upstreams.api.discovery.keep_static: must be true or false (got "no")
upstreams.api.discovery.dns.port: required for A records
upstreams.api.discovery.dns.name: must be a DNS name (letters, digits, '-', '_', '.'; got "bad name")
upstreams.api.discovery.dns.port: SRV records carry their own ports: leave port out
upstreams.api.discovery.dns.type: must be "A", "AAAA" or "SRV" (got "MX")
upstreams.api.discovery.dns.nameservers[1]: must be "ip", "ip:port" or "[ipv6]:port" (got "localhost")
upstreams.api.discovery.dns.max_ttl: must not be less than min_ttl (1 < 5)
upstreams.api.discovery.etcd.endpoints[1]: must be "http://host:port" or "https://host:port" (has a path; got "http://127.0.0.1:2379/v3")
upstreams.api.discovery.etcd.endpoints[1]: must be "http://host:port" or "https://host:port" (must start with http:// or https://; got "127.0.0.1:2379")
upstreams.api.discovery.etcd.prefix: must be a non-empty string, e.g. "/services/api/" (got nil)
upstreams.api.discovery.etcd.interval: must be between 0.05 and 3600 (got 0)
upstreams.api.discovery.standby[1]: [::1]:80 is also in peers
ok
--- no_error_log
[error]



=== TEST 2: addresses compare in the library's form; etcd values parse strictly and never raise
--- config
    location = /t {
        content_by_lua_block {
            local addr = require "resty.autoscale.discovery.addr"
            local etcd = require "resty.autoscale.discovery.etcd"
            for _, a in ipairs { "127.0.0.1:80", "[::1]:80", "[0:0:0:0:0:0:0:1]:80", "[2001:DB8:0:0:1:0:0:1]:8080",
                                 "[2001:db8::]:1", "[fe80:0:0:0:0:0:0:0]:2", "[1:0:0:2:0:0:0:3]:3",
                                 "127.0.0.256:80", "127.0.0.1:0", "127.0.0.1:65536", "[::1::2]:80", "[1:2:3:4:5:6:7:8:9]:1",
                                 "01.2.3.4:5", "host:80" } do
                ngx.say(a, " -> ", tostring(addr.canonical(a)))
            end
            for _, v in ipairs { "127.0.0.1:9001", ' {"addr":"127.0.0.1:9002","weight":3} ', '{"addr":"127.0.0.1:9003"}',
                                 '{"addr":"127.0.0.1:9004","weight":0}', '{"weight":1}', "{", "nope" } do
                local p, err = etcd.peer(v)
                ngx.say(v, " -> ", p and (p.addr .. " w" .. p.weight) or err)
            end
            -- no input may raise: random bytes and mutations of valid values
            math.randomseed(5)
            local seeds = { "127.0.0.1:9001", '{"addr":"[::1]:1","weight":2}', "[1:2::3]:4" }
            local raised = 0
            for i = 1, 20000 do
                local s
                if i % 2 == 0 then
                    local b = {}
                    for j = 1, math.random(0, 40) do b[j] = string.char(math.random(0, 255)) end
                    s = table.concat(b)
                else
                    s = seeds[i % 3 + 1]
                    local pos = math.random(1, #s)
                    s = s:sub(1, pos - 1) .. string.char(math.random(0, 255)) .. s:sub(pos + 1)
                end
                if not pcall(etcd.peer, s) or not pcall(addr.canonical, s) then raised = raised + 1 end
            end
            ngx.say("inputs that raised: ", raised)
        }
    }
--- request
GET /t
--- response_body
127.0.0.1:80 -> 127.0.0.1:80
[::1]:80 -> [::1]:80
[0:0:0:0:0:0:0:1]:80 -> [::1]:80
[2001:DB8:0:0:1:0:0:1]:8080 -> [2001:db8::1:0:0:1]:8080
[2001:db8::]:1 -> [2001:db8::]:1
[fe80:0:0:0:0:0:0:0]:2 -> [fe80::]:2
[1:0:0:2:0:0:0:3]:3 -> [1:0:0:2::3]:3
127.0.0.256:80 -> nil
127.0.0.1:0 -> nil
127.0.0.1:65536 -> nil
[::1::2]:80 -> nil
[1:2:3:4:5:6:7:8:9]:1 -> nil
01.2.3.4:5 -> nil
host:80 -> nil
127.0.0.1:9001 -> 127.0.0.1:9001 w1
 {"addr":"127.0.0.1:9002","weight":3}  -> 127.0.0.1:9002 w3
{"addr":"127.0.0.1:9003"} -> 127.0.0.1:9003 w1
{"addr":"127.0.0.1:9004","weight":0} -> weight must be an integer between 1 and 10000
{"weight":1} -> not {"addr":"ip:port","weight":n}
{ -> not {"addr":"ip:port","weight":n}
nope -> not "ip:port"
inputs that raised: 0
--- no_error_log
[error]



=== TEST 3: the standby pool: activate and deactivate reach both workers; a drained peer's requests finish with 200
--- http_config eval: $::HttpConfig
--- config
    location = /t {
        content_by_lua_block {
            local t = require "autoscale_test"
            local cjson = require "cjson"
            local gw = $TEST_NGINX_RAND_PORT_5
            local p1, p2, p3 = "$TEST_NGINX_RAND_PORT_1", "$TEST_NGINX_RAND_PORT_2", "$TEST_NGINX_RAND_PORT_3"
            local function post(q)
                local code, body = t.request { port = gw, method = "POST", path = "/discovery?" .. q,
                                               headers = { Authorization = "Bearer discovery-test-token-0123456789",
                                                           ["Content-Type"] = "application/json" } }
                return code, body and cjson.decode(body)
            end
            local function served(n) -- which backends a burst of requests reached, as "port:count" in port order
                local res = t.load { port = gw, path = "/", concurrency = 4, requests = n }
                local out = {}
                for _, p in ipairs { p1, p2, p3 } do
                    if res.by_key[p .. "\n"] then out[#out + 1] = p == p1 and "p1" or p == p2 and "p2" or "p3" end
                end
                return table.concat(out, ",") .. (res.errors > 0 and (" (" .. res.errors .. " errors)") or "")
            end
            local function pool()
                local st = autoscale.status("api").discovery.standby
                local s = {}
                for _, p in ipairs(st.peers) do s[#s + 1] = p.state end
                return st.active .. " active: " .. table.concat(s, ",")
            end

            ngx.say("before: ", served(40), ", pool ", pool())
            local code, r = post("upstream=api&activate=1")
            ngx.say("activate 1: ", code, " ", r.activated, " ", r.peers[1] == "127.0.0.1:" .. p2)
            ngx.say("served: ", served(60), ", pool ", pool())
            code, r = post("upstream=api&activate=5")
            ngx.say("activate 5: ", code, " ", r.activated, ", pool ", pool())
            ngx.say("served: ", served(60))

            -- bad requests change nothing
            for _, q in ipairs { "upstream=api&activate=-1", "upstream=api&activate=x", "upstream=api",
                                 "upstream=api&activate=1&deactivate=1", "upstream=nope&activate=1", "activate=1" } do
                local c, b = post(q)
                ngx.say(q, " -> ", c, " ", b.error)
            end
            local c = t.request { port = gw, method = "DELETE", path = "/discovery?upstream=api" }
            ngx.say("DELETE -> ", c, ", pool ", pool())

            -- p3 answers after 1 s: deactivate it while it holds requests
            ngx.shared.ctl:set("delay:" .. p3, 1)
            local load = ngx.thread.spawn(t.load, { port = gw, path = "/", concurrency = 6, requests = 12 })
            assert(t.poll(function()
                local p = t.peer(autoscale.status("api"), "127.0.0.1:" .. p3)
                return p and p.inflight >= 1
            end, 5), "no request in flight on p3")
            ngx.update_time()
            local t0 = ngx.now()
            code, r = post("upstream=api&deactivate=1")
            -- counted once the drain is done (requests sent to p3 while the POST was on its way are not new)
            local hits = ngx.shared.ctl:get("hits:" .. p3)
            ngx.say("deactivate 1: ", code, " ", r.deactivated, " ", r.peers[1] == "127.0.0.1:" .. p3, ", pool ", pool())
            local inflight = t.peer(autoscale.status("api"), "127.0.0.1:" .. p3).inflight
            local _, res = ngx.thread.wait(load)
            local removed = t.poll(function() return t.peer(autoscale.status("api"), "127.0.0.1:" .. p3) == nil end, 5)
            ngx.update_time()
            ngx.say("in flight on p3 when drained >= 1: ", inflight >= 1, "; load: ", res.total, " requests, ",
                    res.errors, " errors; new requests to p3 after the drain: ", ngx.shared.ctl:get("hits:" .. p3) - hits)
            ngx.say("p3 removed after its requests finished: ", removed, ", pool ", pool())
            ngx.log(ngx.NOTICE, "drained peer removed ", ngx.now() - t0, " s after deactivate")
            ngx.shared.ctl:delete("delay:" .. p3)
            ngx.say("served: ", served(40))
            code, r = post("upstream=api&deactivate=9")
            ngx.say("deactivate 9: ", code, " ", r.deactivated, ", pool ", pool())
            ngx.say("state via GET: ", select(1, t.get(gw, "/discovery?upstream=api")), " ",
                    #cjson.decode((select(2, t.get(gw, "/discovery")))).upstreams.api.standby.peers)
        }
    }
--- request
GET /t
--- timeout: 30
--- response_body
before: p1, pool 0 active: standby,standby
activate 1: 200 1 true
served: p1,p2, pool 1 active: active,standby
activate 5: 200 1, pool 2 active: active,active
served: p1,p2,p3
upstream=api&activate=-1 -> 400 activate: must be a whole number (got "-1")
upstream=api&activate=x -> 400 activate: must be a whole number (got "x")
upstream=api -> 400 give exactly one of activate=n or deactivate=n
upstream=api&activate=1&deactivate=1 -> 400 give exactly one of activate=n or deactivate=n
upstream=nope&activate=1 -> 404 unknown upstream nope
activate=1 -> 400 upstream: required
DELETE -> 405, pool 2 active: active,active
deactivate 1: 200 1 true, pool 1 active: active,draining
in flight on p3 when drained >= 1: true; load: 12 requests, 0 errors; new requests to p3 after the drain: 0
p3 removed after its requests finished: true, pool 1 active: active,standby
served: p1,p2
deactivate 9: 200 1, pool 0 active: draining,standby
state via GET: 200 2
--- no_error_log
[error]



=== TEST 4: a bad discovery option stops nginx at start with the field path
--- http_config
    init_by_lua_block {
        require("resty.autoscale").configure { upstreams = { api = { peers = { "127.0.0.1:1" },
            discovery = { etcd = { endpoints = { "http://127.0.0.1:2379" }, prefix = "/svc/", timeout = "1s" } } } } }
    }
--- config
    location = /t { return 200; }
--- must_die
--- error_log
upstreams.api.discovery.etcd.timeout: must be a number (got string "1s")



=== TEST 5: a reload keeps the activated standby peer, with its statistics, and the pool's state
--- http_config eval: $::HttpConfig
--- config
    location = /t {
        content_by_lua_block {
            local t = require "autoscale_test"
            local process = require "autoscale_process"
            local gw = $TEST_NGINX_RAND_PORT_5
            local p2 = "127.0.0.1:$TEST_NGINX_RAND_PORT_2"
            assert(autoscale.discovery.activate("api", 1) == 1)
            local res = t.load { port = gw, path = "/", concurrency = 4, requests = 40 }
            local before = t.peer(autoscale.status("api"), p2).totals.requests
            local epoch = autoscale.status_all().region.config_epoch
            os.execute("kill -HUP " .. process.read(ngx.config.prefix() .. "logs/nginx.pid"):match("%d+"))
            assert(t.poll(function() return autoscale.status_all().region.config_epoch > epoch end, 10), "no reload")
            res = t.load { port = gw, path = "/", concurrency = 4, requests = 40 }
            local after = t.peer(autoscale.status("api"), p2)
            local st = autoscale.status("api").discovery.standby
            ngx.say("before the reload p2 served: ", before > 0, "; after: still in the upstream ", after ~= nil,
                    ", statistics kept ", after and after.totals.requests >= before, ", served ", res.by_key["$TEST_NGINX_RAND_PORT_2\n"] ~= nil,
                    "; pool ", st.active, " active of ", st.size)
        }
    }
--- request
GET /t
--- timeout: 20
--- response_body
before the reload p2 served: true; after: still in the upstream true, statistics kept true, served true; pool 1 active of 2
--- no_error_log
[error]



=== TEST 6: scale_to sets the number of serving peers within what the pool allows; tune cannot change discovery
--- http_config eval: $::HttpConfig
--- config
    location = /t {
        content_by_lua_block {
            local d = autoscale.discovery
            local function pool()
                local st = d.state("api").standby
                local s = {}
                for _, p in ipairs(st.peers) do s[#s + 1] = p.state end
                return table.concat(s, ",")
            end
            for _, n in ipairs { 3, 3, 2, 9, 1, 0 } do
                ngx.say("scale_to ", n, ": ", d.scale_to("api", n), " serving; pool ", pool())
            end
            for _, bad in ipairs { { "api", -1 }, { "api", 1.5 }, { "nope", 1 } } do
                ngx.say("scale_to ", tostring(bad[1]), " ", tostring(bad[2]), ": ", select(2, d.scale_to(bad[1], bad[2])))
            end
            ngx.say("tune: ", select(2, autoscale.control.tune("api", { discovery = { standby = { "127.0.0.1:9" } } })))
            d.scale_to("api", 2)
            local text = require("resty.autoscale.prometheus").render()
            for line in text:gmatch("[^\n]*standby_peers[^\n]*") do
                if line:sub(1, 1) == "#" then ngx.say(line) end
            end
            -- the peer still draining has nothing in flight: the other worker's discovery tick may finish its drain
            -- (draining -> standby) at any moment, so the two states are counted together
            local n = {}
            for state, v in text:gmatch('autoscale_discovery_standby_peers{upstream="api",state="(%a+)"} (%d+)') do
                n[state] = tonumber(v)
            end
            ngx.say("active ", n.active, ", draining + standby ", (n.draining or 0) + (n.standby or 0))
            local f = io.open(ngx.config.prefix() .. "logs/scrape.prom", "w")
            f:write(text)
            f:close()
            local have = os.execute("command -v promtool >/dev/null 2>&1") == 0 -- Debian package prometheus
            local promtool = have and io.popen("promtool check metrics < " .. ngx.config.prefix()
                                               .. "logs/scrape.prom 2>&1; echo rc=$?"):read("*a") or "rc=0 (skipped)"
            ngx.say("promtool: ", promtool:match("rc=(%d+)"))
        }
    }
--- request
GET /t
--- response_body
scale_to 3: 3 serving; pool active,active
scale_to 3: 3 serving; pool active,active
scale_to 2: 2 serving; pool active,draining
scale_to 9: 3 serving; pool active,active
scale_to 1: 1 serving; pool draining,draining
scale_to 0: 1 serving; pool draining,draining
scale_to api -1: count must be an integer between 0 and 65536 (got -1)
scale_to api 1.5: count must be an integer between 0 and 65536 (got 1.5)
scale_to nope 1: unknown upstream nope
tune: discovery: cannot be changed at run time (change nginx.conf and reload)
# HELP autoscale_discovery_standby_peers Peers of the standby pool by state (active: in rotation, draining: on the way out, standby: out of rotation).
# TYPE autoscale_discovery_standby_peers gauge
active 1, draining + standby 1
promtool: 0
--- no_error_log
[error]



=== TEST 7: a POST to the discovery handler needs the admin token, a client in the allow list by its own address (not X-Forwarded-For) and a JSON content type
--- http_config eval: $::HttpConfig
--- config
    location = /t {
        content_by_lua_block {
            local t = require "autoscale_test"
            local gw = $TEST_NGINX_RAND_PORT_5
            local function post(q, token, bind, ctype, xff)
                local h = { ["Content-Type"] = ctype, ["X-Forwarded-For"] = xff }
                if token then h.Authorization = "Bearer " .. token end
                local code, body = t.request { port = gw, method = "POST", path = "/discovery?" .. q, bind = bind,
                                               headers = h }
                return tostring(code) .. " " .. (body or ""):gsub("\n$", "")
            end
            local function active() return autoscale.discovery.state("api").standby.active end
            ngx.say("no token: ", post("upstream=api&activate=1"), ", active ", active())
            ngx.say("wrong token: ", post("upstream=api&activate=1", "not-the-token-0123456789"), ", active ", active())
            local tok, json = "discovery-test-token-0123456789", "application/json"
            ngx.say("from 127.0.0.2: ", post("upstream=api&activate=1", tok, "127.0.0.2", json), ", active ", active())
            ngx.say("from 127.0.0.2 as X-Forwarded-For 127.0.0.1: ",
                    post("upstream=api&activate=1", tok, "127.0.0.2", json, "127.0.0.1"), ", active ", active())
            ngx.say("form body: ", post("upstream=api&activate=1", tok, nil, "application/x-www-form-urlencoded"),
                    ", active ", active())
            ngx.say("no content type: ", post("upstream=api&activate=1", tok), ", active ", active())
            local r = post("upstream=api&activate=1", tok, nil, json)
            ngx.say("token: ", r:match("^%d+"), ", active ", active())
            ngx.say("GET needs none: ", (t.request { port = gw, path = "/discovery?upstream=api" }))
        }
    }
--- request
GET /t
--- response_body
no token: 401 {"error":"an Authorization: Bearer token is required"}, active 0
wrong token: 401 {"error":"invalid token"}, active 0
from 127.0.0.2: 403 {"error":"client address 127.0.0.2 is not in admin.allow"}, active 0
from 127.0.0.2 as X-Forwarded-For 127.0.0.1: 403 {"error":"client address 127.0.0.2 is not in admin.allow"}, active 0
form body: 415 {"error":"a change must be application\/json (got Content-Type application\/x-www-form-urlencoded)"}, active 0
no content type: 415 {"error":"a change must be application\/json (got Content-Type none)"}, active 0
token: 200, active 1
GET needs none: 200
--- error_log
refused POST /discovery?upstream=api&activate=1 from 127.0.0.1: 401



=== TEST 8: one discovery change set (peers added, removed, re-weighted) is one reconfiguration; staying peers keep their statistics
--- http_config eval: $::HttpConfig
--- config
    location = /t {
        content_by_lua_block {
            local t = require "autoscale_test"
            local control = autoscale.control
            local gw = $TEST_NGINX_RAND_PORT_5
            local p = { "127.0.0.1:$TEST_NGINX_RAND_PORT_1", "127.0.0.1:$TEST_NGINX_RAND_PORT_2",
                        "127.0.0.1:$TEST_NGINX_RAND_PORT_3", "127.0.0.1:$TEST_NGINX_RAND_PORT_4" }
            assert(control.change_peers("api", { { addr = p[2], weight = 1 } }) == 1)
            t.load { port = gw, path = "/", concurrency = 2, requests = 20 }
            local function requests(a) local x = t.peer(autoscale.status("api"), a) return x and x.totals.requests end
            local r1, r2 = requests(p[1]), requests(p[2])
            local epoch = autoscale.status_all().region.config_epoch
            -- p3 and p4 come, p2 goes, p1 gets weight 5: one set
            local n, err = control.change_peers("api", { { addr = p[3], weight = 2 }, { addr = p[4], weight = 1 },
                                                          { addr = p[2], weight = 0 }, { addr = p[1], weight = 5 } })
            local st = autoscale.status("api")
            ngx.say("changed ", n, " ", tostring(err), "; reconfigurations ", autoscale.status_all().region.config_epoch - epoch,
                    "; p1 kept its statistics ", r1 > 0 and requests(p[1]) == r1, ", weight ", t.peer(st, p[1]).weight,
                    "; p2 gone ", t.peer(st, p[2]) == nil, " (had ", r2 > 0, "); p3 weight ", t.peer(st, p[3]).weight,
                    ", p4 new ", requests(p[4]) == 0)
            -- all or nothing: an unknown peer to remove refuses the whole set
            local ok, why = control.change_peers("api", { { addr = "127.0.0.1:1", weight = 1 }, { addr = p[2], weight = 0 } })
            ngx.say("refused: ", ok, " ", why, "; 127.0.0.1:1 absent ", t.peer(autoscale.status("api"), "127.0.0.1:1") == nil)
            ngx.say("bad entry: ", select(2, control.change_peers("api", { { addr = p[1], weight = -1 } })))
        }
    }
--- request
GET /t
--- timeout: 20
--- response_body_like
^changed 4 nil; reconfigurations 1; p1 kept its statistics true, weight 5; p2 gone true \(had true\); p3 weight 2, p4 new true
refused: nil peer 127\.0\.0\.1:\d+ is not in this upstream; 127\.0\.0\.1:1 absent true
bad entry: changes\[1\]: weight must be an integer between 0 and 10000 \(got -1\)
--- no_error_log
[error]
