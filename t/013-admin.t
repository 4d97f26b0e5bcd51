# vim:set ft= ts=4 sw=4 et:
# The admin HTTP API: every bad request gets its 4xx with a JSON reason and changes nothing (the whole state is
# byte-identical before and after); no token, a wrong token or a client outside the allow list is refused; good
# requests reach both workers and are logged with who made them; the token compare is constant-time; status shows
# the tunables in force, read from shared memory.

use lib 't';
use Autoscale;

workers(2);
master_on();

$ENV{AUTOSCALE_ADMIN_TOKEN} = 'test-admin-token-0123456789abcdef';
$ENV{AUTOSCALE_SHORT_TOKEN} = 'short';

# Backends on ports 1-3 answer with their port; the gateway (port 5, reuseport: the kernel spreads connections over
# both workers) adds the answering worker's pid; the admin API is on port 6.
our $HttpConfig = <<'_EOC_';
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1;
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_2;
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_3;
        location / { content_by_lua_block { ngx.say(ngx.var.server_port) } }
    }
    init_by_lua_block {
        autoscale = require "resty.autoscale"
        autoscale.configure { upstreams = {
            backend = { balancer = "round_robin", slow_start = 0, peers = {
                "127.0.0.1:$TEST_NGINX_RAND_PORT_1", "127.0.0.1:$TEST_NGINX_RAND_PORT_2" } },
            single = { peers = { "127.0.0.1:$TEST_NGINX_RAND_PORT_3" }, outlier = { consecutive_5xx = 7 } },
        } }
        autoscale.admin { token_env = "AUTOSCALE_ADMIN_TOKEN", name = "ops", max_body = 256 }
    }
    init_worker_by_lua_block { autoscale.init_worker() }
    upstream backend {
        server 0.0.0.1;
        balancer_by_lua_block { autoscale.balance("backend") }
        keepalive 8;
    }
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_5 reuseport;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            add_header X-Worker $pid always;
            log_by_lua_block { autoscale.log() }
        }
        location = /status {
            add_header X-Worker $pid always;
            content_by_lua_block { autoscale.status_handler() }
        }
        location = /metrics { content_by_lua_block { autoscale.prometheus_handler() } }
    }
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_6;
        location /autoscale/admin { content_by_lua_block { autoscale.admin_handler() } }
    }
_EOC_

# Helpers of the test handlers: an admin request, and the whole state in a canonical text (sorted keys) so that
# "nothing changed" is a byte comparison.
our $Helpers = <<'_EOC_';
    local t = require "autoscale_test"
    local cjson = require "cjson.safe"
    local TOKEN = "test-admin-token-0123456789abcdef"
    local ADMIN = $TEST_NGINX_RAND_PORT_6
    local P1, P2, P3 = "127.0.0.1:$TEST_NGINX_RAND_PORT_1", "127.0.0.1:$TEST_NGINX_RAND_PORT_2", "127.0.0.1:$TEST_NGINX_RAND_PORT_3"

    local function api(method, path, body, headers, opts)
        headers = headers or { Authorization = "Bearer " .. TOKEN }
        if (body or method == "POST") and headers["Content-Type"] == nil and headers.Authorization then
            headers["Content-Type"] = "application/json"
        end
        local req = { port = ADMIN, method = method, path = "/autoscale/admin" .. path, headers = headers, body = body }
        for k, v in pairs(opts or {}) do req[k] = v end
        local status, text, h = t.request(req)
        return status, text and cjson.decode(text), h, text
    end

    local function canonical(v)
        if type(v) ~= "table" then
            return cjson.encode(v)
        end
        local keys = {}
        for k in pairs(v) do keys[#keys + 1] = k end
        table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
        local out = {}
        for _, k in ipairs(keys) do out[#out + 1] = tostring(k) .. "=" .. canonical(v[k]) end
        return "{" .. table.concat(out, ",") .. "}"
    end

    -- upstreams, peers, weights, states, tunables in force, configuration epoch, number of events
    local function state()
        local all = autoscale.status_all()
        local ups = {}
        for name, u in pairs(all.upstreams) do
            local peers = {}
            for i, p in ipairs(u.peers) do peers[i] = { addr = p.addr, weight = p.weight, state = p.state } end
            ups[name] = { peers = peers, config = u.config, balancer = u.balancer, retries = u.retries,
                          healthy = u.healthy, ejected = u.ejected, draining = u.draining, panic = u.panic }
        end
        return canonical { upstreams = ups, epoch = all.region.config_epoch, events = #autoscale.events(1000) }
    end
_EOC_

run_tests();

__DATA__

=== TEST 1: 57 bad requests: each its 4xx and a JSON reason, and the whole state byte-identical afterwards
--- http_config eval: $::HttpConfig
--- config eval
"location = /t { content_by_lua_block { $::Helpers" . <<'_EOC_'
            local big = '{"addr":"127.0.0.1:9","weight":1,"pad":"' .. string.rep("x", 300) .. '"}'
            local json = { ["Content-Type"] = "application/json", Authorization = "Bearer " .. TOKEN }
            local function with(h) local o = {} for k, v in pairs(json) do o[k] = v end for k, v in pairs(h) do o[k] = v end return o end
            local B = "/upstreams/backend"
            -- method, path, body, headers | expected status, words of the reason, expected header
            local cases = {
                { "GET", "/status", nil, {}, 401, "Bearer token is required", { "WWW-Authenticate", 'Bearer realm="autoscale"' } },
                { "POST", B .. "/peers", '{"addr":"127.0.0.1:9"}', { ["Content-Type"] = "application/json" }, 401, "Bearer token is required" },
                { "GET", "/status", nil, { Authorization = "Bearer wrong" }, 401, "invalid token", { "WWW-Authenticate", 'error="invalid_token"' } },
                { "GET", "/status", nil, { Authorization = "Bearer " .. TOKEN .. "x" }, 401, "invalid token" },
                { "GET", "/status", nil, { Authorization = "Bearer " .. TOKEN:sub(1, -2) }, 401, "invalid token" },
                { "GET", "/status", nil, { Authorization = "Basic " .. ngx.encode_base64("ops:" .. TOKEN) }, 401, "Bearer token is required" },
                { "GET", "/status", nil, { Authorization = TOKEN }, 401, "Bearer token is required" },
                { "GET", "/nope", nil, nil, 404, "no such route: /nope" },
                { "GET", "", nil, nil, 404, "no such route" },
                { "GET", B .. "/peers/" .. P1 .. "/colour", nil, nil, 404, "no such route" },
                { "DELETE", B, nil, nil, 405, "method DELETE not allowed", { "Allow", "GET, PATCH" } },
                { "PUT", B .. "/peers", nil, nil, 405, "method PUT not allowed", { "Allow", "GET, POST" } },
                { "GET", B .. "/peers/" .. P1 .. "/drain", nil, nil, 405, "method GET not allowed", { "Allow", "POST" } },
                { "POST", "/status", nil, nil, 405, "not allowed", { "Allow", "GET" } },
                { "POST", B .. "/peers", '{"addr":"127.0.0.1:9"}', with { ["Content-Type"] = "text/plain" }, 415, "must be application/json" },
                { "POST", B .. "/peers", 'addr=127.0.0.1:9', with { ["Content-Type"] = "application/x-www-form-urlencoded" }, 415, "must be application/json" },
                { "POST", B .. "/peers", big, json, 413, "body larger than 256 bytes" },
                { "POST", B .. "/peers", string.format("%x\r\n%s\r\n0\r\n\r\n", #big, big), with { ["Transfer-Encoding"] = "chunked" }, 413, "body larger than 256 bytes" },
                { "POST", B .. "/peers", '{"addr":', json, 400, "malformed JSON" },
                { "POST", B .. "/peers", '[1, 2]', json, 400, "must be a JSON object" },
                { "POST", B .. "/peers", '"127.0.0.1:9"', json, 400, "must be a JSON object" },
                { "POST", B .. "/peers", '{"addr":"127.0.0.1:9","weight":NaN}', json, 400, "malformed JSON" },
                { "POST", B .. "/peers", nil, json, 422, "addr: required" },
                { "POST", "/upstreams/nope/peers", '{"addr":"127.0.0.1:9"}', json, 404, "unknown upstream nope" },
                { "POST", B .. "/peers", '{"addr":"backend:80"}', json, 422, "host must be an IPv4 address" },
                { "POST", B .. "/peers", '{"addr":"' .. P1 .. '"}', json, 409, "is already in this upstream" },
                { "POST", B .. "/peers", '{"addr":"127.0.0.1:99999"}', json, 422, "port out of range" },
                { "POST", B .. "/peers", '{"addr":"127.0.0.1:9","weight":0}', json, 422, "weight must be an integer between 1 and 10000" },
                { "POST", B .. "/peers", '{"addr":"127.0.0.1:9","weight":1.5}', json, 422, "weight must be an integer" },
                { "POST", B .. "/peers", '{"addr":"127.0.0.1:9","weight":"2"}', json, 422, 'weight: must be a number (got "2")' },
                { "POST", B .. "/peers", '{"addr":"127.0.0.1:9","weight":null}', json, 422, "weight: must be a number (got null)" },
                { "POST", B .. "/peers", '{"addr":42}', json, 422, "addr: must be a string (got 42)" },
                { "POST", B .. "/peers", '{"addr":"127.0.0.1:9","colour":"red"}', json, 422, "colour: unknown field (valid: addr, weight)" },
                { "PUT", B .. "/peers/127.0.0.1:9/weight", '{"weight":2}', json, 404, "is not in this upstream" },
                { "PUT", B .. "/peers/" .. P1 .. "/weight", '{"weight":10001}', json, 422, "between 1 and 10000" },
                { "PUT", B .. "/peers/" .. P1 .. "/weight", '{"weight":1e400}', json, 422, "between 1 and 10000" },
                { "PUT", B .. "/peers/" .. P1 .. "/weight", '{}', json, 422, "weight: required" },
                { "DELETE", B .. "/peers/127.0.0.1:9", nil, nil, 404, "is not in this upstream" },
                { "DELETE", "/upstreams/single/peers/" .. P3, nil, nil, 409, "cannot lose its last peer" },
                { "POST", B .. "/peers/127.0.0.1:9/drain", nil, nil, 404, "is not in this upstream" },
                { "POST", B .. "/peers/" .. P1 .. "/drain", '{"now":true}', json, 422, "now: unknown field (valid: none)" },
                { "PATCH", B, '{"retries":-1}', json, 422, "retries: must be between 0 and 100 (got -1)" },
                { "PATCH", B, '{"balancer":"fastest"}', json, 422, "balancer: must be \"peak_ewma\"" },
                { "PATCH", B, '{"retries":"2"}', json, 422, 'retries: must be a number (got string "2")' },
                { "PATCH", B, '{"retries":null}', json, 422, 'retries: must not be null' },
                { "PATCH", B, '{}', json, 422, "the body must name at least one option" },
                { "PATCH", B, '{"colour":"red"}', json, 422, "colour: unknown option (valid: admission, balancer," },
                { "PATCH", B, '{"peers":[]}', json, 422, "peers: use add_peer/remove_peer" },
                { "PATCH", B, '{"healthcheck":{"path":"/h"}}', json, 422, "healthcheck: cannot be changed at run time" },
                { "PATCH", B, '{"scaling":{"rps":{"target":5}}}', json, 422, "scaling: cannot be changed at run time" },
                { "PATCH", B, '{"admission":{"queue":1}}', json, 422, "admission: cannot be changed at run time" },
                { "PATCH", B, '{"outlier":{"consecutive_5xx":3,"nope":1}}', json, 422, "outlier.nope: unknown option" },
                { "PATCH", B, '{"outlier":"off"}', json, 422, "outlier: must be an object or false" },
                { "PATCH", B, '{"ewma_decay":0}', json, 422, "ewma_decay: must be between 0.001 and 3600 (got 0)" },
                { "PATCH", "/upstreams/nope", '{"retries":1}', json, 404, "unknown upstream nope" },
                { "GET", "/upstreams/nope", nil, nil, 404, "unknown upstream nope" },
                { "GET", B, '{"x":1}', json, 422, "this request takes no body" },
            }
            local before = state()
            local failed = 0
            for i, c in ipairs(cases) do
                local status, body, headers, raw = api(c[1], c[2], c[3], c[4])
                local why
                if status ~= c[5] then
                    why = "status " .. tostring(status) .. " (want " .. c[5] .. ")"
                elseif type(body) ~= "table" or type(body.error) ~= "string" or not body.error:find(c[6], 1, true) then
                    why = "reason " .. tostring(raw)
                elseif c[7] and (headers[c[7][1]:lower()] or ""):find(c[7][2], 1, true) == nil then
                    why = c[7][1] .. ": " .. tostring(headers[c[7][1]:lower()])
                elseif (headers["content-type"] or "") ~= "application/json" then
                    why = "content type " .. tostring(headers["content-type"])
                elseif state() ~= before then
                    why = "the state changed"
                end
                if why then
                    failed = failed + 1
                    ngx.say("case ", i, " (", c[1], " ", c[2], "): ", why, "  body: ", tostring(raw))
                end
            end
            ngx.say(#cases, " bad requests, ", failed, " not refused as expected; state byte-identical: ", state() == before)
        }
    }
_EOC_
--- request
GET /t
--- timeout: 30
--- response_body
57 bad requests, 0 not refused as expected; state byte-identical: true
--- no_error_log
[error]
resty.autoscale admin: backend:



=== TEST 2: good requests take effect in both workers and are logged with who made them
--- http_config eval: $::HttpConfig
--- config eval
"location = /t { content_by_lua_block { $::Helpers" . <<'_EOC_'
            local B = "/upstreams/backend"
            local gw = $TEST_NGINX_RAND_PORT_5
            local ports = { [P1 .. "\n"] = "p1", [P2 .. "\n"] = "p2", [P3 .. "\n"] = "p3" }
            -- 240 requests through the gateway: requests per backend, and how many workers served them
            local function spread()
                local res = t.load { port = gw, path = "/", concurrency = 4, requests = 240, key = function(_, body, h)
                    return (ports["127.0.0.1:" .. body] or "?") .. " " .. h["x-worker"]
                end }
                local per, workers = { p1 = 0, p2 = 0, p3 = 0 }, {}
                for k, n in pairs(res.by_key) do
                    local p, pid = k:match("^(%S+) (%d+)$")
                    per[p] = (per[p] or 0) + n
                    workers[pid] = true
                end
                local nw = 0
                for _ in pairs(workers) do nw = nw + 1 end
                return string.format("p1 %d p2 %d p3 %d, errors %d, workers %d", per.p1, per.p2, per.p3, res.errors, nw)
            end
            local function say(what, status, body)
                ngx.say(what, ": ", status, body and body.error and (" " .. body.error) or "")
            end

            say("add p3 weight 2", api("POST", B .. "/peers", cjson.encode { addr = P3, weight = 2 }))
            ngx.say("  ", spread())
            say("weight p3 1", api("PUT", B .. "/peers/" .. P3 .. "/weight", '{"weight":1}'))
            local status, body = api("POST", B .. "/peers/" .. P1 .. "/drain")
            ngx.say("drain p1: ", status, " changed ", body.changed)
            status, body = api("POST", B .. "/peers/" .. P1 .. "/drain")
            ngx.say("drain p1 again: ", status, " changed ", body.changed)
            ngx.say("  ", spread())
            say("enable p1", api("POST", B .. "/peers/" .. P1 .. "/enable", "{}"))
            say("remove p2", api("DELETE", B .. "/peers/" .. P2))
            ngx.say("  ", spread())
            status, body = api("PATCH", B, '{"balancer":"random","outlier":{"consecutive_5xx":9}}')
            ngx.say("patch: ", status, " ", body.upstream.config.balancer, " ", body.upstream.config.retries,
                    " ", body.upstream.config.outlier.consecutive_5xx, " ", body.upstream.config.outlier.consecutive_timeouts)
            status, body = api("PATCH", B, '{"retries":0}')
            ngx.say("patch again keeps the first: ", status, " ", body.upstream.config.balancer, " ",
                    body.upstream.config.retries, " ", body.upstream.config.outlier.consecutive_5xx)
            status, body = api("GET", B)
            ngx.say("read: ", status, " ", body.name, " ", #body.peers, " peers, balancer ", body.balancer)
            status, body = api("GET", "/upstreams")
            ngx.say("list: ", status, " ", body.upstreams.backend.name, " ", body.upstreams.single.name)
            status, body = api("GET", B .. "/peers/" .. P3)
            ngx.say("peer: ", status, " ", body.addr == P3, " weight ", body.weight)
            local kinds = {}
            status, body = api("GET", "/events")
            for _, e in ipairs(body.events) do kinds[#kinds + 1] = e.event end
            ngx.say(table.concat(kinds, " "))
            -- the totals per kind, in Prometheus (from shared memory, whatever worker answers)
            local _, metrics = t.get(gw, "/metrics")
            ngx.print((metrics:gsub("[^\n]*\n", function(line)
                return line:find("^autoscale_events_total{") and line or ""
            end)))
            -- the library's own cost: 720 requests through the gateway, one call in 64 per worker timed
            for _, phase in ipairs { "balancer", "log" } do
                local sum = tonumber(metrics:match('autoscale_library_call_seconds_sum{phase="' .. phase .. '"} (%S+)'))
                local count = tonumber(metrics:match('autoscale_library_call_seconds_count{phase="' .. phase .. '"} (%S+)'))
                ngx.say(phase, " calls timed >= 8: ", count >= 8, ", mean between 0 and 1 ms: ", sum > 0 and sum / count < 0.001)
            end
        }
    }
_EOC_
--- request
GET /t
--- timeout: 30
--- response_body
add p3 weight 2: 201
  p1 60 p2 60 p3 120, errors 0, workers 2
weight p3 1: 200
drain p1: 200 changed true
drain p1 again: 200 changed false
  p1 0 p2 120 p3 120, errors 0, workers 2
enable p1: 200
remove p2: 200
  p1 120 p2 0 p3 120, errors 0, workers 2
patch: 200 random 2 9 3
patch again keeps the first: 200 random 0 9
read: 200 backend 2 peers, balancer random
list: 200 backend single
peer: 200 true weight 1
config config peer_added config weight draining enabled config peer_removed config tuned config tuned
autoscale_events_total{kind="activated"} 0
autoscale_events_total{kind="activating"} 0
autoscale_events_total{kind="activation_failed"} 0
autoscale_events_total{kind="config"} 6
autoscale_events_total{kind="dependency_down"} 0
autoscale_events_total{kind="dependency_up"} 0
autoscale_events_total{kind="draining"} 1
autoscale_events_total{kind="ejected"} 0
autoscale_events_total{kind="ejection_skipped"} 0
autoscale_events_total{kind="enabled"} 1
autoscale_events_total{kind="fallback"} 0
autoscale_events_total{kind="half_open"} 0
autoscale_events_total{kind="healthy"} 0
autoscale_events_total{kind="panic_off"} 0
autoscale_events_total{kind="panic_on"} 0
autoscale_events_total{kind="peer_added"} 1
autoscale_events_total{kind="peer_removed"} 1
autoscale_events_total{kind="rate_relaxed"} 0
autoscale_events_total{kind="rate_tightened"} 0
autoscale_events_total{kind="scale_down"} 0
autoscale_events_total{kind="scale_up"} 0
autoscale_events_total{kind="tuned"} 2
autoscale_events_total{kind="weight"} 1
balancer calls timed >= 8: true, mean between 0 and 1 ms: true
log calls timed >= 8: true, mean between 0 and 1 ms: true
--- error_log eval
[
qr/resty\.autoscale admin: backend: added peer 127\.0\.0\.1:\d+ weight 2 \(POST \/autoscale\/admin\/upstreams\/backend\/peers by client=127\.0\.0\.1 token=ops request_id=[0-9a-f]{32}\)/,
qr/resty\.autoscale admin: backend: drained 127\.0\.0\.1:\d+ \(POST .* by client=127\.0\.0\.1 token=ops request_id=[0-9a-f]{32}\)/,
qr/resty\.autoscale admin: backend: removed peer 127\.0\.0\.1:\d+ \(DELETE .* token=ops/,
qr/resty\.autoscale admin: backend: tuned \{.*"retries":0.*token=ops/,
qr/\[notice\].*resty\.autoscale event: .*"event":"peer_added"/,
]
--- no_error_log
[error]



=== TEST 3: outside the allow list refused (403); an allowed address and a unix socket served, the token from a file
--- user_files
>>> admin.token
  file-token-abcdefghijklmnopqrstuvwxyz
--- http_config
    init_by_lua_block {
        autoscale = require "resty.autoscale"
        autoscale.configure { upstreams = { backend = { peers = { "127.0.0.1:$TEST_NGINX_RAND_PORT_1" } } } }
        autoscale.admin { token_file = "$TEST_NGINX_HTML_DIR/admin.token", allow = { "127.0.0.2", "10.0.0.0/8", "::1", "unix:" },
                          prefix = "/ops" }
    }
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_6;
        listen unix:$TEST_NGINX_HTML_DIR/admin.sock;
        client_body_buffer_size 1k; # larger bodies go to a file
        location /ops { content_by_lua_block { autoscale.admin_handler() } }
    }
--- config
    location = /t {
        content_by_lua_block {
            local t = require "autoscale_test"
            local h = { Authorization = "Bearer file-token-abcdefghijklmnopqrstuvwxyz" }
            local function get(path, bind, unix)
                local status, body = t.request { port = $TEST_NGINX_RAND_PORT_6, path = path, headers = h, bind = bind, unix = unix }
                return status, (body or ""):gsub("\n$", "")
            end
            local st, body = get("/ops/upstreams/backend")
            ngx.say("from 127.0.0.1: ", st, " ", require("cjson").decode(body).error)
            st, body = get("/ops/upstreams/backend", "127.0.0.2")
            ngx.say("from 127.0.0.2: ", st, " ", require("cjson").decode(body).name)
            st, body = get("/ops/upstreams/backend", nil, "$TEST_NGINX_HTML_DIR/admin.sock")
            ngx.say("from a unix socket: ", st, " ", require("cjson").decode(body).name)
            -- a 3 KB body is read from nginx's temporary file
            st, body = t.request { port = $TEST_NGINX_RAND_PORT_6, method = "POST", path = "/ops/upstreams/backend/peers",
                headers = { Authorization = h.Authorization, ["Content-Type"] = "application/json" }, bind = "127.0.0.2",
                body = '{"addr":"127.0.0.1:9","pad":"' .. string.rep("x", 3000) .. '"}' }
            ngx.say("3 KB body: ", st, " ", require("cjson").decode(body).error)
            h.Authorization = "Bearer test-admin-token-0123456789abcdef"
            st = get("/ops/upstreams/backend", "127.0.0.2")
            ngx.say("another token: ", st)
        }
    }
--- request
GET /t
--- response_body
from 127.0.0.1: 403 client address 127.0.0.1 is not in admin.allow
from 127.0.0.2: 200 backend
from a unix socket: 200 backend
3 KB body: 422 pad: unknown field (valid: addr, weight)
another token: 401
--- error_log
refused GET /ops/upstreams/backend from 127.0.0.1: 403 client address 127.0.0.1 is not in admin.allow
--- no_error_log
[error]



=== TEST 10: the connection's own address counts: with set_real_ip_from, X-Forwarded-For: 127.0.0.2 from 127.0.0.1 is refused
--- http_config
    init_by_lua_block {
        autoscale = require "resty.autoscale"
        autoscale.configure { upstreams = { backend = { peers = { "127.0.0.1:$TEST_NGINX_RAND_PORT_1" } } } }
        autoscale.admin { token_env = "AUTOSCALE_ADMIN_TOKEN", allow = { "127.0.0.2" } }
    }
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_6;
        set_real_ip_from 127.0.0.0/8;
        real_ip_header X-Forwarded-For;
        location /autoscale/admin { content_by_lua_block { autoscale.admin_handler() } }
    }
--- config
    location = /t {
        content_by_lua_block {
            local t = require "autoscale_test"
            local epoch = autoscale.status_all().region.config_epoch
            local function post(bind, xff)
                local status, body = t.request { port = $TEST_NGINX_RAND_PORT_6, method = "POST", bind = bind,
                    path = "/autoscale/admin/upstreams/backend/peers", body = '{"addr":"127.0.0.1:9"}',
                    headers = { Authorization = "Bearer test-admin-token-0123456789abcdef",
                                ["Content-Type"] = "application/json", ["X-Forwarded-For"] = xff } }
                return status .. " " .. tostring(require("cjson").decode(body).error)
            end
            ngx.say("forged X-Forwarded-For: ", post(nil, "127.0.0.2"))
            ngx.say("unchanged: ", autoscale.status_all().region.config_epoch == epoch)
            ngx.say("from 127.0.0.2 itself: ", post("127.0.0.2", "10.1.1.1"))
        }
    }
--- request
GET /t
--- response_body
forged X-Forwarded-For: 403 client address 127.0.0.1 is not in admin.allow
unchanged: true
from 127.0.0.2 itself: 201 nil
--- no_error_log
[error]



=== TEST 11: a browser's cross-site "simple" POST (a form or text/plain, no preflight) gets 415 and changes nothing
--- http_config eval: $::HttpConfig
--- config eval
"location = /t { content_by_lua_block { $::Helpers" . <<'_EOC_'
            local before = state()
            for _, ctype in ipairs { "application/x-www-form-urlencoded", "text/plain", "multipart/form-data; boundary=x" } do
                local st, body = api("POST", "/upstreams/backend/peers/" .. P1 .. "/drain", nil,
                                     { Authorization = "Bearer " .. TOKEN, ["Content-Type"] = ctype })
                ngx.say(ctype, ": ", st, " ", body.error)
            end
            ngx.say("state byte-identical: ", state() == before)
        }
    }
_EOC_
--- request
GET /t
--- response_body
application/x-www-form-urlencoded: 415 a change must be application/json (got Content-Type application/x-www-form-urlencoded)
text/plain: 415 a change must be application/json (got Content-Type text/plain)
multipart/form-data; boundary=x: 415 a change must be application/json (got Content-Type multipart/form-data; boundary=x)
state byte-identical: true
--- no_error_log
[error]



=== TEST 12: status, the dashboard's data and the admin API show no credentials (URL userinfo, token query parameters, secrets)
--- http_config
    lua_shared_dict autoscale_scaling 1m;
    init_by_lua_block {
        autoscale = require "resty.autoscale"
        autoscale.configure { upstreams = { backend = { peers = { "127.0.0.1:$TEST_NGINX_RAND_PORT_1" },
            scaling = { min = 1, max = 4, external = { url = "http://127.0.0.1:9/prom?access_token=pr0m-tok&x=1",
                                                       query = "up", target = 10, interval = 3600 },
                        actuator = { type = "webhook", url = "https://127.0.0.1:9/scale?token=h00k-tok",
                                     secret = "h00k-hmac-secret" } } } } }
        autoscale.admin { token_env = "AUTOSCALE_ADMIN_TOKEN" }
    }
    init_worker_by_lua_block { autoscale.init_worker() }
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_6;
        location /autoscale/admin { content_by_lua_block { autoscale.admin_handler() } }
        location = /status { content_by_lua_block { autoscale.status_handler() } }
        location = /dashboard { content_by_lua_block { autoscale.dashboard_handler() } }
    }
--- config
    location = /t {
        content_by_lua_block {
            local t = require "autoscale_test"
            local leaks = { "pr0m-tok", "h00k-tok", "h00k-hmac-secret", "test-admin-token" }
            for _, path in ipairs { "/status", "/status?upstream=backend", "/dashboard?format=json",
                                    "/autoscale/admin/upstreams/backend", "/autoscale/admin/status" } do
                local st, body = t.request { port = $TEST_NGINX_RAND_PORT_6, path = path,
                    headers = { Authorization = "Bearer test-admin-token-0123456789abcdef", Accept = "application/json" } }
                local found = {}
                for _, s in ipairs(leaks) do
                    if body and body:find(s, 1, true) then found[#found + 1] = s end
                end
                ngx.say(path, ": ", st, ", leaked: ", #found == 0 and "none" or table.concat(found, ","),
                        ", 127.0.0.1:9 shown: ", body and body:find("127.0.0.1:9", 1, true) ~= nil)
            end
            local redact = require "resty.autoscale.redact"
            ngx.say(redact.text("etcd http://root:pw@10.0.0.1:2379/v3?Password=x&ok=1 failed"))
            local v = redact.value { headers = { Authorization = "Bearer x" }, token_env = "T", n = 1 }
            ngx.say(v.headers.Authorization, " ", v.token_env, " ", v.n)
        }
    }
--- request
GET /t
--- response_body
/status: 200, leaked: none, 127.0.0.1:9 shown: true
/status?upstream=backend: 200, leaked: none, 127.0.0.1:9 shown: true
/dashboard?format=json: 200, leaked: none, 127.0.0.1:9 shown: true
/autoscale/admin/upstreams/backend: 200, leaked: none, 127.0.0.1:9 shown: true
/autoscale/admin/status: 200, leaked: none, 127.0.0.1:9 shown: true
etcd http://[redacted]@10.0.0.1:2379/v3?Password=[redacted]&ok=1 failed
[redacted] T 1
--- no_error_log
[error]



=== TEST 4: off unless configured
--- http_config
    init_by_lua_block {
        autoscale = require "resty.autoscale"
        autoscale.configure { upstreams = { backend = { peers = { "127.0.0.1:$TEST_NGINX_RAND_PORT_1" } } } }
    }
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_6;
        location /autoscale/admin { content_by_lua_block { autoscale.admin_handler() } }
    }
--- config
    location = /t {
        content_by_lua_block {
            local t = require "autoscale_test"
            local epoch = autoscale.status_all().region.config_epoch
            local status, body = t.request { port = $TEST_NGINX_RAND_PORT_6, method = "POST",
                path = "/autoscale/admin/upstreams/backend/peers", body = '{"addr":"127.0.0.1:9"}',
                headers = { Authorization = "Bearer anything-at-all-0123456789", ["Content-Type"] = "application/json" } }
            ngx.say(status, " ", require("cjson").decode(body).error)
            ngx.say("unchanged: ", autoscale.status_all().region.config_epoch == epoch)
        }
    }
--- request
GET /t
--- response_body
403 the admin API is off (enable it with autoscale.admin{...} in init_by_lua*)
unchanged: true
--- no_error_log
[error]



=== TEST 5: the token compare is constant-time: the same Lua VM instructions wherever the strings differ
--- http_config
    init_by_lua_block {
        autoscale = require "resty.autoscale"
        autoscale.configure { upstreams = { backend = { peers = { "127.0.0.1:1" } } } }
    }
--- config
    location = /t {
        content_by_lua_block {
            local admin = require "resty.autoscale.admin"
            local equal = admin.constant_time_equal
            local secret = "test-admin-token-0123456789abcdef"
            -- behaviour
            local cases = {
                { secret, true }, { "x" .. secret:sub(2), false }, { secret:sub(1, -2) .. "x", false },
                { secret:sub(1, -2), false }, { secret .. "x", false }, { "", false }, { secret:upper(), false },
                { string.rep("\0", #secret), false },
            }
            local wrong = 0
            for i, c in ipairs(cases) do
                if equal(c[1], secret) ~= c[2] or equal(secret, c[1]) ~= c[2] then
                    wrong = wrong + 1
                    ngx.say("case ", i, " wrong")
                end
            end
            ngx.say("behaviour: ", #cases - wrong, " of ", #cases, " right; empty equals empty: ", equal("", ""))
            -- Lua VM instructions executed per compare (hooks count in the interpreter, so the JIT is off here).
            -- A naive compare, which returns at the first difference, shows that the count can tell them apart.
            local function naive(a, b)
                if #a ~= #b then return false end
                for i = 1, #a do
                    if a:byte(i) ~= b:byte(i) then return false end
                end
                return true
            end
            jit.off()
            jit.flush()
            local function count(f, a, b)
                local n = 0
                debug.sethook(function() n = n + 1 end, "", 1)
                f(a, b)
                debug.sethook()
                return n
            end
            -- differing in the first byte, the 17th, the last, and in every byte
            local inputs = { "x" .. secret:sub(2), secret:sub(1, 16) .. "x" .. secret:sub(18), secret:sub(1, -2) .. "x",
                             string.rep("y", #secret) }
            local function counts(f)
                local out = {}
                for i, x in ipairs(inputs) do out[i] = count(f, x, secret) end
                return out
            end
            local c, n = counts(equal), counts(naive)
            ngx.say("constant_time_equal: ", (c[1] == c[2] and c[2] == c[3] and c[3] == c[4]) and "all equal" or table.concat(c, " "))
            ngx.say("naive compare: ", (n[1] == n[2] and n[2] == n[3] and n[3] == n[4]) and "all equal" or "they differ")
        }
    }
--- request
GET /t
--- response_body
behaviour: 8 of 8 right; empty equals empty: true
constant_time_equal: all equal
naive compare: they differ
--- no_error_log
[error]



=== TEST 6: status, status JSON, Prometheus and the admin API show the tunables in force, from shared memory, in every worker
--- http_config eval: $::HttpConfig
--- config eval
"location = /t { content_by_lua_block { $::Helpers" . <<'_EOC_'
            local config = require "resty.autoscale.config"
            -- Read back before any change, the tunables are what configure validated (a round trip through the C
            -- struct and shared memory).
            local want = config.validate { upstreams = {
                single = { peers = { P3 }, outlier = { consecutive_5xx = 7 } } } }.upstreams.single
            local got = autoscale.status("single").config
            local diff = {}
            for k, v in pairs(want) do
                if canonical(v) ~= canonical(got[k]) then diff[#diff + 1] = k .. " " .. canonical(v) .. " ~= " .. canonical(got[k]) end
            end
            ngx.say("round trip: ", #diff == 0 and "identical" or table.concat(diff, "; "))
            assert(autoscale.control.tune("backend", { retries = 1, ewma_decay = 2.5, failure_statuses = { "502-504" },
                                                      slow_peer_factor = 0 }))
            -- every worker answers the status JSON with the tunables in force
            local seen = {}
            assert(t.poll(function()
                local status, body, h = t.get($TEST_NGINX_RAND_PORT_5, "/status?upstream=backend")
                local u = cjson.decode(body)
                if u then
                    seen[h["x-worker"]] = u.retries .. " " .. u.config.ewma_decay .. " " .. table.concat(u.config.failure_statuses, ",")
                                          .. " " .. u.config.slow_peer_factor
                end
                local n = 0
                for _ in pairs(seen) do n = n + 1 end
                return n >= 2
            end, 10), "two workers answered")
            for _, v in pairs(seen) do ngx.say("worker: ", v) end
            local st, body = api("GET", "/upstreams/backend")
            ngx.say("admin: ", body.config.retries, " ", body.config.ewma_decay, " ", body.config.balancer)
            api("PATCH", "/upstreams/backend", '{"balancer":"random","outlier":{"consecutive_5xx":4}}')
            local _, metrics = t.get($TEST_NGINX_RAND_PORT_5, "/metrics")
            for line in metrics:gmatch("[^\n]+") do
                if line:find('upstream="backend"', 1, true) and (line:find("balancer_info", 1, true)
                   or line:find('option="retries"', 1, true) or line:find('option="ewma_decay"', 1, true)
                   or line:find('option="outlier.consecutive_5xx"', 1, true)) then
                    ngx.say(line)
                end
            end
        }
    }
_EOC_
--- request
GET /t
--- timeout: 20
--- response_body
round trip: identical
worker: 1 2.5 502,503,504 0
worker: 1 2.5 502,503,504 0
admin: 1 2.5 round_robin
autoscale_upstream_balancer_info{upstream="backend",balancer="random"} 1
autoscale_upstream_option{upstream="backend",option="retries"} 1
autoscale_upstream_option{upstream="backend",option="ewma_decay"} 2.5
autoscale_upstream_option{upstream="backend",option="outlier.consecutive_5xx"} 4
--- no_error_log
[error]



=== TEST 7: the token must be in the environment at start (else nginx does not start, naming the field)
--- http_config
    init_by_lua_block {
        autoscale = require "resty.autoscale"
        autoscale.configure { upstreams = { backend = { peers = { "127.0.0.1:1" } } } }
        autoscale.admin { token_env = "AUTOSCALE_NO_SUCH_TOKEN" }
    }
--- config
    location = /t { return 200; }
--- must_die
--- error_log
admin.token_env: environment variable AUTOSCALE_NO_SUCH_TOKEN is not set or empty in the environment nginx was started with



=== TEST 8: bad admin options stop nginx with the field path and the reason
--- http_config
    init_by_lua_block {
        local autoscale = require "resty.autoscale"
        autoscale.configure { upstreams = { backend = { peers = { "127.0.0.1:1" } } } }
        local cases = {
            { { token_env = "AUTOSCALE_ADMIN_TOKEN", allow = { "127.0.0.1/33" } }, "admin.allow[1]: prefix length must be at most 32 (got 127.0.0.1/33)" },
            { { token_env = "AUTOSCALE_ADMIN_TOKEN", allow = { "localhost" } }, "admin.allow[1]: must be an IPv4 or IPv6 address" },
            { { token_env = "AUTOSCALE_ADMIN_TOKEN", allow = { "::1", "fe80::1::2" } }, "admin.allow[2]: must be an IPv4 or IPv6" },
            { { token_env = "AUTOSCALE_ADMIN_TOKEN", alow = {} }, "admin.alow: unknown option (valid: allow, max_body, name, prefix, token_env, token_file)" },
            { { token_env = "AUTOSCALE_SHORT_TOKEN" }, "admin.token_env: the token must be at least 16 characters" },
            { { token_env = "AUTOSCALE_ADMIN_TOKEN", token_file = "/x" }, "admin.token_env: give exactly one of token_env" },
            { {}, "admin.token_env: give exactly one of token_env" },
            { { token_file = "/nonexistent/token" }, "admin.token_file: cannot read /nonexistent/token" },
            { { token_env = "AUTOSCALE_ADMIN_TOKEN", max_body = 10 }, "admin.max_body: must be an integer between 64 and 1048576 (got 10)" },
            { { token_env = "AUTOSCALE_ADMIN_TOKEN", prefix = "admin/" }, "admin.prefix: must be an absolute path" },
            { { token_env = "A B" }, "admin.token_env: must be the name of an environment variable" },
        }
        for i, c in ipairs(cases) do
            local ok, err = pcall(autoscale.admin, c[1])
            if ok or not tostring(err):find(c[2], 1, true) then
                error("case " .. i .. ": expected '" .. c[2] .. "', got '" .. tostring(err) .. "'")
            end
        end
        error("all " .. #cases .. " cases refused as expected")
    }
--- config
    location = /t { return 200; }
--- must_die
--- error_log
all 11 cases refused as expected



=== TEST 9: a reload reads token_file again and applies nginx.conf again: peers, weights and tunables changed at run time are gone; a drained peer stays drained (its state is kept with its statistics)
--- user_files
>>> admin.token
first-token-0123456789abcdef
--- http_config
    init_by_lua_block {
        autoscale = require "resty.autoscale"
        autoscale.configure { upstreams = { backend = { peers = { "127.0.0.1:$TEST_NGINX_RAND_PORT_1", "127.0.0.1:$TEST_NGINX_RAND_PORT_2" } } } }
        autoscale.admin { token_file = "$TEST_NGINX_HTML_DIR/admin.token" }
    }
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_6;
        location /autoscale/admin { content_by_lua_block { autoscale.admin_handler() } }
    }
--- config
    location = /t {
        content_by_lua_block {
            local t = require "autoscale_test"
            local cjson = require "cjson"
            local P1, P3 = "127.0.0.1:$TEST_NGINX_RAND_PORT_1", "127.0.0.1:$TEST_NGINX_RAND_PORT_3"
            local function api(token, method, path, body)
                local status, text = t.request { port = $TEST_NGINX_RAND_PORT_6, method = method or "GET",
                    path = "/autoscale/admin" .. (path or "/upstreams/backend"), body = body,
                    headers = { Authorization = "Bearer " .. token, ["Content-Type"] = "application/json" } }
                return status, text and cjson.decode(text)
            end
            local names = { [P1] = "p1", ["127.0.0.1:$TEST_NGINX_RAND_PORT_2"] = "p2", [P3] = "p3" }
            local function peers(st)
                local out = {}
                for _, p in ipairs(st.peers) do out[#out + 1] = names[p.addr] .. " " .. p.state .. " w" .. p.weight end
                table.sort(out)
                return table.concat(out, ", ")
            end
            local A, B = "first-token-0123456789abcdef", "second-token-0123456789abcdef"
            assert(api(A, "POST", "/upstreams/backend/peers", cjson.encode { addr = P3 }) == 201)
            assert(api(A, "POST", "/upstreams/backend/peers/" .. P1 .. "/drain") == 200)
            assert(api(A, "PUT", "/upstreams/backend/peers/" .. P1 .. "/weight", '{"weight":5}') == 200)
            assert(api(A, "PATCH", "/upstreams/backend", '{"retries":0}') == 200)
            local _, st = api(A)
            ngx.say("changed: ", peers(st), "; retries ", st.config.retries)
            local f = assert(io.open("$TEST_NGINX_HTML_DIR/admin.token", "w"))
            f:write(B, "\n")
            f:close()
            local pidf = assert(io.open(ngx.config.prefix() .. "logs/nginx.pid"))
            local master = tonumber(pidf:read("*l"))
            pidf:close()
            assert(os.execute("kill -HUP " .. master) == 0)
            local ok = t.poll(function() return api(B) == 200 end, 10)
            ngx.say("new token after the reload: ", ok, "; old token: ", (api(A)))
            _, st = api(B)
            ngx.say("after the reload: ", peers(st), "; retries ", st.config.retries)
        }
    }
--- request
GET /t
--- timeout: 20
--- response_body
changed: p1 draining w5, p2 healthy w1, p3 healthy w1; retries 0
new token after the reload: true; old token: 401
after the reload: p1 draining w1, p2 healthy w1; retries 2
--- no_error_log
[error]
