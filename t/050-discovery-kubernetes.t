# vim:set ft= ts=4 sw=4 et:
# Kubernetes discovery against the strict fake API server (tools/fake_k8s_api.py: EndpointSlice list and watch over
# TLS with a CA made here by openssl, bearer token, resourceVersion, 410, BOOKMARK, chunked watch stream) that the
# test starts and stops by PID: slices reach the balancer within 1 s; an endpoint marked terminating gets no new
# requests within 1 s while its in-flight requests finish (0 client errors); zone and nodeName are kept; a watch cut
# in the middle of an event and a 410 (compaction) cause one relist, not a loop; a line that is not JSON and a slow
# answer are failures that keep the set; bookmarks move the resourceVersion; a refused token is reported and the
# rotated token file is read again.

use lib 't';
use Autoscale;
use File::Temp ();

workers(2);
worker_connections(1024);
master_on();

our %Have = map { my $tool = $_; ($tool => scalar grep { -x "$_/$tool" } split /:/, $ENV{PATH}) } qw(openssl python3);
diag("openssl or python3 not found: skipped") unless $Have{openssl} && $Have{python3};

# A CA, a server certificate for kubernetes.default.svc signed by it, and a token file, made before nginx starts.
our $Dir = File::Temp::tempdir("autoscale-k8s-disc-XXXXXX", TMPDIR => 1, CLEANUP => 1);
chmod 0755, $Dir;
if ($Have{openssl}) {
    open my $ext, '>', "$Dir/san.ext" or die; print $ext "subjectAltName=DNS:kubernetes.default.svc\n"; close $ext;
    for my $cmd (
        "openssl req -x509 -newkey rsa:2048 -nodes -keyout $Dir/ca.key -out $Dir/ca.crt -days 1 -subj /CN=test-ca",
        "openssl req -newkey rsa:2048 -nodes -keyout $Dir/srv.key -out $Dir/srv.csr -subj /CN=kubernetes",
        "openssl x509 -req -in $Dir/srv.csr -CA $Dir/ca.crt -CAkey $Dir/ca.key -CAcreateserial -out $Dir/srv.crt -days 1 -extfile $Dir/san.ext",
    ) {
        system("$cmd >/dev/null 2>&1") == 0 or die "failed: $cmd\n";
    }
    open my $tok, '>', "$Dir/token" or die; print $tok "sa-token-" . int(rand(1e9)) . "\n"; close $tok;
    chmod 0644, map { "$Dir/$_" } qw(ca.crt srv.crt srv.key token);
}
$ENV{TEST_NGINX_K8S_DIR} = $Dir;

our $HttpConfig = <<'_EOC_';
    lua_socket_log_errors off; # a refused connection to the API server is reported by discovery, once
    lua_ssl_trusted_certificate $TEST_NGINX_K8S_DIR/ca.crt;
    lua_ssl_verify_depth 2;
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1;
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_2;
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_3;
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_4;
        location / { content_by_lua_block { ngx.sleep(tonumber(ngx.var.arg_sleep) or 0.005) ngx.say(ngx.var.server_port) } }
    }
    init_by_lua_block {
        autoscale = require "resty.autoscale"
        autoscale.configure { upstreams = {
            api = { peers = { "127.0.0.1:$TEST_NGINX_RAND_PORT_4" }, -- a seed, replaced by the slices (keep_static = false)
                    discovery = { keep_static = false, drain_timeout = 10,
                                  kubernetes = { api = "https://127.0.0.1:$TEST_NGINX_RAND_PORT_7", service = "api",
                                                 namespace = "shop", port_name = "http",
                                                 token_file = "$TEST_NGINX_K8S_DIR/token",
                                                 ca_file = "$TEST_NGINX_K8S_DIR/ca.crt",
                                                 watch_timeout = 3, timeout = 0.5, retry = 0.2 } } },
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

=== TEST 1: EndpointSlices list then watch: changes within 1 s, terminating endpoints drained, 410 relists once
--- skip_eval: 3: !$::Have{openssl} || !$::Have{python3}
--- http_config eval: $::HttpConfig
--- config
    location = /t {
        content_by_lua_block {
            local t = require "autoscale_test"
            local process = require "autoscale_process"
            local http = require "resty.autoscale.http"
            local cjson = require "cjson"
            local gw, api_port = $TEST_NGINX_RAND_PORT_6, $TEST_NGINX_RAND_PORT_7
            local ports = { "$TEST_NGINX_RAND_PORT_1", "$TEST_NGINX_RAND_PORT_2", "$TEST_NGINX_RAND_PORT_3",
                            "$TEST_NGINX_RAND_PORT_4" }
            local names = {}
            for i, p in ipairs(ports) do names[p] = "p" .. i end
            local dir = ngx.config.prefix() .. "logs/"
            local k8s = "$TEST_NGINX_K8S_DIR/"
            local token = (process.read(k8s .. "token"):gsub("%s+$", ""))

            local function control(method, path, body) -- the fake's test controls, over TLS checked against the CA
                local status, res = http.request { url = "https://127.0.0.1:" .. api_port .. path, method = method,
                                                   server_name = "kubernetes.default.svc", body = body,
                                                   max_body = 4 * 1024 * 1024 }
                assert(status == 200, "fake API server: " .. tostring(status) .. " " .. tostring(res))
                return cjson.decode(res)
            end
            local function slice(name, eps, service) -- eps: { { port index, ready, serving, terminating, zone } }
                local list = {}
                for _, e in ipairs(eps) do
                    list[#list + 1] = { addresses = { "127.0.0.1" }, nodeName = "node-" .. e[1], zone = e[5],
                                        conditions = { ready = e[2], serving = e[3], terminating = e[4] } }
                end
                -- one EndpointSlice has one port number per name: the endpoints here listen on different ports, so
                -- each slice of this test has the endpoints of one port (as a Service with several target ports would)
                local port = #eps > 0 and tonumber(ports[eps[1][1]]) or 1
                return control("PUT", "/__test/endpointslices/shop/" .. name, cjson.encode {
                    metadata = { labels = { ["kubernetes.io/service-name"] = service or "api" } },
                    addressType = "IPv4", endpoints = list,
                    ports = { { name = "metrics", port = 9100, protocol = "TCP" }, { name = "http", port = port, protocol = "TCP" } },
                })
            end
            local function peers() -- the upstream's peers not draining, as "p1,p2"
                local out = {}
                for _, p in ipairs(autoscale.status("api").peers) do
                    if p.state ~= "draining" then
                        out[#out + 1] = names[p.addr:match(":(%d+)$")] or p.addr
                    end
                end
                table.sort(out)
                return table.concat(out, ",")
            end
            local function within(want, s)
                ngx.update_time()
                local t0 = ngx.now()
                if not t.poll(function() return peers() == want end, s or 3) then
                    return nil
                end
                ngx.update_time()
                return ngx.now() - t0
            end
            local function fast(x) return x ~= nil and x < 1 end
            local function count(pattern) return process.count(dir .. "error.log", pattern) end
            local function reqs(pred)
                local n = 0
                for _, r in ipairs(control("GET", "/__test/requests")) do
                    if r.path and r.path:find("endpointslices", 1, true) and pred(r.query or {}) then n = n + 1 end
                end
                return n
            end
            local function lists() return reqs(function(q) return q.watch == nil and q.continue == nil end) end -- list starts
            local function source() return process.asker(gw, "api", "kubernetes") end

            local api
            local ok, err = pcall(function()
                api = process.start("python3 $TEST_NGINX_REPO/tools/fake_k8s_api.py --port " .. api_port .. " --cert "
                                    .. k8s .. "srv.crt --key " .. k8s .. "srv.key --token " .. token
                                    .. " --bookmark-interval 0.5", dir .. "k8s.log", 90)
                assert(t.poll(function() return process.listening(api_port) end, 5), "fake API server did not start")
                -- the slices of p1 and p2 (one port each), and one of another Service that must be left out
                slice("api-1", { { 1, true } })
                slice("api-2", { { 2, true } })
                slice("web-1", { { 3, true } }, "web")
                local took = within("p1,p2", 5)
                ngx.say("listed: ", peers(), "; the seed p4 replaced")

                -- a new slice: within 1 s; zone and node kept
                slice("api-3", { { 3, true, true, false, "zone-b" } })
                took = within("p1,p2,p3")
                ngx.log(ngx.NOTICE, "EndpointSlice change to the upstream: ", took, " s")
                local src = source()
                ngx.say("p3 added within 1 s: ", fast(took), "; zone ", src.detail["127.0.0.1:" .. ports[3]].zone,
                        ", node ", src.detail["127.0.0.1:" .. ports[3]].node)

                -- p2 terminating under load with requests in flight: no new requests within 1 s, 0 client errors
                local load
                local th = ngx.thread.spawn(function()
                    load = t.load { port = gw, path = "/?sleep=0.2", concurrency = 12, duration = 2.5 }
                end)
                ngx.sleep(0.5)
                local inflight = t.peer(autoscale.status("api"), "127.0.0.1:" .. ports[2]).inflight
                slice("api-2", { { 2, false, true, true } })
                took = within("p1,p3")
                local before = t.peer(autoscale.status("api"), "127.0.0.1:" .. ports[2])
                before = before and (before.totals.requests + before.inflight) or 0
                ngx.thread.wait(th)
                local after = t.peer(autoscale.status("api"), "127.0.0.1:" .. ports[2])
                ngx.say("p2 terminating: drained within 1 s ", fast(took), " with requests in flight ", inflight > 0,
                        "; new requests to it afterwards ", after and (after.totals.requests - before) or 0,
                        "; client errors ", load.errors, " of ", load.total > 50 and "> 50" or load.total)
                ngx.say("terminating endpoints counted: ", source().terminating)
                slice("api-2", {}) -- the endpoint is gone
                assert(t.poll(function() return t.peer(autoscale.status("api"), "127.0.0.1:" .. ports[2]) == nil end, 5),
                       "p2 was not removed")

                -- bookmarks: the other Service's changes move the version the next watch starts from
                local rv = slice("web-1", { { 3, true } }).resourceVersion
                assert(t.poll(function() return reqs(function(q) return q.watch == "1" and q.resourceVersion == rv end) > 0 end, 5),
                       "no watch from the bookmark's resourceVersion")
                ngx.say("bookmark moved the resourceVersion: true; allowWatchBookmarks asked ",
                        reqs(function(q) return q.watch == "1" and q.allowWatchBookmarks ~= "true" end) == 0)

                -- the watch cut in the middle of an event, which the store then compacts away: the watch from the
                -- last version seen gets a 410 and lists once (not a loop)
                local listed, failed = lists(), count("of api: kubernetes failed")
                control("POST", "/__test/watch-fault", cjson.encode { mode = "cut" })
                slice("api-2", { { 2, true } })
                control("POST", "/__test/compact")
                took = within("p1,p2,p3")
                ngx.sleep(1)
                ngx.say("watch cut mid-event: p2 back ", took ~= nil, "; relists ", lists() - listed, "; failure logged ",
                        count("of api: kubernetes failed") - failed, "; 410 logged ", count("watch expired %(410") >= 1)

                -- a watch request answered 410 Gone (when the open watch ends at its timeoutSeconds): one relist
                listed = lists()
                control("POST", "/__test/watch-fault", cjson.encode { mode = "gone_http" })
                assert(t.poll(function() return lists() > listed end, 6), "no relist after the HTTP 410")
                slice("api-4", { { 4, true } })
                took = within("p1,p2,p3,p4")
                ngx.sleep(0.5)
                ngx.say("HTTP 410: relists ", lists() - listed, "; the next change followed within 1 s ", fast(took))

                -- a line that is not JSON: a failure, then a relist; the set is kept meanwhile
                listed = lists()
                control("POST", "/__test/watch-fault", cjson.encode { mode = "malformed" })
                slice("api-4", {})
                took = within("p1,p2,p3", 3)
                ngx.say("malformed event: followed after a relist ", took ~= nil, "; relists ", lists() - listed,
                        "; logged ", count("an event that is not JSON") >= 1, "; lists paged (continue) ",
                        reqs(function(q) return q.continue ~= nil and q.limit == "3" end) > 0)

                -- a slow answer (the next watch's header after 4 s, past its 3.5 s deadline): a failure, set kept
                local bad_before = count("of api: kubernetes failed")
                control("POST", "/__test/watch-fault", cjson.encode { mode = "slow", count = 1, delay = 4 })
                local res
                th = ngx.thread.spawn(function() res = t.load { port = gw, concurrency = 4, duration = 3 } end)
                local seen = t.poll(function() return count("deadline exceeded") >= 1 end, 8)
                local kept = peers()
                slice("api-4", { { 4, true } })
                took = within("p1,p2,p3,p4", 5)
                ngx.thread.wait(th)
                ngx.say("slow answer: deadline named ", seen, ", failure logged ",
                        count("of api: kubernetes failed") - bad_before, ", set kept ", kept, "; followed afterwards ",
                        took ~= nil, "; client errors ", res.errors)

                -- the token refused (rotated on the server's side), then the token file rotated too
                local bad = count("HTTP 401")
                control("POST", "/__test/token", "rotated-" .. token)
                control("POST", "/__test/compact")
                assert(t.poll(function() return count("HTTP 401") > bad end, 8), "the 401 was not reported")
                local src2 = source()
                process.write(k8s .. "token", "rotated-" .. token .. "\n")
                slice("api-4", {})
                took = within("p1,p2,p3", 8)
                ngx.say("token refused: source ok ", src2.ok, ", set kept meanwhile; rotated file read: ", took ~= nil,
                        "; token in the log ", count((token:gsub("%p", "%%%0"))), " times")
            end)
            if api then api:stop() end
            if not ok then
                ngx.say("FAILED: ", err)
            end
        }
    }
--- log_level: notice
--- request
GET /t
--- timeout: 90
--- response_body
listed: p1,p2; the seed p4 replaced
p3 added within 1 s: true; zone zone-b, node node-3
p2 terminating: drained within 1 s true with requests in flight true; new requests to it afterwards 0; client errors 0 of > 50
terminating endpoints counted: 1
bookmark moved the resourceVersion: true; allowWatchBookmarks asked true
watch cut mid-event: p2 back true; relists 1; failure logged 1; 410 logged true
HTTP 410: relists 1; the next change followed within 1 s true
malformed event: followed after a relist true; relists 1; logged true; lists paged (continue) true
slow answer: deadline named true, failure logged 1, set kept p1,p2,p3; followed afterwards true; client errors 0
token refused: source ok false, set kept meanwhile; rotated file read: true; token in the log 0 times
--- no_error_log eval
# Stopping the API server can reset a connection that carries a request it has not read yet; nginx's core logs that.
qr/\[error\](?!.*\(104: Connection reset by peer\))/



=== TEST 2: bad Kubernetes options are refused with the field path and the reason
--- config
    location = /t {
        content_by_lua_block {
            local config = require "resty.autoscale.config"
            local k8s = "$TEST_NGINX_K8S_DIR/"
            local function check(k)
                if type(k) == "table" and k.token_file == nil then k.token_file = k8s .. "token" end
                if type(k) == "table" and k.ca_file == nil then k.ca_file = k8s .. "ca.crt" end
                local c, err = config.validate { upstreams = { api = { peers = { "127.0.0.1:1" }, discovery = { kubernetes = k } } } }
                local v = c and c.upstreams.api.discovery.kubernetes
                ngx.say(c and ("ok " .. v.namespace .. " " .. v.api .. " " .. v.server_name .. " " .. v.watch_timeout) or err)
            end
            local a = "https://127.0.0.1:6443"
            check "x"
            check { api = a }
            check { api = a, service = "API" }
            check { api = a, service = "api", namespace = "a_b" }
            check { api = a, service = "api", port_name = "" }
            check { api = "http://127.0.0.1:6443", service = "api" }
            check { api = "https://127.0.0.1:6443/api", service = "api" }
            check { api = a, service = "api", token_file = "/nonexistent/token" }
            check { api = a, service = "api", watch_timeout = 0 }
            check { api = a, service = "api", server_name = "a b" }
            check { api = a, service = "api", labels = {} }
            check { service = "api" } -- not in a pod: no KUBERNETES_SERVICE_HOST
            check { api = a, service = "api" }
            check { api = a, service = "api", namespace = "shop", port_name = "http", watch_timeout = 60 }
        }
    }
--- request
GET /t
--- response_body
upstreams.api.discovery.kubernetes: must be a table (got string)
upstreams.api.discovery.kubernetes.service: must be a Service name (a DNS label, e.g. "api"; got nil)
upstreams.api.discovery.kubernetes.service: must be a Service name (a DNS label, e.g. "api"; got "API")
upstreams.api.discovery.kubernetes.namespace: must be a namespace name (a DNS label; got "a_b")
upstreams.api.discovery.kubernetes.port_name: must be the Service port's name (a DNS label; got "")
upstreams.api.discovery.kubernetes.api: must be the API server's "https://host:port" (not https; got "http://127.0.0.1:6443")
upstreams.api.discovery.kubernetes.api: must be the API server's "https://host:port" (has a path; got "https://127.0.0.1:6443/api")
upstreams.api.discovery.kubernetes.token_file: cannot read "/nonexistent/token": /nonexistent/token: No such file or directory
upstreams.api.discovery.kubernetes.watch_timeout: must be between 1 and 3600 (got 0)
upstreams.api.discovery.kubernetes.server_name: must be a host name (got "a b")
upstreams.api.discovery.kubernetes.labels: unknown option (valid: api, ca_file, namespace, port_name, retry, server_name, service, timeout, token_file, watch_timeout)
upstreams.api.discovery.kubernetes.api: not given, and KUBERNETES_SERVICE_HOST is not set (not in a pod): give api = "https://host:port"
ok default https://127.0.0.1:6443 kubernetes.default.svc 10
ok shop https://127.0.0.1:6443 kubernetes.default.svc 60
