# vim:set ft= ts=4 sw=4 et:
# resty.autoscale.http, the client of the background timers (webhook, Kubernetes, etcd, Prometheus), against a
# misbehaving server on loopback: one overall deadline for the whole exchange, every body capped by max_body, every
# header line and the header count bounded, and the worker's memory bounded whatever the server sends.

use lib 't';
use Autoscale;

# The misbehaving server: each location writes its answer on the raw connection, stops once the client has gone,
# and in any case after 32 MiB or 8 s (so that an unbounded client fails the test instead of filling the machine).
our $HttpConfig = <<'_EOC_';
    lua_socket_log_errors off;
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1;
        location / {
            content_by_lua_block {
                local sock = assert(ngx.req.socket(true))
                local block = string.rep("x", 65536)
                local what = ngx.var.uri
                ngx.update_time()
                local stop = ngx.now() + 8
                local function stream(head, piece, pause)
                    local ok = sock:send(head)
                    local sent = 0
                    while ok and sent < 32 * 1024 * 1024 do
                        ngx.update_time()
                        if ngx.now() > stop then
                            break
                        end
                        ok = sock:send(piece)
                        sent = sent + #piece
                        if pause then
                            ngx.sleep(pause)
                        end
                    end
                end
                local ok_head = "HTTP/1.1 200 OK\r\n"
                if what == "/huge" then -- announces 10 GB, then sends on and on
                    stream(ok_head .. "Content-Length: 10737418240\r\n\r\n", block)
                elseif what == "/chunked" then -- an endless chunked body
                    stream(ok_head .. "Transfer-Encoding: chunked\r\n\r\n", "10000\r\n" .. block .. "\r\n")
                elseif what == "/close" then -- no length, never closes
                    stream(ok_head .. "Connection: close\r\n\r\n", block)
                elseif what == "/dribble" then -- a byte every 0.5 s: each read is within its timeout
                    stream(ok_head .. "Content-Length: 100\r\n\r\n", "y", 0.5)
                elseif what == "/dribble-head" then -- the header itself, a byte every 0.5 s
                    stream(ok_head, "X", 0.5)
                elseif what == "/long-line" then -- a header line without end
                    stream(ok_head .. "X-Long: ", block)
                elseif what == "/many-headers" then -- header fields without end
                    stream(ok_head, string.rep("X-Field: value\r\n", 4096))
                elseif what == "/ok-length" then
                    sock:send(ok_head .. "Content-Length: 5\r\n\r\nhello")
                elseif what == "/ok-chunked" then
                    sock:send(ok_head .. "Transfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n"
                              .. "0\r\nX-Trailer: t\r\n\r\n")
                elseif what == "/ok-close" then
                    sock:send(ok_head .. "Connection: close\r\n\r\n" .. string.rep("z", 1000))
                end
            }
        }
    }
_EOC_

run_tests();

__DATA__

=== TEST 1: a misbehaving server gets a clear error within the deadline, and the worker's memory stays bounded
--- http_config eval: $::HttpConfig
--- config
    location = /t {
        content_by_lua_block {
            local http = require "resty.autoscale.http"
            local function peak_kib()
                local f = io.open("/proc/self/status")
                local kib = tonumber(f:read("*a"):match("VmHWM:%s*(%d+)"))
                f:close()
                return kib
            end
            local before = peak_kib()
            local function try(path, max_body, timeout)
                ngx.update_time()
                local t0 = ngx.now()
                local status, body = http.request { url = "http://127.0.0.1:$TEST_NGINX_RAND_PORT_1" .. path,
                                                    timeout = timeout or 2, max_body = max_body }
                ngx.update_time()
                local took = ngx.now() - t0
                local within = took <= (timeout or 2) + 0.5
                if status then
                    ngx.say(path, ": ", status, " ", #body, " bytes ", body:sub(1, 11), ", within the deadline: ",
                            within)
                else
                    ngx.say(path, ": ", body, ", within the deadline: ", within)
                end
            end
            try("/huge")
            try("/chunked")
            try("/close")
            try("/dribble")
            try("/dribble-head")
            try("/long-line")
            try("/many-headers")
            try("/ok-length")
            try("/ok-chunked")
            try("/ok-close")
            try("/ok-close", 1000)
            try("/ok-close", 999)
            try("/ok-chunked", 10)
            try("/ok-chunked", 11)
            local grown = peak_kib() - before
            ngx.say("peak memory grew by less than 16 MiB: ", grown < 16384, grown < 16384 and "" or " (" .. grown .. " KiB)")
        }
    }
--- request
GET /t
--- timeout: 40
--- response_body
/huge: body: response body over max_body (1048576 bytes), within the deadline: true
/chunked: body: response body over max_body (1048576 bytes), within the deadline: true
/close: body: response body over max_body (1048576 bytes), within the deadline: true
/dribble: body: deadline exceeded after 2 s, within the deadline: true
/dribble-head: headers: deadline exceeded after 2 s, within the deadline: true
/long-line: headers: line over 16384 bytes, within the deadline: true
/many-headers: headers: more than 100 lines, within the deadline: true
/ok-length: 200 5 bytes hello, within the deadline: true
/ok-chunked: 200 11 bytes hello world, within the deadline: true
/ok-close: 200 1000 bytes zzzzzzzzzzz, within the deadline: true
/ok-close: 200 1000 bytes zzzzzzzzzzz, within the deadline: true
/ok-close: body: response body over max_body (999 bytes), within the deadline: true
/ok-chunked: body: response body over max_body (10 bytes), within the deadline: true
/ok-chunked: 200 11 bytes hello world, within the deadline: true
peak memory grew by less than 16 MiB: true
--- no_error_log
[error]
