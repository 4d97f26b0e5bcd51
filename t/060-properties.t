# vim:set ft= ts=4 sw=4 et:
# Property tests of the parsers that read network answers, through the real functions, with random and mutated
# inputs (t/lib/mutate.lua: an answer mutated in shape, its text mutated byte-wise, random bytes): etcd range
# responses served over HTTP by this nginx, DNS answers as the resolver library hands them over (any table, wider than
# what lua-resty-dns can produce; its wire parsing meets a hostile server in t/050-discovery-dns.t), Prometheus query
# answers, Kubernetes scale and webhook answers served over HTTP, and admin API bodies sent over HTTP. For each: no Lua
# error escapes, the result keeps its contract (peers valid and canonical, numbers finite, errors as text), and a
# rejected input changes nothing. Each block prints its seed; failures name the iteration.

use lib 't';
use Autoscale;
use File::Temp ();

workers(1);
master_on();

$ENV{AUTOSCALE_T_ADMIN_TOKEN} = 'properties-test-token-0123456789';

# A CA and a server certificate for the HTTPS answers (the Kubernetes actuator talks https only), made before nginx
# starts.
our $Dir = File::Temp::tempdir("autoscale-props-XXXXXX", TMPDIR => 1, CLEANUP => 1);
chmod 0755, $Dir;
{
    open my $ext, '>', "$Dir/san.ext" or die; print $ext "subjectAltName=DNS:kubernetes.default.svc\n"; close $ext;
    for my $cmd (
        "openssl req -x509 -newkey rsa:2048 -nodes -keyout $Dir/ca.key -out $Dir/ca.crt -days 1 -subj /CN=test-ca",
        "openssl req -newkey rsa:2048 -nodes -keyout $Dir/srv.key -out $Dir/srv.csr -subj /CN=kubernetes",
        "openssl x509 -req -in $Dir/srv.csr -CA $Dir/ca.crt -CAkey $Dir/ca.key -CAcreateserial -out $Dir/srv.crt -days 1 -extfile $Dir/san.ext",
    ) {
        system("$cmd >/dev/null 2>&1") == 0 or die "failed: $cmd\n";
    }
    open my $tok, '>', "$Dir/token" or die; print $tok "test-token\n"; close $tok;
    chmod 0644, map { "$Dir/$_" } qw(ca.crt srv.crt srv.key token);
}
$ENV{TEST_NGINX_PROPS_DIR} = $Dir;

our $HttpConfig = <<'_EOC_';
    lua_shared_dict fuzz 4m;
    lua_package_path "$TEST_NGINX_REPO/t/lib/?.lua;;";
    lua_ssl_trusted_certificate $TEST_NGINX_PROPS_DIR/ca.crt;
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1;
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_4 ssl;
        ssl_certificate $TEST_NGINX_PROPS_DIR/srv.crt;
        ssl_certificate_key $TEST_NGINX_PROPS_DIR/srv.key;
        # Answers what the test stored: status and body (and counts the requests by method).
        location / {
            content_by_lua_block {
                local d = ngx.shared.fuzz
                d:incr("hits:" .. ngx.req.get_method(), 1, 0)
                ngx.status = d:get("status") or 200
                ngx.print(d:get("body") or "")
            }
        }
    }
    init_by_lua_block {
        autoscale = require "resty.autoscale"
        autoscale.configure { upstreams = { api = { balancer = "round_robin", slow_start = 0,
            peers = { "127.0.0.1:$TEST_NGINX_RAND_PORT_2", "127.0.0.1:$TEST_NGINX_RAND_PORT_3" } } } }
        autoscale.admin { token_env = "AUTOSCALE_T_ADMIN_TOKEN", max_body = 4096 }
    }
    init_worker_by_lua_block { autoscale.init_worker() }
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_6;
        location /autoscale/admin { content_by_lua_block { autoscale.admin_handler() } }
    }
_EOC_

run_tests();

__DATA__

=== TEST 1: etcd range responses, mutated and random: no error escapes, peers valid, the endpoint list kept
--- http_config eval: $::HttpConfig
--- config
    location = /t {
        content_by_lua_block {
            local m = require "mutate"
            local etcd = require "resty.autoscale.discovery.etcd"
            local addr = require "resty.autoscale.discovery.addr"
            local d = ngx.shared.fuzz
            local b64 = ngx.encode_base64
            local c = assert(etcd.validate("d", { endpoints = { "http://127.0.0.1:$TEST_NGINX_RAND_PORT_1" },
                                                  prefix = "/svc/", timeout = 2 }))
            local valid = { header = { revision = "7", cluster_id = "1" }, count = "3", kvs = {
                { key = b64("/svc/a"), value = b64("127.0.0.1:80"), mod_revision = "5" },
                { key = b64("/svc/b"), value = b64('{"addr":"[::1]:81","weight":3}') },
                { key = b64("/svc/c"), value = b64(" 10.0.0.1:8080 ") } } }
            local seed = 1700
            m.seed(seed)
            local counts = { peers = 0, unchanged = 0, refused = 0 }
            for i = 1, 300 do
                local body = m.answer(valid)
                d:set("status", i % 25 == 0 and 503 or 200)
                d:set("body", body)
                local ok, peers, interval, bad, rev = pcall(etcd.fetch, c, i % 7 == 0 and "7" or nil)
                local function fail(why) error(("seed %d iteration %d: %s; body %q"):format(seed, i, why, body:sub(1, 300))) end
                if not ok then fail("raised " .. tostring(peers)) end
                if #c.endpoints ~= 1 then fail("endpoint list changed") end
                if peers == nil then
                    if type(interval) ~= "string" then fail("no error text") end
                    counts.refused = counts.refused + 1
                elseif peers == false then
                    counts.unchanged = counts.unchanged + 1
                else
                    if type(bad) ~= "table" or type(rev) ~= "string" or interval ~= c.interval then fail("contract") end
                    for _, p in ipairs(peers) do
                        if addr.canonical(p.addr) ~= p.addr then fail("peer not canonical: " .. tostring(p.addr)) end
                        if type(p.weight) ~= "number" or p.weight % 1 ~= 0 or p.weight < 1 or p.weight > 10000 then
                            fail("weight " .. tostring(p.weight))
                        end
                    end
                    for k, why in pairs(bad) do
                        if type(k) ~= "string" or type(why) ~= "string" then fail("bad entry") end
                    end
                    counts.peers = counts.peers + 1
                end
            end
            -- The stored value parser alone, on any text.
            for i = 1, 3000 do
                local v = i % 3 == 0 and m.bytes(40) or m.text(i % 2 == 0 and '{"addr":"127.0.0.1:80","weight":2}' or "127.0.0.1:80")
                local ok, p, err = pcall(etcd.peer, v)
                if not ok or (p == nil and type(err) ~= "string") or (p and addr.canonical(p.addr) ~= p.addr) then
                    error(("seed %d value %q: %s %s"):format(seed, v, tostring(p), tostring(err)))
                end
            end
            ngx.say("seed ", seed, ": every answer handled; peers ", counts.peers > 0, ", unchanged ", counts.unchanged > 0,
                    ", refused ", counts.refused > 0)
        }
    }
--- request
GET /t
--- timeout: 30
--- response_body_like
^seed 1700: every answer handled; peers true, unchanged true, refused true
--- no_error_log
[error]



=== TEST 2: DNS answers of any shape (A, AAAA, SRV with additional records): no error escapes, peers valid, TTL bounded
--- http_config eval: $::HttpConfig
--- config
    location = /t {
        content_by_lua_block {
            local m = require "mutate"
            local addr = require "resty.autoscale.discovery.addr"
            -- The resolver library's answers, as tables: the valid ones mutated in shape, or random tables.
            local answers
            local fake = { TYPE_A = 1, TYPE_AAAA = 28, TYPE_SRV = 33 }
            function fake.new() return setmetatable({}, { __index = fake }) end
            function fake.query(_, name, opts)
                local a = answers[name] or answers["*"]
                if type(a) == "function" then return a(name, opts) end
                return a
            end
            package.loaded["nginx.dns.resolver"] = fake
            package.loaded["resty.autoscale.discovery.dns"] = nil
            local dns = require "resty.autoscale.discovery.dns"
            local cs = {
                assert(dns.validate("d", { name = "web.test", port = 8080, nameservers = { "127.0.0.1:53" }, min_ttl = 1, max_ttl = 60 })),
                assert(dns.validate("d", { name = "web.test", type = "AAAA", port = 8080, nameservers = { "127.0.0.1:53" } })),
                assert(dns.validate("d", { name = "_api._tcp.test", type = "SRV", nameservers = { "127.0.0.1:53" }, min_ttl = 2, max_ttl = 30 })),
            }
            local valid = {
                { { name = "web.test", type = 1, address = "10.0.0.1", ttl = 30, section = 1 },
                  { name = "web.test", type = 1, address = "10.0.0.2", ttl = 5, section = 1 } },
                { { name = "web.test", type = 28, address = "2001:db8::1", ttl = 30, section = 1 } },
                { { name = "_api._tcp.test", type = 33, target = "a.test", port = 80, priority = 1, weight = 5, ttl = 9, section = 1 },
                  { name = "_api._tcp.test", type = 33, target = "b.test.", port = 81, priority = 2, weight = 0, ttl = 9, section = 1 },
                  { name = "a.test", type = 1, address = "10.0.0.3", ttl = 3, section = 3 } },
            }
            local seed = 2600
            m.seed(seed)
            local got = 0
            for i = 1, 3000 do
                local k = i % 3 + 1
                local c = cs[k]
                local r = math.random(1, 10)
                local answer = r <= 7 and m.shape(valid[k]) or r <= 9 and { m.value(2), m.value(2), m.shape(valid[k][1]) }
                               or { errcode = math.random(1, 5), errstr = m.bytes(20) }
                answers = { ["*"] = answer, ["a.test"] = math.random() < 0.5 and m.shape(valid[1]) or nil }
                local ok, peers, ttl = pcall(dns.fetch, c)
                local function fail(why) error(("seed %d iteration %d: %s"):format(seed, i, why)) end
                if not ok then fail("raised " .. tostring(peers)) end
                if peers == nil then
                    if type(ttl) ~= "string" then fail("no error text") end
                else
                    if type(ttl) ~= "number" or ttl ~= ttl or ttl < c.min_ttl or ttl > c.max_ttl then fail("ttl " .. tostring(ttl)) end
                    for _, p in ipairs(peers) do
                        if addr.canonical(p.addr) ~= p.addr then fail("peer not canonical: " .. tostring(p.addr)) end
                        if type(p.weight) ~= "number" or p.weight ~= p.weight or p.weight % 1 ~= 0 or p.weight < 1 or p.weight > 10000 then
                            fail("weight " .. tostring(p.weight))
                        end
                    end
                    got = got + (#peers > 0 and 1 or 0)
                end
            end
            package.loaded["nginx.dns.resolver"] = nil
            package.loaded["resty.autoscale.discovery.dns"] = nil
            ngx.say("seed ", seed, ": every answer handled; some gave peers ", got > 0)
        }
    }
--- request
GET /t
--- timeout: 30
--- response_body
seed 2600: every answer handled; some gave peers true
--- no_error_log
[error]



=== TEST 3: Prometheus query answers: a finite number or nothing, never an error
--- http_config eval: $::HttpConfig
--- config
    location = /t {
        content_by_lua_block {
            local m = require "mutate"
            local scaler = require "resty.autoscale.scaler"
            local valid = { status = "success", data = { resultType = "vector",
                            result = { { metric = { job = "api" }, value = { 1700000000.5, "42.5" } } } } }
            assert(scaler.external_value(require("cjson").encode(valid)) == 42.5)
            local seed = 3100
            m.seed(seed)
            local numbers = 0
            for i = 1, 5000 do
                local body = i % 10 == 0 and m.value(3) or m.answer(valid)
                local ok, v = pcall(scaler.external_value, body)
                if not ok or (v ~= nil and (type(v) ~= "number" or v ~= v or v == math.huge or v == -math.huge)) then
                    error(("seed %d iteration %d: %s %s; body %q"):format(seed, i, tostring(ok), tostring(v), tostring(body):sub(1, 300)))
                end
                numbers = numbers + (v and 1 or 0)
            end
            ngx.say("seed ", seed, ": every answer handled; some gave a value ", numbers > 0)
        }
    }
--- request
GET /t
--- timeout: 30
--- response_body
seed 3100: every answer handled; some gave a value true
--- no_error_log
[error]



=== TEST 4: Kubernetes scale and webhook answers (any status, any body): a result or an error text; a refused GET sends no PATCH
--- http_config eval: $::HttpConfig
--- config
    location = /t {
        content_by_lua_block {
            local m = require "mutate"
            local actuator = require "resty.autoscale.actuator"
            actuator.init(require("resty.autoscale.lib").load())
            local d = ngx.shared.fuzz
            local base = "http://127.0.0.1:$TEST_NGINX_RAND_PORT_1"
            local k8s = assert(actuator.validate("a", { type = "kubernetes", api = "https://127.0.0.1:$TEST_NGINX_RAND_PORT_4",
                                                        namespace = "ns", kind = "deployment", name = "api",
                                                        token_file = "$TEST_NGINX_PROPS_DIR/token",
                                                        ca_file = "$TEST_NGINX_PROPS_DIR/ca.crt",
                                                        server_name = "kubernetes.default.svc", retries = 0, timeout = 2 }))
            local hook = assert(actuator.validate("a", { type = "webhook", url = base .. "/hook", secret = "s3cret-s3cret-s3cret",
                                                         retries = 0, timeout = 2 }))
            local decision = { service = "api", current = 2, desired = 3, reason = "load", decision_id = "d1",
                               idempotency_key = "k1", gateway = "g", fencing_token = 1, ts = 1 }
            local valid = { kind = "Scale", apiVersion = "autoscaling/v1", metadata = { name = "api", namespace = "ns" },
                            spec = { replicas = 2 }, status = { replicas = 2, selector = "app=api" } }
            local STATUSES = { 200, 200, 200, 201, 204, 301, 400, 401, 403, 404, 409, 422, 429, 500, 503, 599, 100 }
            local seed = 4200
            m.seed(seed)
            local results = {}
            for i = 1, 300 do
                local a = i % 2 == 0 and k8s or hook
                local status = STATUSES[math.random(1, #STATUSES)]
                local body = math.random() < 0.8 and m.answer(valid) or m.bytes(300)
                d:set("status", status)
                d:set("body", body)
                d:set("hits:GET", 0)
                d:set("hits:PATCH", 0)
                local ok, done, err = pcall(actuator.call, a, decision)
                local function fail(why) error(("seed %d iteration %d (%s, %d): %s; body %q"):format(seed, i, a.type, status, why, body:sub(1, 200))) end
                if not ok then fail("raised " .. tostring(done)) end
                if not (done == true or (done == nil and type(err) == "string")) then fail("contract: " .. tostring(done) .. " " .. tostring(err)) end
                if a == k8s and status ~= 200 and d:get("hits:PATCH") ~= 0 then fail("a refused GET was followed by a PATCH") end
                if a == hook and (done == true) ~= (status >= 200 and status < 300) then fail("webhook result " .. tostring(done)) end
                results[a.type .. (done and " ok" or " refused")] = true
            end
            -- A scale that is already there: no PATCH.
            d:set("status", 200) d:set("body", '{"spec":{"replicas":3}}') d:set("hits:PATCH", 0)
            local done = actuator.call(k8s, decision)
            ngx.say("seed ", seed, ": every answer handled; ", results["kubernetes ok"] and results["kubernetes refused"]
                    and results["webhook ok"] and results["webhook refused"] and "both kinds seen ok and refused" or "missing cases",
                    "; already scaled: ", done, ", patches ", d:get("hits:PATCH"))
        }
    }
--- request
GET /t
--- timeout: 60
--- response_body
seed 4200: every answer handled; both kinds seen ok and refused; already scaled: true, patches 0
--- no_error_log
[error]



=== TEST 5: admin API bodies, mutated and random: never a 5xx, always a JSON answer, a refused body changes nothing
--- http_config eval: $::HttpConfig
--- config
    location = /t {
        content_by_lua_block {
            local m = require "mutate"
            local t = require "autoscale_test"
            local cjson = require "cjson.safe"
            local TOKEN = "properties-test-token-0123456789"
            local P2 = "127.0.0.1:$TEST_NGINX_RAND_PORT_2"
            local function state()
                local st = autoscale.status("api")
                local peers = {}
                for _, p in ipairs(st.peers) do peers[#peers + 1] = p.addr .. "/" .. p.weight .. "/" .. p.state end
                table.sort(peers)
                return autoscale.status_all().region.config_epoch .. " " .. table.concat(peers, ",") .. " "
                       .. cjson.encode(require("resty.autoscale.status").tunables("api") or {})
            end
            local CASES = {
                { "POST", "/upstreams/api/peers", { addr = "127.0.0.1:9", weight = 2 } },
                { "PUT", "/upstreams/api/peers/" .. P2 .. "/weight", { weight = 3 } },
                { "POST", "/upstreams/api/peers/" .. P2 .. "/drain", {} },
                { "POST", "/upstreams/api/peers/" .. P2 .. "/enable", {} },
                { "PATCH", "/upstreams/api", { balancer = "random", retries = 1, outlier = { consecutive_5xx = 4 } } },
                { "DELETE", "/upstreams/api/peers/127.0.0.1:9", nil },
            }
            local seed = 5300
            m.seed(seed)
            local codes = {}
            for i = 1, 200 do
                local case = CASES[math.random(1, #CASES)]
                local body = case[3] and (math.random() < 0.9 and m.answer(case[3]) or m.bytes(100)) or nil
                local before = state()
                local status, text = t.request { port = $TEST_NGINX_RAND_PORT_6, method = case[1], path = "/autoscale/admin" .. case[2],
                                                 body = body, headers = { Authorization = "Bearer " .. TOKEN, ["Content-Type"] = "application/json" } }
                local function fail(why) error(("seed %d iteration %d (%s %s): %s; body %q; answer %s %s"):format(
                    seed, i, case[1], case[2], why, tostring(body):sub(1, 200), tostring(status), tostring(text))) end
                if type(status) ~= "number" or status >= 500 then fail("status") end
                if type(cjson.decode(text or "")) ~= "table" then fail("answer is not JSON") end
                if status >= 400 and state() ~= before then fail("a refused body changed the configuration") end
                codes[status >= 400 and "refused" or "accepted"] = true
            end
            ngx.say("seed ", seed, ": every body answered; accepted ", codes.accepted, ", refused ", codes.refused)
        }
    }
--- request
GET /t
--- timeout: 60
--- response_body
seed 5300: every body answered; accepted true, refused true
--- no_error_log
[error]
