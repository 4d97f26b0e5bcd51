use lib 't';
use Autoscale;

# Tests of the test scaffold itself (t/Autoscale.pm and the bundled runner),
# with nothing but nginx and lua-nginx-module.

repeat_each(2);

# A block with "--- test_workers: N" runs with a master and N workers; every
# other block with the default single process (master_process off).
add_block_preprocessor(sub {
    my $block = shift;
    if (defined $block->test_workers) {
        master_on();
        workers($block->test_workers);
    } else {
        master_off();
        workers(1);
    }
});

$ENV{RUNNER_ENV_MARKER} = 'from perl';
env_to_nginx('RUNNER_ENV_MARKER');

plan tests => repeat_each() * 52;

run_tests();

__DATA__

=== TEST 1: content_by_lua echo
--- config
    location = /t {
        content_by_lua_block {
            ngx.say("hello, ", ngx.var.arg_name)
        }
    }
--- request
GET /t?name=world
--- response_body
hello, world
--- no_error_log
[error]



=== TEST 2: plain "return 200"
--- config
    location = /t {
        return 200 "plain\n";
    }
--- request
GET /t
--- error_code: 200
--- response_body
plain



=== TEST 3: error_code 404 from the default root location
--- config
    location = /t {
        return 200;
    }
--- request
GET /no-such-file.html
--- error_code: 404
--- response_body_like: 404 Not Found
--- error_log
No such file or directory



=== TEST 4: response_body_like with eval qr//
--- config
    location = /t {
        content_by_lua_block {
            ngx.say("pid ", ngx.worker.pid())
        }
    }
--- request
GET /t
--- response_body_like eval
qr/\Apid \d+\n\z/



=== TEST 5: POST body, more_headers, response_headers
--- config
    location = /t {
        content_by_lua_block {
            ngx.req.read_body()
            ngx.header["X-Echo"] = ngx.var.http_x_foo
            ngx.say(ngx.req.get_method(), " ", ngx.req.get_body_data())
        }
    }
--- request
POST /t
hello body
--- more_headers
X-Foo: bar
--- response_headers
X-Echo: bar
!X-Absent
--- response_body
POST hello body



=== TEST 6: error_log (strings and regexes) and no_error_log
--- config
    location = /t {
        content_by_lua_block {
            ngx.log(ngx.WARN, "runner-warn-marker")
            ngx.log(ngx.ERR, "runner-err-marker 42")
            ngx.say("logged")
        }
    }
--- request
GET /t
--- response_body
logged
--- error_log eval
["runner-warn-marker", qr/\[error\] .*runner-err-marker \d+/]
--- no_error_log
never-logged-marker
[alert]



=== TEST 7: grep_error_log
--- config
    location = /t {
        content_by_lua_block {
            for i = 1, 3 do
                ngx.log(ngx.INFO, "grep-me: ", i)
            end
            ngx.say("ok")
        }
    }
--- request
GET /t
--- grep_error_log eval
qr/grep-me: \d+/
--- grep_error_log_out
grep-me: 1
grep-me: 2
grep-me: 3



=== TEST 8: must_die with an unknown directive
--- config
    location = /t {
        no_such_directive_here on;
    }
--- must_die
--- error_log
[emerg]
unknown directive "no_such_directive_here"



=== TEST 9: master_on + workers(2) gives two worker processes
--- test_workers: 2
--- http_config
    lua_shared_dict runner_pids 1m;
    init_worker_by_lua_block {
        ngx.shared.runner_pids:set(tostring(ngx.worker.pid()), true)
    }
--- config
    location = /t {
        content_by_lua_block {
            local pids = ngx.shared.runner_pids
            for _ = 1, 300 do
                if #pids:get_keys() >= 2 then break end
                ngx.sleep(0.01)
            end
            local function ppid(pid)
                local f = io.open("/proc/" .. pid .. "/stat")
                if not f then return "gone" end
                local stat = f:read("*a")
                f:close()
                return stat:match("^%d+ %(.-%) %a (%d+)")
            end
            local keys, masters, nmasters = pids:get_keys(), {}, 0
            for _, pid in ipairs(keys) do
                local parent = ppid(pid)
                if not masters[parent] then
                    masters[parent] = true
                    nmasters = nmasters + 1
                end
            end
            ngx.say("workers: ", #keys, ", masters: ", nmasters,
                    ", count: ", ngx.worker.count(),
                    ", self listed: ", pids:get(tostring(ngx.worker.pid())))
        }
    }
--- request
GET /t
--- response_body
workers: 2, masters: 1, count: 2, self listed: true
--- no_error_log
[error]



=== TEST 10: the default is a single process
--- config
    location = /t {
        content_by_lua_block {
            ngx.say("count: ", ngx.worker.count())
        }
    }
--- request
GET /t
--- response_body
count: 1



=== TEST 11: $TEST_NGINX_RAND_PORT_1 as a second server, proxied to
--- http_config
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1;
        location / {
            return 200 "backend on $server_port\n";
        }
    }
--- config
    location = /t {
        proxy_pass http://127.0.0.1:$TEST_NGINX_RAND_PORT_1/x;
    }
--- request
GET /t
--- response_body_like: ^backend on (?!1984\n)\d+\n$



=== TEST 12: several requests, one connection each
--- config
    location = /a {
        return 200 "A\n";
    }
    location = /b {
        return 201 "B\n";
    }
--- request eval
["GET /a", "GET /b"]
--- error_code eval
[200, 201]
--- response_body eval
["A\n", "B\n"]



=== TEST 13: user_files under $TEST_NGINX_HTML_DIR
--- user_files
>>> data/hello.txt
hello from a user file
--- config
    location = /t {
        alias $TEST_NGINX_HTML_DIR/data/hello.txt;
    }
--- request
GET /t
--- response_body
hello from a user file



=== TEST 14: log_level per block
--- log_level: warn
--- config
    location = /t {
        content_by_lua_block {
            ngx.log(ngx.INFO, "quiet-info-marker")
            ngx.log(ngx.WARN, "loud-warn-marker")
            ngx.say("ok")
        }
    }
--- request
GET /t
--- error_log
loud-warn-marker
--- no_error_log
quiet-info-marker
[debug]



=== TEST 15: wait, for what a timer logs after the response
--- config
    location = /t {
        content_by_lua_block {
            ngx.timer.at(0.01, function(premature)
                ngx.log(ngx.WARN, "timer fired, premature: ", premature)
            end)
            ngx.say("ok")
        }
    }
--- request
GET /t
--- wait: 0.3
--- error_log
timer fired, premature: false



=== TEST 16: skip_nginx skips the block's tests
--- skip_nginx: 2: > 1.0.0
--- config
    location = /t {
        return 200 "real\n";
    }
--- request
GET /t
--- error_code: 500
--- response_body
never checked



=== TEST 17: project defaults in http_config, env substitution
--- config
    location = /t {
        content_by_lua_block {
            local path = package.path
            ngx.say(path:find("$TEST_NGINX_REPO/lua/?.lua;", 1, true) and "lua path" or path)
            ngx.say(package.cpath:find("/lib?.so;", 1, true) and "cpath" or package.cpath)
            ngx.say(("$TEST_NGINX_SERVER_ROOT" .. "/html" == "$TEST_NGINX_HTML_DIR") and "dirs" or "?")
        }
    }
--- request
GET /t
--- response_body
lua path
cpath
dirs



=== TEST 18: a block's own lua_package_path still reaches the project (";;")
--- http_config
    lua_package_path "/nonexistent/?.lua;;";
--- config
    location = /t {
        content_by_lua_block {
            local path = package.path
            ngx.say(path:find("/nonexistent/?.lua;", 1, true) == 1 and "own path first" or path)
            ngx.say(path:find("$TEST_NGINX_REPO/lua/?.lua;", 1, true) and "lua path" or path)
        }
    }
--- request
GET /t
--- response_body
own path first
lua path



=== TEST 19: no_autoscale_defaults, main_config, env_to_nginx
--- no_autoscale_defaults
--- main_config
    env RUNNER_MAIN_CONFIG=seen;
--- http_config
    lua_package_path "/nonexistent/?.lua;;";
--- config
    location = /t {
        content_by_lua_block {
            ngx.say(package.path:find("$TEST_NGINX_REPO", 1, true) and "repo" or "no repo")
            ngx.say(os.getenv("RUNNER_MAIN_CONFIG"))
            ngx.say(os.getenv("RUNNER_ENV_MARKER"))
        }
    }
--- request
GET /t
--- response_body
no repo
seen
from perl
