# vim:set ft= ts=4 sw=4 et:
# Upstream protocols through the balancer: WebSocket (an Upgrade proxied with proxy_pass), gRPC (grpc_pass to h2c
# backends), and TLS to upstreams with a per-peer SNI name (proxy_ssl_name from a variable set in the balancer phase,
# verified against a certificate made for this test). Each block checks which peer the balancer chose for each
# request and that the log phase accounted for every attempt (requests counted, nothing left in flight).

use lib 't';
use Autoscale;
use File::Temp ();

workers(2);
master_on();

# A self-signed certificate for the names a.test and b.test, made here, removed when the test ends.
our $CertDir = File::Temp::tempdir('autoscale-tls-XXXXXX', TMPDIR => 1, CLEANUP => 1);
system('openssl', 'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '2', '-subj', '/CN=a.test',
       '-addext', 'subjectAltName=DNS:a.test,DNS:b.test',
       '-keyout', "$CertDir/key.pem", '-out', "$CertDir/cert.pem") == 0
    or die "openssl req failed\n";
chmod 0755, $CertDir;
chmod 0644, "$CertDir/key.pem", "$CertDir/cert.pem";
$ENV{TEST_NGINX_CERT_DIR} = $CertDir;

# One gateway with three upstreams (round robin, so that the choice of each request is known) and their backends.
# The balancer sets $autoscale_peer (trace), which every location proxying through it declares.
our $HttpConfig = <<'_EOC_';
    init_by_lua_block {
        autoscale = require "resty.autoscale"
        local function up(a, b)
            return { balancer = "round_robin", slow_start = 0, outlier = false,
                     peers = { "127.0.0.1:" .. a, "127.0.0.1:" .. b } }
        end
        autoscale.configure { upstreams = {
            ws = up($TEST_NGINX_RAND_PORT_1, $TEST_NGINX_RAND_PORT_2),
            grpc = up($TEST_NGINX_RAND_PORT_3, $TEST_NGINX_RAND_PORT_4),
            tls = up($TEST_NGINX_RAND_PORT_5, $TEST_NGINX_RAND_PORT_6),
        } }
        autoscale.trace { variables = { "peer" } }      -- sets $autoscale_peer in the balancer phase
        -- the TLS name of each peer of "tls"
        SNI = { ["127.0.0.1:$TEST_NGINX_RAND_PORT_5"] = "a.test", ["127.0.0.1:$TEST_NGINX_RAND_PORT_6"] = "b.test" }
    }
    init_worker_by_lua_block { autoscale.init_worker() }
    upstream ws {
        server 0.0.0.1;
        balancer_by_lua_block { autoscale.balance("ws") }
        keepalive 8;
    }
    # The backends: a raw upgrade echo. After "101 Switching Protocols" the connection is a byte tunnel; each line
    # received is sent back prefixed with the backend's port.
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1;
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_2;
        location /ws {
            content_by_lua_block {
                if (ngx.var.http_upgrade or ""):lower() ~= "websocket" then
                    return ngx.exit(426)
                end
                local sock = assert(ngx.req.socket(true))
                sock:send("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
                sock:settimeout(3000)
                for _ = 1, 2 do
                    local line = sock:receive("*l")
                    if not line then
                        break
                    end
                    sock:send(ngx.var.server_port .. " " .. line .. "\n")
                end
            }
        }
    }
    upstream grpc {
        server 0.0.0.1;
        balancer_by_lua_block { autoscale.balance("grpc") }
        keepalive 8;
    }
    # The backends speak HTTP/2 without TLS (h2c, prior knowledge), as gRPC servers do: a gRPC-style answer with
    # content-type application/grpc and grpc-status / grpc-message trailers; /pkg.Svc/Fail answers 503, and
    # /pkg.Svc/Unavailable a 200 with grpc-status 14 (UNAVAILABLE).
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_3 http2;
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_4 http2;
        default_type application/grpc;
        # each reads the request body before answering, as gRPC servers do (a `return` here would answer first and
        # reset the stream afterwards, which nginx's grpc module then reports on the kept-alive connection)
        location / {
            content_by_lua_block {
                ngx.req.read_body()
                local to = { ["/pkg.Svc/Fail"] = "@fail", ["/pkg.Svc/Unavailable"] = "@unavailable" }
                return ngx.exec(to[ngx.var.uri] or "@answer")
            }
        }
        location @fail { return 503; }
        location @unavailable {
            sub_filter_types application/grpc;
            sub_filter "@" "@";
            add_trailer grpc-status 14;
            return 200 "unavailable";
        }
        location @answer {
            sub_filter_types application/grpc;   # no Content-Length: the answer is streamed, as gRPC answers are
            sub_filter "@" "@";
            add_trailer grpc-status 0;
            add_trailer grpc-message "served-by-$server_port-over-$server_protocol";
            return 200 "$server_port";
        }
    }
    upstream tls {
        server 0.0.0.1;
        balancer_by_lua_block {
            autoscale.balance("tls")
            ngx.var.peer_sni = SNI[ngx.var.autoscale_peer]   -- read by proxy_ssl_name when this attempt connects
        }
        keepalive 8;
    }
    # The backends: TLS with the test's certificate; each answers its port and the SNI name it received. With the
    # header Fail-On set to its port, a backend answers 502 (so that nginx retries the other peer).
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_5 ssl;
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_6 ssl;
        ssl_certificate $TEST_NGINX_CERT_DIR/cert.pem;
        ssl_certificate_key $TEST_NGINX_CERT_DIR/key.pem;
        location / {
            if ($http_fail_on = $server_port) { return 502; }
            return 200 "$server_port $ssl_server_name\n";
        }
    }
_EOC_

run_tests();

__DATA__

=== TEST 1: WebSocket: each Upgrade goes to the peer the balancer chose, the tunnel carries frames both ways, and the log phase counts each upgraded request once and leaves nothing in flight
--- http_config eval: $::HttpConfig
--- config
    set $autoscale_peer "";
    location /ws {
        proxy_pass http://ws;
        proxy_http_version 1.1;
        proxy_set_header Upgrade $http_upgrade;
        proxy_set_header Connection "upgrade";
        log_by_lua_block { autoscale.log() }
    }
    location = /t {
        content_by_lua_block {
            local P = { ["$TEST_NGINX_RAND_PORT_1"] = "p1", ["$TEST_NGINX_RAND_PORT_2"] = "p2" }
            local seen = {}
            for i = 1, 6 do
                local sock = ngx.socket.tcp()
                sock:settimeout(3000)
                assert(sock:connect("127.0.0.1", ngx.var.server_port))
                sock:send("GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                          .. "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
                local status = sock:receive("*l")
                repeat local h = sock:receive("*l") until not h or h == ""
                sock:send("hello " .. i .. "\n")
                local a = sock:receive("*l") or "nothing"
                sock:send("again\n")
                local b = sock:receive("*l") or "nothing"
                sock:close()
                local port = a:match("^(%d+) ")
                assert(port and b:match("^(%d+) ") == port, "one tunnel, one backend: " .. a .. " / " .. b)
                seen[#seen + 1] = status:match(" (%d+) ") .. " " .. (P[port] or port) .. " " .. a:match(" (.*)$")
            end
            ngx.say(table.concat(seen, ", "))
            -- the log phase of the last tunnel runs after its client closed: wait until every attempt is accounted
            ngx.say(require("autoscale_test").accounted("ws", 6, P))
        }
    }
--- request
GET /t
--- response_body_like
^101 (p1|p2) hello 1, 101 (?!\1)(p1|p2) hello 2, 101 \1 hello 3, 101 \2 hello 4, 101 \1 hello 5, 101 \2 hello 6
p1 requests 3 failures 0 in flight 0; p2 requests 3 failures 0 in flight 0
--- no_error_log
[error]



=== TEST 2: gRPC: grpc_pass through balancer_by_lua reaches each h2c backend the balancer chose, trailers (grpc-status) come back, and the log phase counts each call; a 200 with grpc-status 14 counts as a success, a 503 as a failure
--- http_config eval: $::HttpConfig
--- config
    set $autoscale_peer "";
    location /pkg.Svc/ {
        grpc_pass grpc://grpc;
        grpc_next_upstream off;
        log_by_lua_block { autoscale.log() }
    }
    location = /t {
        content_by_lua_block {
            local P = { ["$TEST_NGINX_RAND_PORT_3"] = "p1", ["$TEST_NGINX_RAND_PORT_4"] = "p2" }
            local function call(method, body)
                local sock = ngx.socket.tcp()
                sock:settimeout(3000)
                assert(sock:connect("127.0.0.1", ngx.var.server_port))
                sock:send("POST /pkg.Svc/" .. method .. " HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/grpc\r\n"
                          .. "TE: trailers\r\nContent-Length: " .. #body .. "\r\nConnection: close\r\n\r\n" .. body)
                local raw = sock:receive("*a") or ""
                sock:close()
                return raw
            end
            local seen = {}
            for i = 1, 4 do
                local raw = call("Echo", "\0\0\0\0\0") -- one empty message
                local port = raw:match("\r\n\r\n%x+\r\n(%d+)\r\n")
                local msg = raw:match("\r\n[Gg]rpc%-[Mm]essage: ([^\r]*)")
                seen[#seen + 1] = (raw:match("^HTTP/1.1 (%d+)") or "?") .. " " .. (P[port] or tostring(port))
                    .. " grpc-status " .. tostring(raw:match("\r\n[Gg]rpc%-[Ss]tatus: (%d+)"))
                    .. " " .. tostring(msg and msg:gsub("%d+", P))
            end
            ngx.say(table.concat(seen, ", "))
            local fail = call("Fail", "")
            ngx.say("Fail: ", fail:match("^HTTP/1.1 (%d+)"))
            local unavailable = call("Unavailable", "")
            ngx.say("Unavailable: ", unavailable:match("^HTTP/1.1 (%d+)"), " grpc-status ",
                    unavailable:match("\r\n[Gg]rpc%-[Ss]tatus: (%d+)"))
            ngx.say(require("autoscale_test").accounted("grpc", 6, P))
        }
    }
--- request
GET /t
--- response_body_like
^200 (p1|p2) grpc-status 0 served-by-\1-over-HTTP/2.0, 200 (?!\1)(p1|p2) grpc-status 0 served-by-\2-over-HTTP/2.0, 200 \1 grpc-status 0 served-by-\1-over-HTTP/2.0, 200 \2 grpc-status 0 served-by-\2-over-HTTP/2.0
Fail: 503
Unavailable: 200 grpc-status 14
p1 requests 3 failures 1 in flight 0; p2 requests 3 failures 0 in flight 0
--- no_error_log
[error]



=== TEST 3: TLS to upstreams with a per-peer SNI name: proxy_ssl_name from a variable set in the balancer phase after the choice; each backend sees its own name, the certificate is verified against it, and a retry to the other peer sends that peer's name
--- http_config eval: $::HttpConfig
--- config
    set $autoscale_peer "";
    set $peer_sni "";
    location /tls {
        proxy_pass https://tls;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_ssl_server_name on;
        proxy_ssl_name $peer_sni;
        proxy_ssl_verify on;
        proxy_ssl_trusted_certificate $TEST_NGINX_CERT_DIR/cert.pem;
        proxy_ssl_session_reuse on;
        proxy_next_upstream error timeout http_502;
        log_by_lua_block { autoscale.log() }
    }
    location = /t {
        content_by_lua_block {
            local t = require "autoscale_test"
            local P = { ["$TEST_NGINX_RAND_PORT_5"] = "p1", ["$TEST_NGINX_RAND_PORT_6"] = "p2" }
            local function show(status, body)
                local port, name = (body or ""):match("^(%d+) (%S+)")
                return status .. " " .. (P[port] or tostring(port)) .. " " .. tostring(name)
            end
            local seen = {}
            for _ = 1, 4 do
                seen[#seen + 1] = show(t.get(ngx.var.server_port, "/tls"))
            end
            ngx.say(table.concat(seen, ", "))
            -- a retry: p1 answers 502 for this request, the balancer's next attempt goes to p2 with p2's name
            seen = {}
            for _ = 1, 4 do
                seen[#seen + 1] = show(t.request { port = ngx.var.server_port, path = "/tls",
                                                   headers = { ["Fail-On"] = "$TEST_NGINX_RAND_PORT_5" } })
            end
            ngx.say("p1 failing: ", table.concat(seen, ", "))
            local st
            for _ = 1, 200 do
                st = autoscale.status("tls")
                local n = 0
                local inflight = 0
                for _, p in ipairs(st.peers) do n = n + p.totals.requests; inflight = inflight + p.inflight end
                if n >= 10 and inflight == 0 then break end
                ngx.sleep(0.01)
            end
            local by = {}
            for _, p in ipairs(st.peers) do by[P[p.addr:match(":(%d+)$")]] = p end
            -- p1: 2 requests before, then one failed attempt for each failing request that the balancer sent to it
            ngx.say("p1: ", by.p1.totals.failures >= 2 and by.p1.totals.requests == 2 + by.p1.totals.failures,
                    ", p2: requests ", by.p2.totals.requests, " failures ", by.p2.totals.failures,
                    ", in flight ", by.p1.inflight + by.p2.inflight)
        }
    }
--- request
GET /t
--- response_body_like
^200 (p1 a\.test|p2 b\.test), 200 (?!\1)(p1 a\.test|p2 b\.test), 200 \1, 200 \2
p1 failing: 200 p2 b\.test, 200 p2 b\.test, 200 p2 b\.test, 200 p2 b\.test
p1: true, p2: requests 6 failures 0, in flight 0
--- no_error_log
[error]
