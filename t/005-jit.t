# vim:set ft= ts=4 sw=4 et:
# The request path (autoscale.balance in balancer_by_lua, autoscale.log in log_by_lua) is compiled by LuaJIT:
# traces start in resty/autoscale/balancer.lua (or, traced, in trace.lua) and none is aborted (no NYI, no fallback
# to the interpreter).

use lib 't';
use Autoscale;

our $HttpConfig = <<'_EOC_';
    init_by_lua_block {
        autoscale = require "resty.autoscale"
        autoscale.configure { upstreams = { backend = { peers = {
            "127.0.0.1:$TEST_NGINX_RAND_PORT_1", "127.0.0.1:$TEST_NGINX_RAND_PORT_2" } } } }
        TRACE
    }
    init_worker_by_lua_block {
        autoscale.init_worker()
        package.path = package.path .. ";/usr/share/luajit-2.1.0-beta3/?.lua"
        require("jit.v").on(ngx.config.prefix() .. "logs/jit.log")
    }
    upstream backend {
        server 0.0.0.1;
        balancer_by_lua_block { autoscale.balance("backend") }
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
        log_by_lua_block { autoscale.log() }
    }
    location = /t {
        content_by_lua_block {
            local t = require "autoscale_test"
            local res = t.load { port = ngx.var.server_port, path = "/p", concurrency = 4, requests = 3000 }
            local f = assert(io.open(ngx.config.prefix() .. "logs/jit.log"))
            local log = f:read("*a")
            f:close()
            -- jit.v names files by their base name only: find where balance() and log() start in our source
            -- (and the traced balance, returned by trace.enable). log() may be compiled inside the trace of its
            -- public wrapper in autoscale.lua.
            local starts = {}
            for module, file in pairs { ["resty.autoscale.balancer"] = "balancer.lua", ["resty.autoscale"] = "autoscale.lua",
                                        ["resty.autoscale.trace"] = "trace.lua" } do
                local src = assert(io.open(package.searchpath(module, package.path))):read("*a")
                local n = 0
                for line in src:gmatch("([^\n]*)\n") do
                    n = n + 1
                    local fn = line:match("^function _M%.(%a+)%(")
                    if fn == "balance" or fn == "log" then
                        starts[file .. ":" .. n] = fn
                    elseif line:find("^    return function%(name%)") then
                        starts[file .. ":" .. n] = "traced balance"
                    end
                end
            end
            local compiled, aborted = {}, {}
            for line in log:gmatch("[^\n]+") do
                local at = line:match("^%[TRACE%s+%d+ (%a+%.lua:%d+)")
                if at and starts[at] then
                    compiled[starts[at]] = true
                end
                if line:find("TRACE ---", 1, true) and (line:find("balancer.lua", 1, true) or line:find("autoscale.lua", 1, true)
                                                         or line:find("trace.lua", 1, true)) then
                    aborted[#aborted + 1] = line
                end
            end
            -- traced, balance() may get a trace of its own or be compiled inside the traced balance's trace (JIT
            -- heuristics): either way it is compiled, and aborted traces are what would show an NYI
            if compiled["traced balance"] then compiled.balance = nil end
            local names = {}
            for fn in pairs(compiled) do names[#names + 1] = fn end
            table.sort(names)
            ngx.say("errors ", res.errors)
            ngx.say("compiled: ", table.concat(names, ", "))
            ngx.say("aborted: ", table.concat(aborted, " | "))
        }
    }
_EOC_

run_tests();

__DATA__

=== TEST 1: balance and log are JIT-compiled, with no trace aborts
--- http_config eval: ::with_trace($::HttpConfig, '')
--- config eval: $::Config
--- request
GET /t
--- timeout: 20
--- response_body
errors 0
compiled: balance, log
aborted: 
--- no_error_log
[error]



=== TEST 2: with autoscale.trace() on, the traced balance is JIT-compiled too, with no trace aborts
--- http_config eval: ::with_trace($::HttpConfig, 'autoscale.trace()')
--- config eval: $::Config
--- request
GET /t
--- timeout: 20
--- response_body
errors 0
compiled: log, traced balance
aborted: 
--- no_error_log
[error]
