# vim:set ft= ts=4 sw=4 et:
# Consul discovery against a strict fake of Consul's health API (tools/fake_consul.py: blocking queries,
# X-Consul-Index, ACL token, 403) that the test starts and stops by PID: a service going from 2 to 5 instances and
# back, and one instance flapping to critical, reach the balancer within 1 s (blocking queries) with weights applied
# and the statistics of the peers that stay kept; an empty answer does not empty the upstream inside empty_grace;
# malformed, index-less and zero-index answers are failures that change nothing; the registry down under load keeps
# the last set (0 client errors, one log line each way); a restarted registry whose index went backwards is followed
# (index reset); a refused token is reported (403) and never written anywhere.
# The outage lasts TEST_AUTOSCALE_OUTAGE seconds (default 3; `make test-discovery-long` runs it with 30).

use lib 't';
use Autoscale;

workers(2);
worker_connections(1024);
master_on();

our $Have_python = grep { -x "$_/python3" } split /:/, $ENV{PATH};
diag("python3 not found: skipped") unless $Have_python;
$ENV{TEST_NGINX_OUTAGE} = $ENV{TEST_AUTOSCALE_OUTAGE} || 3;

our $HttpConfig = <<'_EOC_';
    lua_socket_log_errors off; # a refused connection to Consul is reported by discovery, once
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1;
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_2;
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_3;
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_4;
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_5;
        location / { content_by_lua_block { ngx.sleep(0.005) ngx.say(ngx.var.server_port) } }
    }
    init_by_lua_block {
        autoscale = require "resty.autoscale"
        local consul = { address = "http://127.0.0.1:$TEST_NGINX_RAND_PORT_7", service = "api", wait = 2, timeout = 0.5,
                         retry = 0.2, token = "c0ffee-good-token" }
        local bad = { address = consul.address, service = "api", wait = 2, timeout = 0.5, retry = 0.2,
                      token = "deadbeef-wrong-token" }
        autoscale.configure { upstreams = {
            api = { peers = { "127.0.0.1:$TEST_NGINX_RAND_PORT_1" },
                    discovery = { drain_timeout = 5, empty_grace = 2, consul = consul } },
            refused = { peers = { "127.0.0.1:$TEST_NGINX_RAND_PORT_1" }, discovery = { consul = bad } },
        } }
    }
    init_worker_by_lua_block { autoscale.init_worker() }
    upstream api {
        server 0.0.0.1;
        balancer_by_lua_block { autoscale.balance("api") }
        keepalive 16;
    }
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_6 reuseport;
        location / {
            proxy_pass http://api;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            log_by_lua_block { autoscale.log() }
        }
        location = /discovery { content_by_lua_block { autoscale.discovery_handler() } }
    }
_EOC_

run_tests();

__DATA__

=== TEST 1: Consul's instances and health reach the balancer within 1 s; the registry away or empty changes nothing
--- skip_eval: 3: !$::Have_python
--- http_config eval: $::HttpConfig
--- config
    location = /t {
        content_by_lua_block {
            local t = require "autoscale_test"
            local process = require "autoscale_process"
            local cjson = require "cjson"
            local gw, cport = $TEST_NGINX_RAND_PORT_6, $TEST_NGINX_RAND_PORT_7
            local ports = { "$TEST_NGINX_RAND_PORT_1", "$TEST_NGINX_RAND_PORT_2", "$TEST_NGINX_RAND_PORT_3",
                            "$TEST_NGINX_RAND_PORT_4", "$TEST_NGINX_RAND_PORT_5" }
            local names = {}
            for i, p in ipairs(ports) do names[p] = "p" .. i end
            local dir = ngx.config.prefix() .. "logs/"
            local state = dir .. "consul-state.json"
            os.remove(state)
            local outage = tonumber("$TEST_NGINX_OUTAGE")

            local function start(extra)
                local proc = process.start("python3 $TEST_NGINX_REPO/tools/fake_consul.py --port " .. cport
                    .. " --token c0ffee-good-token --state " .. state .. " " .. (extra or ""), dir .. "consul.log", 90)
                assert(t.poll(function() return process.listening(cport) end, 5), "fake Consul did not start")
                return proc
            end
            local function put(list) -- the service's instances: { {port index, status, weights}, ... }
                local out = {}
                for _, i in ipairs(list) do
                    out[#out + 1] = { id = "api-" .. i[1], node = "node-" .. i[1], service_address = "127.0.0.1",
                                      port = tonumber(ports[i[1]]), status = i[2] or "passing", weights = i[3] }
                end
                local code = t.request { port = cport, method = "PUT", path = "/__test/service/api",
                                         body = cjson.encode(out) }
                assert(code == 200, "fake Consul refused the change")
            end
            local function fault(mode, count)
                assert(t.request { port = cport, method = "POST", path = "/__test/fault",
                                   body = cjson.encode { mode = mode, count = count or 1 } } == 200)
            end
            local function peers() -- the upstream's peers not draining, as "p1,p2"
                local out = {}
                for _, p in ipairs(autoscale.status("api").peers) do
                    if p.state ~= "draining" then
                        out[#out + 1] = names[p.addr:match(":(%d+)$")]
                    end
                end
                table.sort(out)
                return table.concat(out, ",")
            end
            local function within(want, s) -- seconds until peers() == want (nil after s)
                ngx.update_time()
                local t0 = ngx.now()
                if not t.poll(function() return peers() == want end, s or 3) then
                    return nil
                end
                ngx.update_time()
                return ngx.now() - t0
            end
            local function count(pattern) return process.count(dir .. "error.log", pattern) end
            local function requests(port)
                local p = t.peer(autoscale.status("api"), "127.0.0.1:" .. ports[port])
                return p and p.totals.requests or -1
            end

            local server
            local ok, err = pcall(function()
                server = start()
                put { { 1 }, { 2 } }
                assert(within("p1,p2", 5), "the first answer did not arrive: " .. peers())
                ngx.say("2 instances: ", peers())
                t.load { port = gw, concurrency = 4, requests = 40 }

                -- 2 -> 5 instances, one with weight 3; p1 and p2 stay with their statistics
                local p1_before = requests(1)
                put { { 1 }, { 2 }, { 3 }, { 4 }, { 5, "passing", { Passing = 3, Warning = 1 } } }
                local took = within("p1,p2,p3,p4,p5")
                ngx.say("5 instances within 1 s: ", took ~= nil and took < 1, "; p5 weight ",
                        t.peer(autoscale.status("api"), "127.0.0.1:" .. ports[5]).weight)
                ngx.log(ngx.NOTICE, "Consul change to the upstream: ", took, " s")
                local served = process.until_served(gw, "/", ports[4] .. "\n")
                ngx.say("p4 serves: ", served ~= nil, "; p1 kept its statistics: ", requests(1) >= p1_before,
                        ", ", p1_before > 0)

                -- back to 2
                local p2_before = requests(2)
                put { { 1 }, { 2 } }
                took = within("p1,p2")
                ngx.say("back to 2 within 1 s: ", took ~= nil and took < 1, "; p2 kept its statistics: ",
                        requests(2) >= p2_before)

                -- health flapping: p2 critical is removed, passing again it comes back; a warning takes its Warning weight
                put { { 1 }, { 2, "critical" } }
                took = within("p1")
                ngx.say("p2 critical: drained within 1 s: ", took ~= nil and took < 1)
                put { { 1, "warning", { Passing = 4, Warning = 2 } }, { 2 } }
                took = within("p1,p2")
                local w
                t.poll(function() w = t.peer(autoscale.status("api"), "127.0.0.1:" .. ports[1]).weight return w == 2 end, 2)
                ngx.say("p2 passing again within 1 s: ", took ~= nil and took < 1, "; p1 in warning has weight ", w)
                put { { 1 }, { 2 } }
                t.poll(function() return t.peer(autoscale.status("api"), "127.0.0.1:" .. ports[1]).weight == 1 end, 2)

                -- answers no client should believe: the set stays, each is a failure that ends with the next answer
                local failed = count("of api: consul failed")
                for _, mode in ipairs { "malformed", "no_index" } do
                    fault(mode)
                    put { { 1 }, { 2 }, { 3 } }
                    assert(t.poll(function() return count("of api: consul failed") > failed end, 3), mode .. ": no failure")
                    failed = count("of api: consul failed")
                    assert(within("p1,p2,p3"), mode .. ": the next good answer was not applied")
                    put { { 1 }, { 2 } }
                    assert(within("p1,p2"), mode)
                end
                ngx.say("malformed and index-less answers: failures logged, then followed")
                fault("zero_index") -- taken as 1: the next request must not block on index 0 nor loop
                put { { 1 }, { 2 }, { 3 } }
                assert(within("p1,p2,p3"))
                put { { 1 }, { 2 } }
                ngx.say("zero index: followed ", within("p1,p2") ~= nil)

                -- an empty answer is not believed inside empty_grace (2 s), then is (p1 stays: it is static)
                put {}
                ngx.sleep(1)
                ngx.say("empty answer, 1 s later: ", peers())
                took = within("p1", 4)
                ngx.say("empty answer stood for empty_grace: ", peers(), " after ", took and took > 0.5 and "> 1.5 s" or took)
                put { { 1 }, { 2 } }
                assert(within("p1,p2"))

                -- the registry away under load, back with a lower index (a restored snapshot)
                local down, back = count("of api: consul failed"), count("of api: consul answers again")
                local load
                local th = ngx.thread.spawn(function()
                    load = t.load { port = gw, concurrency = 4, duration = outage + 1 }
                end)
                ngx.sleep(0.3)
                assert(server:stop(), "fake Consul did not stop")
                ngx.sleep(outage)
                local st = process.asker(gw, "api", "consul")
                ngx.say("registry away: peers ", peers(), ", source ok ", st.ok, ", episodes ", st.episodes - 0 >= 1)
                ngx.thread.wait(th)
                ngx.say("load during the outage: ", load.errors, " errors, ", load.total > 50, " requests")
                -- the worker that watches dies while the registry is away: the one taking over keeps the set
                local lib = assert(require("resty.autoscale.lib").load())
                local owner
                for _ = 1, 50 do -- not the worker running this test: if it holds the lease, it gives it up
                    owner = select(2, process.asker(gw, "api", "consul"))
                    if owner ~= ngx.worker.pid() then break end
                    lib.autoscale_check_lease(lib.autoscale_upstream_find("api", 3), 0)
                    ngx.sleep(0.05)
                end
                assert(owner ~= ngx.worker.pid(), "the lease stays with the test's own worker")
                os.execute("kill -KILL " .. owner)
                local src
                assert(t.poll(function()
                    local s, w = process.asker(gw, "api", "consul")
                    src = s
                    return w ~= owner and s.failures >= 1
                end, 8), "no worker took the lease over")
                ngx.say("lease taken over while the registry is away: peers ", peers(), ", source ok ", src.ok)
                server = start("--index-from 5")
                put { { 1 }, { 2 }, { 3 } }
                took = within("p1,p2,p3", 6)
                ngx.say("index went back: the next change followed: ", took ~= nil, ", reset logged ",
                        count("X%-Consul%-Index went back") >= 1)
                -- once per worker that watched: the one killed, and the one that took over
                ngx.say("log lines: failed ", count("of api: consul failed") - down, ", answers again ",
                        count("of api: consul answers again") - back)

                -- the refused token: reported, never written
                local r
                t.poll(function() -- after the outage, its next attempt comes after its backoff
                    r = process.asker(gw, "refused", "consul")
                    return (r.error or ""):find("HTTP 403", 1, true) ~= nil
                end, 5)
                ngx.say("refused token: ", (r.error or ""):match("HTTP 403") or r.error, "; in the log ",
                        count("deadbeef") + count("c0ffee"), " times; in the status ",
                        select(2, t.get(gw, "/discovery")):find("deadbeef", 1, true) ~= nil)
                local blocking, header = 0, true
                t.poll(function() -- the requests since the restart: the watch blocks again after its first read
                    blocking, header = 0, true
                    for _, q in ipairs(cjson.decode((select(2, t.get(cport, "/__test/requests"))))) do
                        if q.query.index and q.query.index ~= "0" and q.query.wait == "2s" then blocking = blocking + 1 end
                        header = header and q.token_header
                    end
                    return blocking >= 1
                end, 3)
                ngx.say("blocking queries used: ", blocking >= 1, "; token sent in X-Consul-Token: ", header)
            end)
            if server then server:stop() end
            if not ok then
                ngx.say("FAILED: ", err)
            end
        }
    }
--- log_level: notice
--- request
GET /t
--- timeout: 60
--- response_body
2 instances: p1,p2
5 instances within 1 s: true; p5 weight 3
p4 serves: true; p1 kept its statistics: true, true
back to 2 within 1 s: true; p2 kept its statistics: true
p2 critical: drained within 1 s: true
p2 passing again within 1 s: true; p1 in warning has weight 2
malformed and index-less answers: failures logged, then followed
zero index: followed true
empty answer, 1 s later: p1,p2
empty answer stood for empty_grace: p1 after > 1.5 s
registry away: peers p1,p2, source ok false, episodes true
load during the outage: 0 errors, true requests
lease taken over while the registry is away: peers p1,p2, source ok false
index went back: the next change followed: true, reset logged true
log lines: failed 2, answers again 1
refused token: HTTP 403; in the log 0 times; in the status false
blocking queries used: true; token sent in X-Consul-Token: true
--- no_error_log eval
# Stopping the registry can reset a connection that carries a request it has not read yet; nginx's core logs that.
qr/\[error\](?!.*\(104: Connection reset by peer\))/



=== TEST 2: bad Consul options and empty_grace are refused with the field path and the reason
--- config
    location = /t {
        content_by_lua_block {
            local config = require "resty.autoscale.config"
            local function check(d)
                local c, err = config.validate { upstreams = { api = { peers = { "127.0.0.1:1" }, discovery = d } } }
                local d = c and c.upstreams.api.discovery
                ngx.say(c and ("ok wait " .. d.consul.wait .. " passing " .. tostring(d.consul.passing) .. " grace "
                               .. d.empty_grace) or err)
            end
            local a = "http://127.0.0.1:8500"
            check { consul = "x" }
            check { consul = { address = a } }
            check { consul = { address = "127.0.0.1:8500", service = "api" } }
            check { consul = { address = "http://127.0.0.1:8500/v1", service = "api" } }
            check { consul = { address = a, service = "a b" } }
            check { consul = { address = a, service = "api", tag = "" } }
            check { consul = { address = a, service = "api", dc = "dc/1" } }
            check { consul = { address = a, service = "api", passing = "yes" } }
            check { consul = { address = a, service = "api", wait = 0.5 } }
            check { consul = { address = a, service = "api", wait = 601 } }
            check { consul = { address = a, service = "api", timeout = 0 } }
            check { consul = { address = a, service = "api", retry = -1 } }
            check { consul = { address = a, service = "api", token = "t", token_env = "CONSUL_HTTP_TOKEN" } }
            check { consul = { address = a, service = "api", token = "two words" } }
            check { consul = { address = a, service = "api", token_env = "AUTOSCALE_SURELY_UNSET_TOKEN" } }
            check { consul = { address = a, service = "api", typo = 1 } }
            check { consul = { address = a, service = "api" }, empty_grace = -1 }
            check { consul = { address = a, service = "api" } }
            check { consul = { address = a, service = "api", tag = "v2", dc = "dc2", passing = false, wait = 30,
                               token = "s3cr3t" }, empty_grace = 0 }
        }
    }
--- request
GET /t
--- response_body
upstreams.api.discovery.consul: must be a table (got string)
upstreams.api.discovery.consul.service: must be a service name without spaces, '/', '?', '#' or '&' (got nil)
upstreams.api.discovery.consul.address: must be Consul's "http://host:port" or "https://host:port" (must start with http:// or https://; got "127.0.0.1:8500")
upstreams.api.discovery.consul.address: must be Consul's "http://host:port" or "https://host:port" (has a path; got "http://127.0.0.1:8500/v1")
upstreams.api.discovery.consul.service: must be a service name without spaces, '/', '?', '#' or '&' (got "a b")
upstreams.api.discovery.consul.tag: must be a tag name without spaces, '/', '?', '#' or '&' (got "")
upstreams.api.discovery.consul.dc: must be a datacenter name without spaces, '/', '?', '#' or '&' (got "dc/1")
upstreams.api.discovery.consul.passing: must be true or false (got "yes")
upstreams.api.discovery.consul.wait: must be between 1 and 600 (got 0.5)
upstreams.api.discovery.consul.wait: must be between 1 and 600 (got 601)
upstreams.api.discovery.consul.timeout: must be between 0.1 and 60 (got 0)
upstreams.api.discovery.consul.retry: must be between 0.05 and 60 (got -1)
upstreams.api.discovery.consul: give token or token_env, not both
upstreams.api.discovery.consul.token: must be an ACL token (a non-empty string without spaces)
upstreams.api.discovery.consul.token_env: environment variable "AUTOSCALE_SURELY_UNSET_TOKEN" is not set (nginx passes it on with `env AUTOSCALE_SURELY_UNSET_TOKEN;` in nginx.conf)
upstreams.api.discovery.consul.typo: unknown option (valid: address, dc, passing, retry, service, tag, timeout, token, token_env, wait)
upstreams.api.discovery.empty_grace: must be between 0 and 86400 (got -1)
ok wait 10 passing true grace 30
ok wait 30 passing false grace 0



=== TEST 3: a bad Consul option stops nginx at start, naming the field
--- http_config
    init_by_lua_block {
        require("resty.autoscale").configure { upstreams = { api = { peers = { "127.0.0.1:1" },
            discovery = { consul = { address = "http://127.0.0.1:8500", service = "api", wait = 0 } } } } }
    }
--- config
    location = /t { return 200; }
--- must_die
--- error_log
upstreams.api.discovery.consul.wait: must be between 1 and 600 (got 0)



=== TEST 4: the cost of decoding a Consul answer of 100 and 1,000 instances (logged at notice level, not asserted)
--- config
    location = /t {
        content_by_lua_block {
            local cjson = require "cjson"
            local consul = require "resty.autoscale.discovery.consul"
            for _, n in ipairs { 100, 1000 } do
                local list = {}
                for i = 1, n do
                    list[i] = { Node = { Node = "n" .. i, Address = "10.0." .. (i % 250) .. "." .. (i % 200 + 1) },
                        Service = { ID = "api-" .. i, Service = "api", Tags = {}, Address = "", Port = 8000 + i,
                                    Weights = { Passing = 1, Warning = 1 } },
                        Checks = { { Status = "passing" }, { Status = "passing" } } }
                end
                local body = cjson.encode(list)
                local peers = 0
                ngx.update_time()
                local t0 = ngx.now()
                for _ = 1, 20 do
                    for _, e in ipairs(cjson.decode(body)) do
                        peers = peers + (consul.instance(e, true) and 1 or 0)
                    end
                end
                ngx.update_time()
                ngx.log(ngx.NOTICE, "decode cost of a Consul answer of ", n, " instances (", #body, " bytes): ",
                        string.format("%.2f", (ngx.now() - t0) / 20 * 1000), " ms")
                ngx.say(n, " instances: ", peers / 20, " peers")
            end
        }
    }
--- log_level: notice
--- request
GET /t
--- response_body
100 instances: 100 peers
1000 instances: 1000 peers
--- error_log
decode cost of a Consul answer of 1000 instances
