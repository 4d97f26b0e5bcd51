# vim:set ft= ts=4 sw=4 et:
# The shared region's fixed capacity at run time: when max_peers is reached, an admin add and a standby activation are
# refused with the reason, the peers already there keep serving and keep their statistics, and removing a peer frees
# its record for the next add; a DNS source naming too many peers gets those that fit, the rest once records free up; a reload that needs more upstreams than max_upstreams, or a different max_peers, is
# refused by the new configuration while the running one keeps serving; a new library is rolled out by a reload onto a
# new file name (docs/operations.md, "Changes and upgrades").

use lib 't';
use Autoscale;
use File::Copy ();
use File::Temp ();

workers(2);
master_on();

$ENV{AUTOSCALE_T_ADMIN_TOKEN} = 'capacity-test-token-0123456789';

# Two copies of the library under two names, standing in for two versions (TEST 3).
our $LibDir = File::Temp::tempdir('autoscale-lib-XXXXXX', TMPDIR => 1, CLEANUP => 1);
my $built = ($ENV{AUTOSCALE_LIB_DIR} || "$Autoscale::Repo/target/release") . '/libresty_autoscale.so';
for my $name (qw(libresty_autoscale-1.so libresty_autoscale-2.so)) {
    File::Copy::copy($built, "$LibDir/$name") or die "copy $built: $!\n";
    chmod 0755, "$LibDir/$name";
}
chmod 0777, $LibDir; # TEST 3 replaces a file there from a worker
$ENV{TEST_NGINX_LIB_DIR} = $LibDir;

# A gateway whose configuration takes what html/extra.lua returns (upstreams, max_peers, lib = 1 or 2, dns), so that a
# block can change it and reload.
our $ReloadConfig = <<'_EOC_';
    init_by_lua_block {
        autoscale = require "resty.autoscale"
        local extra = dofile("$TEST_NGINX_HTML_DIR/extra.lua")   -- what a block changes before each reload
        local ups = { api = { peers = { "127.0.0.1:$TEST_NGINX_RAND_PORT_1" } } }
        if extra.dns then -- peers from the SRV records of a DNS server on RAND_PORT_8 (TEST 4)
            ups.api.discovery = { keep_static = false, drain_timeout = 1,
                                  dns = { name = "_api._tcp.svc.test", type = "SRV", min_ttl = 0.2,
                                          nameservers = { "127.0.0.1:$TEST_NGINX_RAND_PORT_8" } } }
        end
        for k, v in pairs(extra.upstreams or {}) do ups[k] = v end
        autoscale.configure { max_peers = extra.max_peers or 3, max_upstreams = 1, upstreams = ups,
                              lib_path = extra.lib and "$TEST_NGINX_LIB_DIR/libresty_autoscale-" .. extra.lib .. ".so" }
    }
    init_worker_by_lua_block { autoscale.init_worker() }
    upstream api {
        server 0.0.0.1;
        balancer_by_lua_block { autoscale.balance("api") }
    }
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1;
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_2;
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_3;
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_4;
        location / { return 200 "$server_port\n"; }
    }
_EOC_
our $ReloadLocations = <<'_EOC_';
    location /api {
        proxy_pass http://api;
        log_by_lua_block { autoscale.log() }
    }
    location = /status { content_by_lua_block { autoscale.status_handler() } }
_EOC_

run_tests();

__DATA__

=== TEST 1: max_peers reached: an admin add gets 422 with the reason, a standby activation stops at the limit; nothing that served is lost, and a removed peer's record serves the next add
--- http_config
    init_by_lua_block {
        autoscale = require "resty.autoscale"
        autoscale.configure { max_peers = 3, max_upstreams = 1, upstreams = { api = {
            balancer = "round_robin", slow_start = 0,
            peers = { "127.0.0.1:$TEST_NGINX_RAND_PORT_1", "127.0.0.1:$TEST_NGINX_RAND_PORT_2" },
            discovery = { standby = { "127.0.0.1:$TEST_NGINX_RAND_PORT_3", "127.0.0.1:$TEST_NGINX_RAND_PORT_4" } },
        } } }
        autoscale.admin { token_env = "AUTOSCALE_T_ADMIN_TOKEN" }
    }
    init_worker_by_lua_block { autoscale.init_worker() }
    upstream api {
        server 0.0.0.1;
        balancer_by_lua_block { autoscale.balance("api") }
        keepalive 8;
    }
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1;
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_2;
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_3;
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_4;
        location / { return 200 "$server_port\n"; }
    }
--- config
    location /api {
        proxy_pass http://api;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        log_by_lua_block { autoscale.log() }
    }
    location /autoscale/admin { content_by_lua_block { autoscale.admin_handler() } }
    location = /t {
        content_by_lua_block {
            local t = require "autoscale_test"
            local cjson = require "cjson"
            local port = ngx.var.server_port
            local P = {}
            for i, p in ipairs { $TEST_NGINX_RAND_PORT_1, $TEST_NGINX_RAND_PORT_2, $TEST_NGINX_RAND_PORT_3,
                                 $TEST_NGINX_RAND_PORT_4 } do
                P["127.0.0.1:" .. p], P[tostring(p)] = "p" .. i, "p" .. i
            end
            local function admin(method, path, body)
                local status, text = t.request { port = port, method = method, path = "/autoscale/admin" .. path,
                    body = body, headers = { Authorization = "Bearer capacity-test-token-0123456789",
                                             ["Content-Type"] = "application/json" } }
                local ok, doc = pcall(cjson.decode, text or "")
                return status, ok and doc.error or text
            end
            local function serving()
                local st = autoscale.status("api")
                local out = {}
                for _, p in ipairs(st.peers) do out[#out + 1] = P[p.addr] .. " " .. p.state end
                table.sort(out)
                return table.concat(out, ", ")
            end
            local function traffic(n)
                local hits = {}
                for _ = 1, n do
                    local status, body = t.get(port, "/api")
                    local k = status == 200 and P[body:match("%d+")] or ("status " .. tostring(status))
                    hits[k] = (hits[k] or 0) + 1
                end
                local out = {}
                for k, v in pairs(hits) do out[#out + 1] = k .. " " .. v end
                table.sort(out)
                return table.concat(out, ", ")
            end
            ngx.say("start: ", serving(), "; region max_peers ", autoscale.status_all().region.max_peers)
            ngx.say("traffic: ", traffic(6))
            local n, err = autoscale.discovery.activate("api", 2)
            ngx.say("activate 2: ", tostring(n), " ", tostring(err))
            ngx.say("after: ", serving())
            -- p4, the standby peer the activation could not add, through the admin API
            local code, reason = admin("POST", "/upstreams/api/peers",
                                       cjson.encode { addr = "127.0.0.1:$TEST_NGINX_RAND_PORT_4" })
            ngx.say("admin add p4: ", code, " ", reason)
            ngx.say("after: ", serving())
            ngx.say("traffic: ", traffic(9))
            local before = t.peer(autoscale.status("api"), "127.0.0.1:$TEST_NGINX_RAND_PORT_1").totals.requests
            ngx.say("remove p3: ", (admin("DELETE", "/upstreams/api/peers/127.0.0.1:$TEST_NGINX_RAND_PORT_3")))
            ngx.say("admin add p4: ", (admin("POST", "/upstreams/api/peers",
                                             cjson.encode { addr = "127.0.0.1:$TEST_NGINX_RAND_PORT_4" })))
            ngx.say("after: ", serving())
            ngx.say("traffic: ", traffic(9))
            local p1
            t.poll(function() -- the log phase runs after the answer was sent
                p1 = t.peer(autoscale.status("api"), "127.0.0.1:$TEST_NGINX_RAND_PORT_1").totals.requests
                return p1 >= before + 3
            end, 5)
            ngx.say("p1 kept its statistics: ", p1 == before + 3, " (", before, " then ", p1, ")")
        }
    }
--- request
GET /t
--- response_body
start: p1 healthy, p2 healthy; region max_peers 3
traffic: p1 3, p2 3
activate 2: nil 4 peers configured in all but max_peers is 3
after: p1 healthy, p2 healthy, p3 healthy
admin add p4: 422 4 peers configured in all but max_peers is 3
after: p1 healthy, p2 healthy, p3 healthy
traffic: p1 3, p2 3, p3 3
remove p3: 200
admin add p4: 201
after: p1 healthy, p2 healthy, p4 healthy
traffic: p1 3, p2 3, p4 3
p1 kept its statistics: true (6 then 9)
--- no_error_log
[error]



=== TEST 2: a reload that needs more upstreams than max_upstreams, or another max_peers, is refused with the reason; the running configuration keeps serving, and a restart-free reload within the limits still works
--- user_files
>>> extra.lua
return {}
--- http_config eval: $::ReloadConfig
--- config eval
$::ReloadLocations . <<'_EOC_';
    location = /t {
        content_by_lua_block {
            local t = require "autoscale_test"
            local port = ngx.var.server_port
            local logf = assert(io.open(ngx.config.prefix() .. "logs/error.log"))
            logf:seek("end")
            local function reload(extra, want)
                t.reload("$TEST_NGINX_HTML_DIR/extra.lua", "return " .. extra .. "\n")
                local found
                t.poll(function()
                    for line in logf:lines() do
                        if line:find(want, 1, true) then
                            found = line:match("(init_by_lua error.*)$") or line:match("(reconfiguring)")
                            return true
                        end
                    end
                end, 10)
                return found
            end
            local epoch = t.status(port).region.config_epoch
            local function reason(line) return (line:gsub("^.-resty%.autoscale: ", "")) end
            ngx.say(reason(reload('{ upstreams = { web = { peers = { "127.0.0.1:1" } } } }', "max_upstreams is 1")))
            ngx.say(reason(reload('{ max_peers = 8 }', "a reload cannot")))
            local status, body = t.get(port, "/api")
            ngx.say("still serving: ", status, ", config epoch unchanged: ", t.status(port).region.config_epoch == epoch)
            reload('{}', "reconfiguring")
            ngx.say("a reload within the limits: ",
                    t.poll(function() return t.status(port).region.config_epoch > epoch end, 10))
        }
    }
_EOC_
--- request
GET /t
--- timeout: 30
--- response_body
2 upstreams configured but max_upstreams is 1
restart nginx to resize the shared region (a reload cannot): max_peers is 3 in the running region, 8 in the new configuration
still serving: 200, config epoch unchanged: true
a reload within the limits: true



=== TEST 3: a reload onto the library under a new name runs it with a new region while serving; a reload with the same name keeps the loaded copy and its statistics; status names the library and says when its file was replaced on disk
--- user_files
>>> extra.lua
return { lib = 1 }
--- http_config eval: $::ReloadConfig
--- config eval
$::ReloadLocations . <<'_EOC_';
    location = /state {
        content_by_lua_block {
            local f = assert(io.open("/proc/self/maps"))
            local libs, regions = {}, {}
            for line in f:lines() do
                local lib = line:match("libresty_autoscale%-(%d)%.so")
                if lib then libs[lib] = true end
                local from, to = line:match("^(%x+)%-(%x+) rw%-s .*/dev/zero")
                if from and tonumber(to, 16) - tonumber(from, 16) > 1e5 then -- not nginx's own one-page zones
                    regions[#regions + 1] = true
                end
            end
            f:close()
            local names = {}
            for k in pairs(libs) do names[#names + 1] = k end
            table.sort(names)
            local st, region = autoscale.status("api"), autoscale.status_all().region
            ngx.say("library ", table.concat(names, "+"), ", epoch ", region.config_epoch,
                    ", requests ", st.peers[1].totals.requests, ", regions mapped ", #regions,
                    ", status: ", region.library.path:match("[^/]+$"), " replaced ", tostring(region.library.replaced_on_disk))
        }
    }
    location = /t {
        content_by_lua_block {
            local t = require "autoscale_test"
            local port = ngx.var.server_port
            local function state() local _, body = t.get(port, "/state") return body or "" end
            local function requests() return tonumber(state():match("requests (%d+)")) end
            local function traffic(n)
                local ok = 0
                for _ = 1, n do if t.get(port, "/api") == 200 then ok = ok + 1 end end
                return ok
            end
            local function reload(which, want)
                t.reload("$TEST_NGINX_HTML_DIR/extra.lua", "return { lib = " .. which .. " }\n")
                -- serving all along: requests go on while the new generation starts
                local served, total = 0, 0
                local ok = t.poll(function()
                    total, served = total + 1, served + traffic(1)
                    return state():find(want, 1, true)
                end, 10)
                return ok and served == total
            end
            ngx.say("served ", traffic(5))
            t.poll(function() return requests() >= 5 end, 5) -- the log phase runs after the answer was sent
            ngx.print("before: ", state())
            ngx.say("reload with the same name, served throughout: ", reload(1, "epoch 2,"))
            local kept = requests()
            ngx.print("after: ", (state():gsub("requests %d+", "requests " .. (kept >= 5 and "kept" or kept))))
            local before = requests()
            ngx.say("reload onto the new name, served throughout: ", reload(2, "library 2,"))
            ngx.sleep(0.2) -- the log phase of the last request the poll sent
            local r0 = requests()
            ngx.say("served ", traffic(3))
            t.poll(function() return requests() >= r0 + 3 end, 5)
            local r1 = requests()
            ngx.print("after: ", state())
            ngx.say("statistics start over: ", r0 < before, ", and count: ", r1 - r0)
            -- a new file installed at the loaded path (as install(1) does: the old one removed, a new one created)
            local src = assert(io.open("$TEST_NGINX_LIB_DIR/libresty_autoscale-1.so", "rb"))
            local data = src:read("*a")
            src:close()
            assert(os.remove("$TEST_NGINX_LIB_DIR/libresty_autoscale-2.so"))
            local dst = assert(io.open("$TEST_NGINX_LIB_DIR/libresty_autoscale-2.so", "wb"))
            dst:write(data)
            dst:close()
            ngx.print("installed over: ", state())
        }
    }
_EOC_
--- request
GET /t
--- timeout: 30
--- response_body_like
^served 5
before: library 1, epoch 1, requests 5, regions mapped 1, status: libresty_autoscale-1.so replaced false
reload with the same name, served throughout: true
after: library 1, epoch 2, requests kept, regions mapped 1, status: libresty_autoscale-1.so replaced false
reload onto the new name, served throughout: true
served 3
after: library 2, epoch 1, requests \d+, regions mapped 2, status: libresty_autoscale-2.so replaced false
statistics start over: true, and count: 3
installed over: library 2, epoch 1, requests \d+, regions mapped 2, status: libresty_autoscale-2.so replaced true
--- no_error_log
[error]



=== TEST 4: a DNS source naming more peers than max_peers allows: the additions that fit are made, the others are logged once, every request is served, and once the seed has drained out the last one gets its record
--- skip_eval: 3: !grep { -x "$_/dnsmasq" } split /:/, "$ENV{PATH}:/usr/sbin:/sbin"
--- user_files
>>> extra.lua
return { dns = true }
--- http_config eval: $::ReloadConfig
--- config eval
$::ReloadLocations . <<'_EOC_';
    location = /t {
        content_by_lua_block {
            local t = require "autoscale_test"
            local process = require "autoscale_process"
            local port = ngx.var.server_port
            local dir = ngx.config.prefix() .. "logs/"
            local P = { ["$TEST_NGINX_RAND_PORT_1"] = "p1", ["$TEST_NGINX_RAND_PORT_2"] = "p2",
                        ["$TEST_NGINX_RAND_PORT_3"] = "p3", ["$TEST_NGINX_RAND_PORT_4"] = "p4" }
            local function serving()
                local out = {}
                for _, p in ipairs(autoscale.status("api").peers) do
                    if p.state ~= "draining" then out[#out + 1] = P[p.addr:match("%d+$")] end
                end
                table.sort(out)
                return table.concat(out, " ")
            end
            local conf = { "port=$TEST_NGINX_RAND_PORT_8", "listen-address=127.0.0.1", "bind-interfaces", "no-resolv",
                           "no-hosts", "keep-in-foreground", "user=root", "local-ttl=1", "pid-file=",
                           "host-record=b.svc.test,127.0.0.1" }
            for _, p in ipairs { $TEST_NGINX_RAND_PORT_2, $TEST_NGINX_RAND_PORT_3, $TEST_NGINX_RAND_PORT_4 } do
                conf[#conf + 1] = "srv-host=_api._tcp.svc.test,b.svc.test," .. p .. ",0,1"
            end
            process.write(dir .. "dnsmasq.conf", table.concat(conf, "\n") .. "\n")
            local dnsmasq = (io.open("/usr/sbin/dnsmasq") and "/usr/sbin/" or "") .. "dnsmasq"
            local dns = process.start(dnsmasq .. " -C " .. dir .. "dnsmasq.conf", dir .. "dnsmasq.log", 60)
            local ok, err = pcall(function()
                assert(t.poll(function() return process.listening($TEST_NGINX_RAND_PORT_8, "udp") end, 5),
                       "dnsmasq did not start: " .. process.read(dir .. "dnsmasq.log"))
                ngx.say("before: ", serving())
                local failed, requests = 0, 0
                local done = t.poll(function()
                    for _ = 1, 5 do
                        requests = requests + 1
                        if t.get(port, "/api") ~= 200 then failed = failed + 1 end
                    end
                    return serving() == "p2 p3 p4"
                end, 15)
                ngx.say("in the end: ", serving(), " (", done, "), requests failed: ", failed, " of more than 0: ",
                        requests > 0)
                local log = process.read(dir .. "error.log")
                local refused = {}
                for p, why in log:gmatch("discovery of api: cannot add 127%.0%.0%.1:(%d+): ([^,\n]+)") do
                    refused[#refused + 1] = P[p] .. " " .. why
                end
                ngx.say("refused, logged: ", #refused, " ", ((refused[1] or ""):gsub("^p%d", "p_")))
            end)
            dns:stop()
            if not ok then error(err) end
        }
    }
_EOC_
--- request
GET /t
--- timeout: 40
--- response_body
before: p1
in the end: p2 p3 p4 (true), requests failed: 0 of more than 0: true
refused, logged: 1 p_ 4 peers configured in all but max_peers is 3
