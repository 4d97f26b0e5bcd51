# vim:set ft= ts=4 sw=4 et:
# Traceability: $autoscale_* variables (usable in log_format and add_header) name the peer of each attempt, its
# cost and the attempt number when autoscale.trace() is on; when it is off, autoscale.balance is the untraced
# function itself.

use lib 't';
use Autoscale;

# Port 3 has no listener: connecting to it fails and nginx retries on another peer. Round robin over
# (port 3, port 1, port 2) sends at least every third attempt to port 3.
our $HttpConfig = <<'_EOC_';
    server { listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1; location / { return 200 "a\n"; } }
    server { listen 127.0.0.1:$TEST_NGINX_RAND_PORT_2; location / { return 200 "b\n"; } }
    upstream backend {
        server 0.0.0.1;
        balancer_by_lua_block { autoscale.balance("backend") }
        keepalive 8;
    }
    upstream flaky {
        server 0.0.0.1;
        balancer_by_lua_block { autoscale.balance("flaky") }
    }
    log_format trace '$autoscale_peer|$autoscale_attempt|$autoscale_cost|$autoscale_trace|$upstream_addr';
_EOC_

our $Init = <<'_EOC_';
    init_by_lua_block {
        autoscale = require "resty.autoscale"
        autoscale.configure { upstreams = {
            backend = { peers = { "127.0.0.1:$TEST_NGINX_RAND_PORT_1", "127.0.0.1:$TEST_NGINX_RAND_PORT_2" } },
            flaky = { peers = { "127.0.0.1:$TEST_NGINX_RAND_PORT_3", "127.0.0.1:$TEST_NGINX_RAND_PORT_1",
                                "127.0.0.1:$TEST_NGINX_RAND_PORT_2" },
                      balancer = "round_robin", outlier = false },
        } }
        TRACE
    }
    init_worker_by_lua_block { autoscale.init_worker() }
_EOC_

sub init { with_trace($::Init, shift) }

our $Config = trace_variables() . <<'_EOC_';
    location /p {
        proxy_pass http://backend;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        add_header X-Autoscale-Peer $autoscale_trace always;
        access_log logs/trace.log trace;
        log_by_lua_block { autoscale.log() }
    }
    location /f {
        proxy_pass http://flaky;
        proxy_next_upstream error timeout;
        add_header X-Autoscale-Peer $autoscale_trace always;
        access_log logs/trace.log trace;
        log_by_lua_block { autoscale.log() }
    }
_EOC_

our $Helpers = <<'_EOC_';
    local t = require "autoscale_test"
    local port = ngx.var.server_port
    -- the access log lines written so far, split at "|"
    local function lines(n)
        local path = ngx.config.prefix() .. "logs/trace.log"
        local out = {}
        t.poll(function() -- the log phase of the last request may still be running
            out = {}
            local f = io.open(path)
            for line in (f and f:lines() or function() end) do
                local fields = {}
                for field in (line .. "|"):gmatch("([^|]*)|") do fields[#fields + 1] = field end
                out[#out + 1] = fields
            end
            if f then f:close() end
            return #out >= n
        end, 3)
        return out
    end
_EOC_

run_tests();

__DATA__

=== TEST 1: off by default: autoscale.balance is the untraced function and the variables stay empty
--- http_config eval: $::HttpConfig . ::init('')
--- config eval
$::Config . "location = /t { content_by_lua_block { $::Helpers " . <<'_EOC_';
    ngx.say("balance is the untraced function: ", autoscale.balance == require("resty.autoscale.balancer").balance)
    local code, body, headers = t.get(port, "/p")
    ngx.say(code, " header: [", tostring(headers["x-autoscale-peer"]), "]")
    local l = lines(1)[1]
    ngx.say("log: peer [", l[1], "] attempt [", l[2], "] cost [", l[3], "] trace [", l[4], "] upstream_addr set ", l[5] ~= "-")
} }
_EOC_
--- request
GET /t
--- response_body
balance is the untraced function: true
200 header: [nil]
log: peer [] attempt [] cost [] trace [] upstream_addr set true
--- no_error_log
[error]



=== TEST 2: on: the peer, attempt and cost of the choice, in log_format and in a response header
--- http_config eval: $::HttpConfig . ::init('autoscale.trace()')
--- config eval
$::Config . "location = /t { content_by_lua_block { $::Helpers " . <<'_EOC_';
    ngx.say("balance is traced: ", autoscale.balance ~= require("resty.autoscale.balancer").balance)
    local headers = {}
    for i = 1, 6 do
        local code, body, h = t.get(port, "/p")
        headers[i] = h["x-autoscale-peer"]
    end
    local ok_lines, costs = 0, 0
    for i, l in ipairs(lines(6)) do
        local peer, attempt, cost, trace, addr = l[1], l[2], l[3], l[4], l[5]
        if peer == addr and attempt == "1" and tonumber(cost) and tonumber(cost) > 0
           and trace == peer .. " attempt=1 cost=" .. cost and headers[i] == trace then
            ok_lines = ok_lines + 1
        else
            ngx.say("unexpected: ", table.concat(l, "|"), " header ", tostring(headers[i]))
        end
    end
    ngx.say("lines with peer = $upstream_addr, attempt 1, a cost, the same in the header: ", ok_lines)
} }
_EOC_
--- request
GET /t
--- response_body
balance is traced: true
lines with peer = $upstream_addr, attempt 1, a cost, the same in the header: 6
--- no_error_log
[error]



=== TEST 3: on, with retries: $autoscale_trace lists every attempt in order, as $upstream_addr does
--- http_config eval: $::HttpConfig . ::init('autoscale.trace()')
--- config eval
$::Config . "location = /t { content_by_lua_block { $::Helpers " . <<'_EOC_';
    local dead, live, other = "127.0.0.1:$TEST_NGINX_RAND_PORT_3", "127.0.0.1:$TEST_NGINX_RAND_PORT_1",
                              "127.0.0.1:$TEST_NGINX_RAND_PORT_2"
    for i = 1, 6 do
        local code = t.get(port, "/f")
        assert(code == 200, "status " .. tostring(code))
    end
    local retried, direct = 0, 0
    for _, l in ipairs(lines(6)) do
        local peer, attempt, trace, addr = l[1], l[2], l[4], l[5]
        local ok = peer == live or peer == other
        if ok and addr == dead .. ", " .. peer and attempt == "2" then
            local c1, c2 = trace:match("^" .. dead .. " attempt=1 cost=(%S+), " .. peer .. " attempt=2 cost=(%S+)$")
            ok = tonumber(c1) and tonumber(c2)
            retried = retried + (ok and 1 or 0)
        elseif ok and addr == peer and attempt == "1" then
            ok = trace:find("^" .. peer .. " attempt=1 cost=%S+$")
            direct = direct + (ok and 1 or 0)
        else
            ok = false
        end
        if not ok then
            ngx.say("unexpected: ", table.concat(l, "|"))
        end
    end
    ngx.say("consistent lines ", retried + direct, ", retried at least twice ", retried >= 2, ", direct at least once ", direct >= 1)
} }
_EOC_
--- request
GET /t
--- response_body
consistent lines 6, retried at least twice true, direct at least once true
--- error_log
connect() failed (111: Connection refused)



=== TEST 4: $autoscale_cost is the cost the choice was made on (nothing in flight yet), handed over by the pick
--- http_config eval: $::HttpConfig . ::init('autoscale.trace()')
--- config eval
$::Config . "location = /t { content_by_lua_block { $::Helpers " . <<'_EOC_';
    -- A new peer's cost is its seed estimate (default_rtt, 30 ms, decayed a little since configure) times
    -- (in flight + 1) / weight: about 30000 with nothing in flight; read after the pick, with its own attempt in
    -- flight, it would be twice that.
    local code = t.get(port, "/p")
    local cost = tonumber(lines(1)[1][3])
    local ok = cost and cost > 20000 and cost <= 30000
    ngx.say(code, ", cost of the first choice in (20000, 30000]: ", ok, ok and "" or " (" .. tostring(cost) .. ")")
} }
_EOC_
--- request
GET /t
--- response_body
200, cost of the first choice in (20000, 30000]: true
--- no_error_log
[error]



=== TEST 5: wrong use is a programming error
--- http_config eval: $::HttpConfig . ::init('local ok, err = pcall(autoscale.trace, { variables = { "peer", "why" } }) TRACE_ERR = err')
--- config eval
$::Config . <<'_EOC_';
    location = /t {
        content_by_lua_block {
            ngx.say(TRACE_ERR)
            ngx.say(select(2, pcall(autoscale.trace)))
            ngx.say(select(2, pcall(autoscale.trace, { header = true })))
        }
    }
_EOC_
--- request
GET /t
--- response_body
resty.autoscale.trace: unknown variable why (valid: peer, attempt, cost, trace)
resty.autoscale.trace must be enabled in init_by_lua* (called in content)
resty.autoscale.trace must be enabled in init_by_lua* (called in content)
--- no_error_log
[error]
