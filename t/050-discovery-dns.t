# vim:set ft= ts=4 sw=4 et:
# DNS discovery against a real DNS server (dnsmasq) that the test starts and stops by PID: an SRV change (dnsmasq
# restarted with new records) and an A change (hosts file rewritten, SIGHUP) reach the balancer without reload; the
# DNS server hanging (questions time out), or answering REFUSED, keeps the last good set and is logged once; AAAA
# records become IPv6 peers.

use lib 't';
use Autoscale;

workers(2);
worker_connections(1024); # the gateway, its backends and their keepalive connections share the workers
master_on();

our $Have_dnsmasq = grep { -x "$_/dnsmasq" } split /:/, "$ENV{PATH}:/usr/sbin:/sbin";
diag("dnsmasq not found (Debian package dnsmasq-base): skipped") unless $Have_dnsmasq;
our $Have_ipv6 = do { my $f; open($f, '<', '/proc/net/if_inet6') ? scalar grep { /\slo$/ } <$f> : 0 };
diag("no IPv6 loopback: the AAAA upstream is left out") unless $Have_ipv6;

# SRV backends on 127.0.0.1 ports 1-3; A backends on 127.0.0.2-4, port 6. Each answers "ip:port".
our $HttpConfig = <<'_EOC_';
    lua_socket_log_errors off; # a DNS server that does not answer is reported by discovery, once
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1;
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_2;
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_3;
        listen 127.0.0.2:$TEST_NGINX_RAND_PORT_6;
        listen 127.0.0.3:$TEST_NGINX_RAND_PORT_6;
        listen 127.0.0.4:$TEST_NGINX_RAND_PORT_6;
        #V6_LISTEN#
        location / { content_by_lua_block { ngx.say(ngx.var.server_addr, ":", ngx.var.server_port) } }
    }
    init_by_lua_block {
        autoscale = require "resty.autoscale"
        local function dns(name, more)
            local d = { name = name, nameservers = { "127.0.0.1:26653" }, min_ttl = 0.2, max_ttl = 1, timeout = 0.3,
                        retries = 1 }
            for k, v in pairs(more or {}) do d[k] = v end
            return { keep_static = false, drain_timeout = 5, dns = d }
        end
        autoscale.configure { upstreams = {
            srv = { peers = { "127.0.0.1:$TEST_NGINX_RAND_PORT_4" }, discovery = dns("_api._tcp.svc.test", { type = "SRV" }) },
            web = { peers = { "127.0.0.1:$TEST_NGINX_RAND_PORT_4" },
                    discovery = dns("web.svc.test", { port = $TEST_NGINX_RAND_PORT_6 }) },
            refused = { peers = { "127.0.0.1:$TEST_NGINX_RAND_PORT_3" }, discovery = dns("other.example", { port = 80 }) },
            #V6_UPSTREAM#
        } }
    }
    init_worker_by_lua_block { autoscale.init_worker() }
    upstream srv {
        server 0.0.0.1;
        balancer_by_lua_block { autoscale.balance("srv") }
        keepalive 16;
    }
    upstream web {
        server 0.0.0.1;
        balancer_by_lua_block { autoscale.balance("web") }
        keepalive 16;
    }
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_5 reuseport;
        location /srv {
            proxy_pass http://srv;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            log_by_lua_block { autoscale.log() }
        }
        location /web {
            proxy_pass http://web;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            log_by_lua_block { autoscale.log() }
        }
        location /v6 {
            proxy_pass http://v6;
            log_by_lua_block { autoscale.log() }
        }
        location = /discovery { content_by_lua_block { autoscale.discovery_handler() } }
    }
    upstream v6 {
        server 0.0.0.1;
        balancer_by_lua_block { autoscale.balance(autoscale.status("v6") and "v6" or "web") }
    }
_EOC_
# AAAA records: an upstream whose peers dnsmasq names as ::1, where a backend listens (when lo has IPv6)
$HttpConfig =~ s{#V6_LISTEN#}{$Have_ipv6 ? 'listen [::1]:$TEST_NGINX_RAND_PORT_7;' : ''}e;
$HttpConfig =~ s{#V6_UPSTREAM#}{$Have_ipv6 ? 'v6 = { peers = { "127.0.0.1:$TEST_NGINX_RAND_PORT_4" }, discovery = dns("v6.svc.test", { type = "AAAA", port = $TEST_NGINX_RAND_PORT_7 }) },' : ''}e;

run_tests();

__DATA__

=== TEST 1: SRV and A changes reach the balancer without reload; a DNS server gone keeps the last good set
--- skip_eval: 3: !$::Have_dnsmasq
--- http_config eval: $::HttpConfig
--- config
    location = /t {
        content_by_lua_block {
            local t = require "autoscale_test"
            local process = require "autoscale_process"
            local cjson = require "cjson"
            local gw = $TEST_NGINX_RAND_PORT_5
            local p = { "$TEST_NGINX_RAND_PORT_1", "$TEST_NGINX_RAND_PORT_2", "$TEST_NGINX_RAND_PORT_3" }
            local web_port = $TEST_NGINX_RAND_PORT_6
            local dir = ngx.config.prefix() .. "logs/"
            local dnsmasq = (io.open("/usr/sbin/dnsmasq") and "/usr/sbin/" or "") .. "dnsmasq"

            -- dnsmasq answers SRV _api._tcp.svc.test with `srv_ports` on b.svc.test (127.0.0.1), and A web.svc.test
            -- from a hosts file that SIGHUP re-reads; everything else is REFUSED (no upstream servers).
            local function configure(srv_ports, web_ips)
                local conf = { "port=26653", "listen-address=127.0.0.1", "bind-interfaces", "no-resolv", "no-hosts",
                               "keep-in-foreground", "user=root", "local-ttl=1", "addn-hosts=" .. dir .. "dns-hosts",
                               "host-record=b.svc.test,127.0.0.1", "host-record=v6.svc.test,::1", "pid-file=" }
                for _, port in ipairs(srv_ports) do
                    conf[#conf + 1] = "srv-host=_api._tcp.svc.test,b.svc.test," .. port .. ",0,1"
                end
                process.write(dir .. "dnsmasq.conf", table.concat(conf, "\n") .. "\n")
                local hosts = {}
                for _, ip in ipairs(web_ips) do hosts[#hosts + 1] = ip .. " web.svc.test" end
                process.write(dir .. "dns-hosts", table.concat(hosts, "\n") .. "\n")
            end
            local function start()
                local proc = process.start(dnsmasq .. " -C " .. dir .. "dnsmasq.conf", dir .. "dnsmasq.log")
                assert(t.poll(function() return process.listening(26653, "udp") or not proc:alive() end, 5)
                       and proc:alive(), "dnsmasq did not start: " .. process.read(dir .. "dnsmasq.log"))
                return proc
            end
            local function peers(name) -- serving peers as "port" (srv) or "ip" (web), sorted
                local out = {}
                for _, peer in ipairs(autoscale.status(name).peers) do
                    if peer.state ~= "draining" then
                        out[#out + 1] = name == "srv" and ("p" .. (({ [p[1]] = 1, [p[2]] = 2, [p[3]] = 3 })[peer.addr:match(":(%d+)$")] or "?"))
                                        or peer.addr:match("^(.*):%d+$")
                    end
                end
                table.sort(out)
                return table.concat(out, ",")
            end
            local function until_served(path, want) return process.until_served(gw, path, want .. "\n") end
            local function count(pattern) return process.count(dir .. "error.log", pattern) end
            local function owner(name) return (process.asker(gw, name, "dns")) end

            configure({ p[1], p[2] }, { "127.0.0.2", "127.0.0.3" })
            local server = start()
            local ok, err = pcall(function()
                assert(t.poll(function() return peers("srv") == "p1,p2" and peers("web") == "127.0.0.2,127.0.0.3" end, 5),
                       "first answers not applied: " .. peers("srv") .. " " .. peers("web"))
                ngx.say("srv: ", peers("srv"), "; web: ", peers("web"))
                local v6 = autoscale.status("v6") -- nil without an IPv6 loopback
                if v6 then
                    assert(t.poll(function() return peers("v6") == "[::1]" end, 5), "AAAA not applied: " .. peers("v6"))
                    assert(until_served("/v6", "::1:$TEST_NGINX_RAND_PORT_7"), "[::1] serves nothing")
                end
                ngx.say("AAAA: ", v6 and peers("v6") or "[::1]") -- (without IPv6 loopback not asked: see the diag)

                -- SRV: p3 replaces p1 (dnsmasq restarted with the new records)
                configure({ p[2], p[3] }, { "127.0.0.2", "127.0.0.3" })
                assert(server:stop())
                server = start()
                local took = until_served("/srv", "127.0.0.1:" .. p[3])
                ngx.log(ngx.NOTICE, "SRV change to first request on the new peer: ", took, " s (record TTL 1 s)")
                assert(t.poll(function() return peers("srv") == "p2,p3" end, 5), "p1 not drained: " .. peers("srv"))
                ngx.say("SRV change: p3 serves within TTL + 1 s: ", took ~= nil and took < 2, "; srv: ", peers("srv"))

                -- A: 127.0.0.4 replaces 127.0.0.2 (hosts file rewritten, SIGHUP)
                configure({ p[2], p[3] }, { "127.0.0.3", "127.0.0.4" })
                assert(server:signal("HUP"), "SIGHUP not sent")
                took = until_served("/web", "127.0.0.4:" .. web_port)
                ngx.log(ngx.NOTICE, "A change to first request on the new peer: ", took, " s (record TTL 1 s)")
                assert(t.poll(function() return peers("web") == "127.0.0.3,127.0.0.4" end, 5), "not drained: " .. peers("web"))
                ngx.say("A change: 127.0.0.4 serves within TTL + 1 s: ", took ~= nil and took < 2, "; web: ", peers("web"))

                -- the DNS server hangs (SIGSTOP: questions time out): both keep their last good set, each failure
                -- logged once
                local function both(what) return count("of srv: dns " .. what) + count("of web: dns " .. what) end
                local failed, back = both("failed"), both("answers again")
                assert(server:signal("STOP"), "SIGSTOP not sent")
                assert(t.poll(function() return owner("srv").failures >= 3 and owner("web").failures >= 3 end, 10),
                       "fewer than 3 failed questions")
                local srv = t.load { port = gw, path = "/srv", concurrency = 4, requests = 100 }
                local web = t.load { port = gw, path = "/web", concurrency = 4, requests = 100 }
                ngx.say("DNS server hangs: errors ", srv.errors + web.errors, " in ", srv.total + web.total,
                        " requests; srv: ", peers("srv"), "; web: ", peers("web"), "; failures logged ",
                        both("failed") - failed, ", timeouts ", (owner("srv").error or ""):find("timeout") ~= nil)
                server:signal("CONT")
                assert(t.poll(function() return both("answers again") - back == 2 end, 5), "recovery not logged")
                local st = owner("refused")
                ngx.say("refused: still the seed ", autoscale.status("refused").peers[1].addr == "127.0.0.1:" .. p[3],
                        ", error ", st.error, ", failures >= 3 ", st.failures >= 3, ", logged ",
                        count("discovery of refused: dns failed"))
            end)
            server:signal("CONT")
            server:stop()
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
srv: p1,p2; web: 127.0.0.2,127.0.0.3
AAAA: [::1]
SRV change: p3 serves within TTL + 1 s: true; srv: p2,p3
A change: 127.0.0.4 serves within TTL + 1 s: true; web: 127.0.0.3,127.0.0.4
DNS server hangs: errors 0 in 200 requests; srv: p2,p3; web: 127.0.0.3,127.0.0.4; failures logged 2, timeouts true
refused: still the seed true, error refused (rcode 5), failures >= 3 true, logged 1
--- no_error_log eval
# While dnsmasq restarts, a question can meet its closed port; nginx itself logs that ICMP error of a UDP socket.
qr/\[error\](?!.*recv\(\) failed \(111: Connection refused\))/



=== TEST 2: a hostile DNS server (mutated, cut, random replies) raises nothing and crashes no worker
--- http_config
    lua_socket_log_errors off;
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1;
        location / { return 200 "ok\n"; }
    }
    init_by_lua_block {
        autoscale = require "resty.autoscale"
        local function dns(name, more)
            local d = { name = name, nameservers = { "127.0.0.1:26654" }, min_ttl = 0.05, max_ttl = 0.05, timeout = 0.2,
                        retries = 1 }
            for k, v in pairs(more) do d[k] = v end
            return { dns = d }
        end
        autoscale.configure { upstreams = {
            a = { peers = { "127.0.0.1:$TEST_NGINX_RAND_PORT_1" }, discovery = dns("a.test", { port = 80 }) },
            s = { peers = { "127.0.0.1:$TEST_NGINX_RAND_PORT_1" }, discovery = dns("_x._tcp.s.test", { type = "SRV" }) },
        } }
    }
    init_worker_by_lua_block { autoscale.init_worker() }
--- config
    location = /t {
        content_by_lua_block {
            local t = require "autoscale_test"
            local process = require "autoscale_process"
            local dir = ngx.config.prefix() .. "logs/"
            local function workers()
                local out = {}
                for pid in io.popen("ps -o pid= --ppid " .. process.read(dir .. "nginx.pid"):match("%d+")):lines() do
                    out[#out + 1] = pid:match("%d+")
                end
                table.sort(out)
                return table.concat(out, ",")
            end
            local before = workers()
            local fuzz = process.start("python3 $TEST_NGINX_REPO/t/lib/dns_fuzz.py --port 26654 --seconds 20",
                                       dir .. "fuzz.log")
            local answered = 0
            local ok = t.poll(function()
                answered = tonumber(process.read(dir .. "fuzz.log"):match(".*answered (%d+)")) or 0
                return answered >= 150
            end, 15)
            fuzz:stop()
            ngx.log(ngx.NOTICE, "hostile DNS replies: ", answered, ", failures counted as such: ",
                    process.count(dir .. "error.log", "dns failed"))
            ngx.say("150 hostile replies: ", ok, "; same workers: ", workers() == before,
                    "; status readable: ", autoscale.status("a") ~= nil and autoscale.status("s") ~= nil)
        }
    }
--- log_level: notice
--- request
GET /t
--- timeout: 30
--- response_body
150 hostile replies: true; same workers: true; status readable: true
--- no_error_log eval
# Once the hostile server has stopped, a question can meet its closed port; nginx itself logs that ICMP error.
[qr/\[error\](?!.*recv\(\) failed \(111: Connection refused\))/, qr/\[crit\]/, qr/\[alert\]/]
