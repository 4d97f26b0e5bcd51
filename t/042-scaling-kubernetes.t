# vim:set ft= ts=4 sw=4 et:
# The Kubernetes actuator against a strict fake API server (tools/fake_k8s_api.py) over TLS with a CA made here by
# openssl: GET then merge-PATCH of deployments/<name>/scale with the bearer token; a failed PATCH is retried; a token
# the server refuses is not retried and counts as a failure.
# Port of the fake API server: API_PORT (a random free one in 26400-26599).

use lib 't';
use Autoscale;
require './t/lib/scaling_ports.pl';
scaling_ports('API');
use File::Temp ();

workers(1);
worker_connections(1024);
master_on();

our %Have = map { my $tool = $_; ($tool => scalar grep { -x "$_/$tool" } split /:/, $ENV{PATH}) } qw(openssl python3);

# A CA, a server certificate for kubernetes.default.svc signed by it, and a token file, made before nginx starts
# (lua_ssl_trusted_certificate and the actuator's ca_file are read at start).
our $Dir = File::Temp::tempdir("autoscale-k8s-XXXXXX", TMPDIR => 1, CLEANUP => 1);
chmod 0755, $Dir;
if ($Have{openssl}) {
    open my $ext, '>', "$Dir/san.ext" or die; print $ext "subjectAltName=DNS:kubernetes.default.svc\n"; close $ext;
    for my $cmd (
        "openssl req -x509 -newkey rsa:2048 -nodes -keyout $Dir/ca.key -out $Dir/ca.crt -days 1 -subj /CN=test-ca",
        "openssl req -newkey rsa:2048 -nodes -keyout $Dir/srv.key -out $Dir/srv.csr -subj /CN=kubernetes",
        "openssl x509 -req -in $Dir/srv.csr -CA $Dir/ca.crt -CAkey $Dir/ca.key -CAcreateserial -out $Dir/srv.crt -days 1 -extfile $Dir/san.ext",
    ) {
        system("$cmd >/dev/null 2>&1") == 0 or die "failed: $cmd\n";
    }
    open my $tok, '>', "$Dir/token" or die; print $tok "test-token-" . int(rand(1e9)) . "\n"; close $tok;
    chmod 0644, map { "$Dir/$_" } qw(ca.crt srv.crt srv.key token);
}
$ENV{TEST_NGINX_K8S_DIR} = $Dir;

our $HttpConfig = <<'_EOC_';
    lua_shared_dict autoscale_scaling 1m;
    lua_ssl_trusted_certificate $TEST_NGINX_K8S_DIR/ca.crt;
    lua_ssl_verify_depth 2;
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1;
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_2;
        location / { content_by_lua_block { ngx.sleep(0.05) ngx.say("ok") } }
    }
    init_by_lua_block {
        autoscale = require "resty.autoscale"
        autoscale.configure { upstreams = {
            api = { peers = { "127.0.0.1:$TEST_NGINX_RAND_PORT_1", "127.0.0.1:$TEST_NGINX_RAND_PORT_2" },
                scaling = { min = 2, max = 3, -- one step up: a load that keeps growing cannot add a second action
                 utilization = { capacity = 4, target = 0.75 }, provision_timeout = 30,
                    actuator = { type = "kubernetes", api = "https://127.0.0.1:$TEST_NGINX_API_PORT", namespace = "shop", name = "api",
                                 token_file = "$TEST_NGINX_K8S_DIR/token", ca_file = "$TEST_NGINX_K8S_DIR/ca.crt",
                                 retries = 2, backoff = 0.1 } } },
        } }
    }
    init_worker_by_lua_block { autoscale.init_worker() }
    upstream api { server 0.0.0.1; balancer_by_lua_block { autoscale.balance("api") } }
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_5;
        location = /scaling { content_by_lua_block { autoscale.scaling_handler() } }
        location / { proxy_pass http://api; log_by_lua_block { autoscale.log() } }
    }
_EOC_

our $Helpers = <<'_EOC_';
    local t = require "autoscale_test"
    local process = require "autoscale_process"
    local cjson = require "cjson"
    local gw = $TEST_NGINX_RAND_PORT_5
    local dir = ngx.config.prefix() .. "logs/"
    local k8s = "$TEST_NGINX_K8S_DIR/"
    local api
    local function start_api(extra)
        api = process.start("python3 $TEST_NGINX_REPO/tools/fake_k8s_api.py --port $TEST_NGINX_API_PORT --cert " .. k8s .. "srv.crt --key "
                            .. k8s .. "srv.key --object deployments/shop/api=2 " .. extra, dir .. "k8s.log", 60)
        assert(t.poll(function() return process.listening($TEST_NGINX_API_PORT) end, 5), "fake API server did not start")
    end
    local function fetch(path) -- the fake's test endpoints, over TLS checked against the test CA
        local http = require "resty.autoscale.http"
        local status, body = http.request { url = "https://127.0.0.1:$TEST_NGINX_API_PORT" .. path, server_name = "kubernetes.default.svc" }
        assert(status == 200, "fake API server: " .. tostring(status) .. " " .. tostring(body))
        return cjson.decode(body)
    end
    local function token()
        return (process.read(k8s .. "token"):gsub("%s+$", ""))
    end
_EOC_

run_tests();

__DATA__

=== TEST 1: a burst scales the Deployment: GET scale, PATCH (refused once with 500, retried), replicas set
--- skip_eval: 3: !$::Have{openssl} || !$::Have{python3}
--- http_config eval: $::HttpConfig
--- config eval
"location = /t { content_by_lua_block { $::Helpers " . <<'_EOC_';
    start_api("--token " .. token() .. " --fail-patch 1")
    local ok, err = pcall(function()
        local r = t.load { port = gw, path = "/", concurrency = 16, duration = 1.5 }
        t.poll(function() return fetch("/__test/objects")["deployments/shop/api"] > 2 end, 4)
        local reqs = fetch("/__test/requests")
        local seq, authorized, patches = {}, true, {}
        for _, q in ipairs(reqs) do
            seq[#seq + 1] = q.method .. " " .. q.answer
            authorized = authorized and q.authorization == "Bearer " .. token()
            if q.method == "PATCH" then patches[#patches + 1] = q end
        end
        local st = cjson.decode((select(2, t.get(gw, "/scaling?service=api"))))
        ngx.say("client errors: ", r.errors)
        ngx.say("path: ", reqs[1].path)
        ngx.say("requests: ", table.concat(seq, ", ", 1, math.min(#seq, 4)))
        ngx.say("all with the bearer token: ", authorized, ", PATCH content type: ", patches[1].content_type,
                ", body: ", patches[2].body)
        ngx.say("replicas now: ", fetch("/__test/objects")["deployments/shop/api"], " = desired: ", st.desired,
                ", actuator failures: ", st.actuator_failures)
    end)
    api:stop()
    assert(ok, err)
} }
_EOC_
--- request
GET /t
--- timeout: 20
--- response_body_like
client errors: 0
path: /apis/apps/v1/namespaces/shop/deployments/api/scale
requests: GET 200, PATCH 500, GET 200, PATCH 200
all with the bearer token: true, PATCH content type: application/merge-patch\+json, body: \{"spec":\{"replicas":(\d+)\}\}
replicas now: \1 = desired: \1, actuator failures: 0
--- no_error_log
[error]



=== TEST 2: a token the API server refuses: 401, not retried, counted as a failure, nothing changed
--- skip_eval: 3: !$::Have{openssl} || !$::Have{python3}
--- http_config eval: $::HttpConfig
--- config eval
"location = /t { content_by_lua_block { $::Helpers " . <<'_EOC_';
    start_api("--token another-token")
    local ok, err = pcall(function()
        local r = t.load { port = gw, path = "/", concurrency = 16, duration = 1.5 }
        local st
        t.poll(function()
            st = cjson.decode((select(2, t.get(gw, "/scaling?service=api"))))
            return st.actuator_failures > 0
        end, 4)
        local reqs = fetch("/__test/requests")
        ngx.say("client errors: ", r.errors, ", actuator failures: ", st.actuator_failures, ", requests: ", #reqs,
                " ", reqs[1].method, " ", reqs[1].answer, ", replicas: ", fetch("/__test/objects")["deployments/shop/api"])
    end)
    api:stop()
    assert(ok, err)
} }
_EOC_
--- request
GET /t
--- timeout: 20
--- response_body
client errors: 0, actuator failures: 1, requests: 1 GET 401, replicas: 2
--- error_log
GET scale answered 401
