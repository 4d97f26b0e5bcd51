# vim:set ft= ts=4 sw=4 et:
# autoscale.balance() and autoscale.log() allocate no Lua memory per request once warm, traced or not (the garbage
# collector is stopped during the measurement so that a collection cannot hide an allocation).

use lib 't';
use Autoscale;

our $HttpConfig = <<'_EOC_';
    init_by_lua_block {
        autoscale = require "resty.autoscale"
        autoscale.configure { upstreams = { backend = { peers = {
            "127.0.0.1:$TEST_NGINX_RAND_PORT_1", "127.0.0.1:$TEST_NGINX_RAND_PORT_2" } } } }
        TRACE
        alloc = { on = false, bytes = 0, calls = 0 }
    }
    init_worker_by_lua_block { autoscale.init_worker() }
    upstream backend {
        server 0.0.0.1;
        balancer_by_lua_block {
            local a = alloc
            if a.on then
                local before = collectgarbage("count")
                autoscale.balance("backend")
                a.bytes = a.bytes + (collectgarbage("count") - before) * 1024
                a.calls = a.calls + 1
            else
                autoscale.balance("backend")
            end
        }
        keepalive 8;
    }
    server { listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1; location / { return 200 "a"; } }
    server { listen 127.0.0.1:$TEST_NGINX_RAND_PORT_2; location / { return 200 "b"; } }
_EOC_

our $Config = trace_variables() . <<'_EOC_';
    location /p {
        proxy_pass http://backend;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        log_by_lua_block {
            local a = alloc
            if a.on then
                local before = collectgarbage("count")
                autoscale.log()
                a.bytes = a.bytes + (collectgarbage("count") - before) * 1024
                a.calls = a.calls + 1
            else
                autoscale.log()
            end
        }
    }
    location = /t {
        content_by_lua_block {
            local t = require "autoscale_test"
            local port = ngx.var.server_port
            t.load { port = port, path = "/p", concurrency = 4, requests = 1000 }   -- warm up, JIT
            collectgarbage("stop")
            alloc.on = true
            local res = t.load { port = port, path = "/p", concurrency = 4, requests = 2000 }
            alloc.on = false
            collectgarbage("restart")
            ngx.say("errors ", res.errors, ", measured calls ", alloc.calls, ", bytes allocated ", alloc.bytes)
        }
    }
_EOC_

run_tests();

__DATA__

=== TEST 1: no Lua allocation in balance() and log()
--- http_config eval: ::with_trace($::HttpConfig, '')
--- config eval: $::Config
--- request
GET /t
--- timeout: 20
--- response_body
errors 0, measured calls 4000, bytes allocated 0
--- no_error_log
[error]



=== TEST 2: no Lua allocation in the traced balance() either (all four $autoscale_* variables set)
--- http_config eval: ::with_trace($::HttpConfig, 'autoscale.trace()')
--- config eval: $::Config
--- request
GET /t
--- timeout: 20
--- response_body
errors 0, measured calls 4000, bytes allocated 0
--- no_error_log
[error]
