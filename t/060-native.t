# vim:set ft= ts=4 sw=4 et:
# The native module (ngx_http_autoscale_module, `autoscale NAME;` in an upstream block) next to the Lua library: the
# same accounting as Lua mode for the same traffic, keepalive after the directive, and the start-up refusals (an
# upstream not in autoscale.configure{}, no Lua library, a region of another layout version, keepalive before it).
# The behaviour suites run against native upstreams too: `make test-native` (AUTOSCALE_NATIVE=1).

BEGIN { $ENV{AUTOSCALE_NATIVE} = 1 }

use lib 't';
use Autoscale;

workers(2);
master_on();

our $Backends = <<'_EOC_';
    lua_shared_dict ctl 1m;
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1;
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_2;
        location / {
            content_by_lua_block {
                local port = ngx.var.server_port
                if port == "$TEST_NGINX_RAND_PORT_2" then return ngx.exit(502) end
                ngx.header["X-Connection-Requests"] = ngx.var.connection_requests
                ngx.say(port)
            }
        }
    }
_EOC_

# Two upstreams over the same three peers (one answering, one answering 502, one refusing connections): `lua_up`
# balanced by balancer_by_lua + log_by_lua, `nat_up` by the module.
our $Mixed = $::Backends . <<'_EOC_';
    init_by_lua_block {
        autoscale = require "resty.autoscale"
        local peers = { "127.0.0.1:$TEST_NGINX_RAND_PORT_1", "127.0.0.1:$TEST_NGINX_RAND_PORT_2", "127.0.0.1:$TEST_NGINX_RAND_PORT_3" }
        local function opts() return { peers = peers, balancer = "round_robin", retries = 2, slow_start = 0,
                       outlier = { consecutive_gateway_failures = 1000, consecutive_5xx = 1000 } } end
        autoscale.configure { upstreams = { lua_up = opts(), nat_up = opts() } }
    }
    init_worker_by_lua_block { autoscale.init_worker() }
    upstream lua_up {
        server 0.0.0.1;
        balancer_by_lua_block { autoscale.balance("lua_up") }
        keepalive 8;
    }
    upstream nat_up {
        server 0.0.0.1;
        autoscale;
        keepalive 8;
    }
_EOC_

our $Locations = <<'_EOC_';
    location ~ ^/(lua_up|nat_up)$ {
        proxy_pass http://$1;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_next_upstream error timeout http_502;
        proxy_connect_timeout 1s;
        add_header X-Upstream $upstream_addr always;
        log_by_lua_block { autoscale.log() }
    }
    location = /metrics { content_by_lua_block { autoscale.prometheus_handler() } }
_EOC_

# One upstream `api` in autoscale.configure{} and in nginx.conf, native.
our $Api = <<'_EOC_';
    init_by_lua_block {
        autoscale = require "resty.autoscale"
        autoscale.configure { upstreams = { api = { peers = { "127.0.0.1:1" } } } }
    }
    upstream api { server 0.0.0.1; autoscale; }
_EOC_

run_tests();

__DATA__

=== TEST 1: the same traffic through a Lua and a native upstream gives the same statistics, status and metrics; retries hide the failing peers from clients
--- http_config eval: $::Mixed
--- config eval
$::Locations . <<'_EOC_';
    location = /t {
        content_by_lua_block {
            local t = require "autoscale_test"
            local port = ngx.var.server_port
            local errors, retried = { lua_up = 0, nat_up = 0 }, { lua_up = 0, nat_up = 0 }
            for i = 1, 30 do
                for _, name in ipairs { "lua_up", "nat_up" } do
                    local status, body, headers = t.get(port, "/" .. name)
                    if status ~= 200 or body ~= "$TEST_NGINX_RAND_PORT_1\n" then errors[name] = errors[name] + 1 end
                    if headers["x-upstream"]:find(",", 1, true) then retried[name] = retried[name] + 1 end
                end
            end
            local function totals(name)
                local st
                t.poll(function()
                    st = autoscale.status(name)
                    local n, inflight = 0, 0
                    for _, p in ipairs(st.peers) do n, inflight = n + p.totals.requests, inflight + p.inflight end
                    return inflight == 0 and n >= 30
                end, 3)
                local out = {}
                for _, p in ipairs(st.peers) do
                    local c = p.totals
                    out[#out + 1] = string.format("%s requests %d failures %d 5xx %d gateway %d connect %d timeout %d aborted %d",
                        p.addr:match(":(%d+)$"), c.requests, c.failures, c.fail_http_5xx, c.fail_gateway, c.fail_connect,
                        c.fail_timeout, c.aborted)
                end
                table.sort(out)
                return table.concat(out, "\n")
            end
            local l, n = totals("lua_up"), totals("nat_up")
            ngx.log(ngx.NOTICE, "lua_up:\n", l, "\nnat_up:\n", n)
            ngx.say("client errors: lua ", errors.lua_up, ", native ", errors.nat_up)
            ngx.say("retried: ", retried.lua_up > 0, " ", retried.nat_up == retried.lua_up)
            ngx.say("same statistics: ", l == n)
            ngx.say("connect and gateway failures counted: ", n:find("connect [1-9]") ~= nil, " ", n:find("gateway [1-9]") ~= nil)
            local _, metrics = t.get(port, "/metrics")
            local function metric(name)
                local sum = 0
                for v in metrics:gmatch('autoscale_peer_requests_total{upstream="' .. name .. '"[^}]*} (%d+)') do sum = sum + tonumber(v) end
                return sum
            end
            ngx.say("metrics: ", metric("nat_up") == metric("lua_up"), " ", metric("nat_up") > 30)
        }
    }
_EOC_
--- request
GET /t
--- timeout: 20
--- response_body
client errors: lua 0, native 0
retried: true true
same statistics: true
connect and gateway failures counted: true true
metrics: true true



=== TEST 2: keepalive after the directive reuses upstream connections
--- http_config eval: $::Mixed
--- config eval
$::Locations . <<'_EOC_';
    location = /t {
        content_by_lua_block {
            local t = require "autoscale_test"
            local reused = 0
            for i = 1, 20 do
                local status, body, headers = t.get(ngx.var.server_port, "/nat_up")
                if tonumber(headers["x-connection-requests"] or 0) > 1 then reused = reused + 1 end
            end
            ngx.say("reused connections: ", reused > 5)
        }
    }
_EOC_
--- request
GET /t
--- timeout: 10
--- response_body
reused connections: true



=== TEST 3: an autoscale upstream that is not in autoscale.configure{} stops nginx at start, naming it
--- http_config eval: $::Api . "upstream other { server 0.0.0.1; autoscale; }\n"
--- config
    location = /t { proxy_pass http://other; }
--- must_die
--- error_log
upstream "other" uses "autoscale" but is not in autoscale.configure{}



=== TEST 4: the module without the Lua library configured stops nginx at start
--- http_config
    upstream api { server 0.0.0.1; autoscale; }
--- config
    location = /t { proxy_pass http://api; }
--- must_die
--- error_log
upstream "api": libresty_autoscale.so is not loaded



=== TEST 5: a shared region of another layout version stops nginx at start, naming both versions
--- http_config eval
my $c = $::Api;
# what a library of another release would have written: the header's layout version (after the 8-byte magic)
$c =~ s/(autoscale.configure[^\n]*\n)/$1 . <<'_EOC_'/e;
        local ffi = require "ffi"
        local lib = require("resty.autoscale.lib").load()
        local base, size = ffi.new("void *[1]"), ffi.new("uint64_t[1]")
        assert(lib.autoscale_region_base(base, size) == 0)
        ffi.cast("uint32_t *", ffi.cast("uint8_t *", base[0]) + 8)[0] = 99
_EOC_
$c
--- config
    location = /t { proxy_pass http://api; }
--- must_die
--- error_log eval
qr/the shared region has layout version 99, this build needs layout version \d+ \(this module: layout version \d+/



=== TEST 6: keepalive before the directive is refused (it would be dropped silently)
--- http_config
    upstream api { server 0.0.0.1; keepalive 8; autoscale; }
--- config
    location = /t { proxy_pass http://api; }
--- must_die
--- error_log
"autoscale" must be the first balancing directive of upstream "api"



=== TEST 7: the only peer refuses and no retry is left: nginx's 502 becomes the configured fallback
--- http_config
    init_by_lua_block {
        autoscale = require "resty.autoscale"
        autoscale.configure { upstreams = { api = { peers = { "127.0.0.1:$TEST_NGINX_RAND_PORT_1" }, retries = 0,
                              fallback = { status = 503, retry_after = 3 } } } }
    }
    init_worker_by_lua_block { autoscale.init_worker() }
    upstream api { server 0.0.0.1; autoscale; keepalive 4; }
--- config
    location = /t {
        proxy_pass http://api;
        proxy_next_upstream error timeout http_502;
        error_page 502 504 = @fallback;
    }
    location @fallback { content_by_lua_block { autoscale.fallback("api") } }
--- request
GET /t
--- error_code: 503
--- response_headers
Retry-After: 3
--- response_body
{"error":"service unavailable","upstream":"api","retry_after":3}
