# vim:set ft= ts=4 sw=4 et:
# The Prometheus exposition: valid for promtool with several upstreams, an ejected peer and two workers; the same
# numbers from every worker; scraped by a real Prometheus server; 1,000 peers rendered in bounded time.

use lib 't';
use Autoscale;

workers(2);
master_on();

# promtool and prometheus come with the Debian package prometheus (make deps); without them those blocks are skipped.
our %Have = map { my $tool = $_; ($tool => scalar grep { -x "$_/$tool" } split /:/, $ENV{PATH}) } qw(promtool prometheus);
diag("$_ not found (Debian package prometheus): the blocks that need it are skipped") for grep { !$Have{$_} } sort keys %Have;

# Backends on ports 1-4; a port answers with the status stored under "status:<port>" (default 200).
# The gateway listens with reuseport on port 5, so the kernel spreads the load over both workers.
our $HttpConfig = <<'_EOC_';
    lua_shared_dict ctl 1m;
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1;
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_2;
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_3;
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_4;
        location / {
            content_by_lua_block {
                ngx.status = ngx.shared.ctl:get("status:" .. ngx.var.server_port) or 200
                ngx.say(ngx.var.server_port)
            }
        }
    }
    init_by_lua_block {
        autoscale = require "resty.autoscale"
        autoscale.configure { upstreams = {
            api = {
                peers = { "127.0.0.1:$TEST_NGINX_RAND_PORT_1", "127.0.0.1:$TEST_NGINX_RAND_PORT_2",
                          "127.0.0.1:$TEST_NGINX_RAND_PORT_3" },
                balancer = "round_robin", -- every third attempt goes to the failing peer until it is ejected
                outlier = { consecutive_5xx = 3, base_ejection_time = 60, max_ejection_percent = 50 },
            },
            web = { peers = { "127.0.0.1:$TEST_NGINX_RAND_PORT_1", { addr = "127.0.0.1:$TEST_NGINX_RAND_PORT_2", weight = 3 } } },
            idle = { peers = { "127.0.0.1:$TEST_NGINX_RAND_PORT_4" } },
        } }
    }
    init_worker_by_lua_block { autoscale.init_worker() }
    upstream api {
        server 0.0.0.1;
        balancer_by_lua_block { autoscale.balance("api") }
        keepalive 16;
    }
    upstream web {
        server 0.0.0.1;
        balancer_by_lua_block { autoscale.balance("web") }
        keepalive 16;
    }
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_5 reuseport;
        add_header X-Worker $pid always;
        location /api {
            proxy_pass http://api;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_next_upstream error timeout http_500;
            log_by_lua_block { autoscale.log() }
        }
        location /web {
            proxy_pass http://web;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            log_by_lua_block { autoscale.log() }
        }
        location = /metrics { content_by_lua_block { autoscale.prometheus_handler() } }
        location = /status { content_by_lua_block { autoscale.status_handler() } }
    }
_EOC_

# Lua helpers of the test handlers: metrics parsing, promtool, and background processes stopped by PID.
our $Helpers = <<'_EOC_';
    local t = require "autoscale_test"
    local cjson = require "cjson"
    local gw = $TEST_NGINX_RAND_PORT_5
    local dir = ngx.config.prefix() .. "logs/"

    local function sh(cmd) -- output and exit code of a shell command
        local f = assert(io.popen(cmd .. " 2>&1; echo \"rc=$?\""))
        local out = f:read("*a")
        f:close()
        local rc = tonumber(out:match("rc=(%d+)%s*$"))
        return out:gsub("rc=%d+%s*$", ""), rc
    end

    local function scrape()
        local code, body, headers = t.get(gw, "/metrics")
        assert(code == 200, "scrape: " .. tostring(code) .. " " .. tostring(body))
        return body, headers
    end

    -- samples["name{labels}"] = number, in the order of the exposition
    local function samples(text)
        local out = {}
        for line in text:gmatch("[^\n]+") do
            if line:sub(1, 1) ~= "#" then
                local key, value = line:match("^(%S+) (%S+)$")
                assert(key, "bad sample line: " .. line)
                out[key] = tonumber(value) or value
            end
        end
        return out
    end

    local function promtool(text)
        local path = dir .. "scrape.prom"
        local f = assert(io.open(path, "w"))
        f:write(text)
        f:close()
        return sh("promtool check metrics < " .. path)
    end

    local process = require "autoscale_process" -- background processes, stopped by PID
    local function free_port() -- a port in 26000-26999 nothing listens on
        for _ = 1, 100 do
            local port = math.random(26000, 26999)
            if not process.listening(port) then
                return port
            end
        end
        error("no free port in 26000-26999")
    end
_EOC_

run_tests();

__DATA__

=== TEST 1: promtool accepts a scrape with three upstreams, an ejected peer and traffic on both workers
--- skip_eval: 3: !$::Have{promtool}
--- http_config eval: $::HttpConfig
--- config eval
"location = /t { content_by_lua_block { $::Helpers " . <<'_EOC_';
    local bad = "127.0.0.1:$TEST_NGINX_RAND_PORT_3"
    ngx.shared.ctl:set("status:$TEST_NGINX_RAND_PORT_3", 500)
    local function worker(status, body, headers) return headers["x-worker"] end
    local api = t.load { port = gw, path = "/api", concurrency = 8, requests = 400, key = worker }
    local web = t.load { port = gw, path = "/web", concurrency = 4, requests = 100, key = worker }
    local workers = {}
    for pid in pairs(api.by_key) do workers[pid] = true end
    for pid in pairs(web.by_key) do workers[pid] = true end
    local nworkers = 0
    for _ in pairs(workers) do nworkers = nworkers + 1 end
    local st
    t.poll(function()
        st = cjson.decode((select(2, t.get(gw, "/status"))))
        return st.upstreams.web.peers[1].totals.requests + st.upstreams.web.peers[2].totals.requests == 100
    end, 5)

    local text, headers = scrape()
    local out, rc = promtool(text)
    local s = samples(text)
    local function v(name, labels) return s[name .. "{" .. labels .. "}"] end
    local api_bad = 'upstream="api",peer="' .. bad .. '"'
    local web_total = 0
    for key, value in pairs(s) do
        if key:find('^autoscale_peer_requests_total{upstream="web"') then web_total = web_total + value end
    end
    local idle_quantiles = 0
    for key in pairs(s) do
        if key:find('autoscale_peer_window_latency_seconds{upstream="idle"', 1, true) then idle_quantiles = idle_quantiles + 1 end
    end
    local families = select(2, text:gsub("# TYPE ", ""))
    ngx.say("content type: ", headers["content-type"])
    ngx.say("workers that served: ", nworkers, ", client errors: ", api.errors + web.errors)
    ngx.say("promtool: rc=", rc, " output=[", out, "]")
    ngx.say("ejected peer: state ", v("autoscale_peer_state", api_bad .. ',state="ejected"'),
            ", healthy ", v("autoscale_peer_state", api_bad .. ',state="healthy"'),
            ", ejected_peers ", v("autoscale_upstream_ejected_peers", 'upstream="api"'),
            ", ejections >= 1 ", v("autoscale_peer_ejections_total", api_bad) >= 1,
            ", http_5xx >= 3 ", v("autoscale_peer_failures_total", api_bad .. ',kind="http_5xx"') >= 3)
    ngx.say("web attempts ", web_total, ", healthy web peers ", v("autoscale_upstream_healthy_peers", 'upstream="web"'),
            ", panic ", v("autoscale_upstream_panic", 'upstream="api"'))
    ngx.say("idle: peers ", v("autoscale_upstream_peers", 'upstream="idle"'), ", quantile samples ", idle_quantiles,
            ", +Inf bucket ", v("autoscale_peer_latency_seconds_bucket", 'upstream="idle",peer="127.0.0.1:$TEST_NGINX_RAND_PORT_4",le="+Inf"'))
    ngx.say("weight ", v("autoscale_peer_weight", 'upstream="web",peer="127.0.0.1:$TEST_NGINX_RAND_PORT_2"'),
            ", families ", families)
} }
_EOC_
--- request
GET /t
--- timeout: 30
--- response_body
content type: text/plain; version=0.0.4; charset=utf-8
workers that served: 2, client errors: 0
promtool: rc=0 output=[]
ejected peer: state 1, healthy 0, ejected_peers 1, ejections >= 1 true, http_5xx >= 3 true
web attempts 100, healthy web peers 2, panic 0
idle: peers 1, quantile samples 0, +Inf bucket 0
weight 3, families 32
--- no_error_log
[error]



=== TEST 2: every worker renders the same numbers, and the latency sum and count agree with the status
--- http_config eval: $::HttpConfig
--- config eval
"location = /t { content_by_lua_block { $::Helpers " . <<'_EOC_';
    t.load { port = gw, path = "/web", concurrency = 4, requests = 200 }
    local st
    t.poll(function()
        st = cjson.decode((select(2, t.get(gw, "/status"))))
        return st.upstreams.web.peers[1].totals.requests + st.upstreams.web.peers[2].totals.requests == 200
    end, 5)
    local by_worker = {}
    local n = 0
    t.poll(function()
        local text, headers = scrape()
        local pid = headers["x-worker"]
        if not by_worker[pid] then -- the counters (gauges such as EWMA, slow start and window move with time)
            local counters = {}
            for line in text:gmatch("[^\n]+") do
                if line:find("_total{", 1, true) or line:find("_bucket{", 1, true) or line:find("_sum{", 1, true)
                   or line:find("_count{", 1, true) then
                    counters[#counters + 1] = line
                end
            end
            by_worker[pid] = table.concat(counters, "\n")
            n = n + 1
        end
        return n == 2
    end, 5)
    local a, b = next(by_worker)
    local _, c = next(by_worker, a)
    local s = samples(b)
    local ncounters = 0
    for _ in pairs(s) do ncounters = ncounters + 1 end
    ngx.say("scraped from 2 workers ", n == 2, ", identical counters ", b == c, ", more than 50 ", ncounters > 50)
    for _, p in ipairs(st.upstreams.web.peers) do
        local l = '{upstream="web",peer="' .. p.addr .. '"}'
        local sum = s["autoscale_peer_latency_seconds_sum" .. l]
        ngx.say(p.addr == "127.0.0.1:$TEST_NGINX_RAND_PORT_1" and "peer 1" or "peer 2",
                ": count = requests ", s["autoscale_peer_latency_seconds_count" .. l] == p.totals.requests,
                ", sum matches ", math.abs(sum - p.totals.latency_sum) < 1e-6,
                ", p99 >= p50 ", (s["autoscale_peer_window_latency_seconds" .. l:sub(1, -2) .. ',quantile="0.99"}'] or 0)
                                 >= (s["autoscale_peer_window_latency_seconds" .. l:sub(1, -2) .. ',quantile="0.5"}'] or 0))
        -- cumulative le buckets: every bound, never decreasing, +Inf = count, and on loopback all within 2.5 s (a
        -- connect whose SYN is retransmitted takes just over 1 s, so le=1 is no bound for every request)
        local last, nb, monotonic = 0, 0, true
        for _, le in ipairs { "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5",
                              "5", "10" } do
            local v = s["autoscale_peer_latency_seconds_bucket" .. l:sub(1, -2) .. ',le="' .. le .. '"}']
            if v then
                nb = nb + 1
                monotonic = monotonic and v >= last
                last = v
            end
        end
        local inf = s["autoscale_peer_latency_seconds_bucket" .. l:sub(1, -2) .. ',le="+Inf"}']
        ngx.say("  buckets ", nb, ", cumulative ", monotonic and last <= inf, ", +Inf = count ", inf == p.totals.requests,
                ", le=2.5 = count ", s["autoscale_peer_latency_seconds_bucket" .. l:sub(1, -2) .. ',le="2.5"}'] == inf)
    end
} }
_EOC_
--- request
GET /t
--- timeout: 30
--- response_body
scraped from 2 workers true, identical counters true, more than 50 true
peer 1: count = requests true, sum matches true, p99 >= p50 true
  buckets 13, cumulative true, +Inf = count true, le=2.5 = count true
peer 2: count = requests true, sum matches true, p99 >= p50 true
  buckets 13, cumulative true, +Inf = count true, le=2.5 = count true
--- no_error_log
[error]



=== TEST 3: a real Prometheus server scrapes the gateway and a query returns the number of requests sent
--- skip_eval: 3: !$::Have{prometheus}
--- http_config eval: $::HttpConfig
--- config eval
"location = /t { content_by_lua_block { $::Helpers " . <<'_EOC_';
    local res = t.load { port = gw, path = "/web", concurrency = 4, requests = 150 }
    local port = free_port()
    local data = dir .. "prometheus-data"
    local conf = dir .. "prometheus.yml"
    local f = assert(io.open(conf, "w"))
    f:write("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n",
            "scrape_configs:\n  - job_name: autoscale\n    metrics_path: /metrics\n",
            "    static_configs:\n      - targets: ['127.0.0.1:", gw, "']\n")
    f:close()
    local prom = process.start("prometheus --config.file=" .. conf .. " --storage.tsdb.path=" .. data
                               .. " --web.listen-address=127.0.0.1:" .. port, dir .. "prometheus.log", 120)
    local query = ngx.escape_uri('sum(autoscale_peer_requests_total{upstream="web"})')
    local value, up
    local ok, err = pcall(function()
        assert(t.poll(function() return process.listening(port) or not prom:alive() end, 20), "prometheus did not listen")
        t.poll(function()
            local code, body = t.get(port, "/api/v1/query?query=" .. query, 1000)
            local r = code == 200 and cjson.decode(body)
            value = r and r.data.result[1] and r.data.result[1].value[2]
            return value == "150" or not prom:alive()
        end, 40)
        local code, body = t.get(port, "/api/v1/query?query=" .. ngx.escape_uri('up{job="autoscale"}'), 1000)
        up = code == 200 and cjson.decode(body).data.result[1].value[2]
    end)
    local stopped = prom:stop()
    os.execute("rm -rf " .. data)
    if not ok or value ~= "150" then
        local log = io.open(dir .. "prometheus.log")
        ngx.log(ngx.WARN, "prometheus: ", err, "\n", log and log:read("*a"))
    end
    ngx.say("client errors ", res.errors)
    ngx.say("prometheus: sum(autoscale_peer_requests_total{upstream=\"web\"}) = ", value, ", up = ", up)
    ngx.say("prometheus stopped: ", stopped)
} }
_EOC_
--- request
GET /t
--- timeout: 70
--- response_body
client errors 0
prometheus: sum(autoscale_peer_requests_total{upstream="web"}) = 150, up = 1
prometheus stopped: true
--- no_error_log
[error]



=== TEST 4: 1,000 peers: promtool accepts the scrape; rendering takes bounded time and yields to other requests
--- skip_eval: 3: !$::Have{promtool}
--- http_config
    init_by_lua_block {
        autoscale = require "resty.autoscale"
        local ups = {}
        for u = 1, 4 do
            local peers = {}
            for i = 1, 250 do
                peers[i] = "127.0." .. u .. "." .. i .. ":$TEST_NGINX_RAND_PORT_8" -- nothing listens there
            end
            ups["u" .. u] = { peers = peers, outlier = false, retries = 2 }
        end
        autoscale.configure { max_peers = 1024, upstreams = ups }
    }
    init_worker_by_lua_block { autoscale.init_worker() }
    upstream many {
        server 0.0.0.1;
        balancer_by_lua_block { autoscale.balance(ngx.var.up) }
    }
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_5 reuseport;
        location ~ ^/(u[1-4])$ {
            set $up $1;
            proxy_pass http://many;
            proxy_connect_timeout 1s;
            log_by_lua_block { autoscale.log() }
        }
        location = /metrics { content_by_lua_block { autoscale.prometheus_handler() } }
    }
--- config eval
"location = /t { content_by_lua_block { $::Helpers " . <<'_EOC_';
    local prometheus = require "resty.autoscale.prometheus"
    -- every request fails to connect to three peers in turn: samples on most of the 1,000 peers
    for u = 1, 4 do
        t.load { port = gw, path = "/u" .. u, concurrency = 8, requests = 1000 }
    end
    local with_samples = 0
    local text = scrape()
    local out, rc = promtool(text)
    for _ in text:gmatch('autoscale_peer_window_latency_seconds{[^\n]-quantile="0.99"}') do
        with_samples = with_samples + 1
    end
    local peers = select(2, text:gsub("\nautoscale_peer_requests_total{", ""))
    -- time of a render, without yielding
    local times = {}
    for i = 1, 9 do
        ngx.update_time()
        local t0 = ngx.now()
        prometheus.render()
        ngx.update_time()
        times[i] = ngx.now() - t0
    end
    table.sort(times)
    -- the longest stretch without yielding during a render: a light thread ticks every millisecond meanwhile
    local gap, last, running = 0, nil, true
    local ticker = ngx.thread.spawn(function()
        ngx.update_time()
        last = ngx.now()
        while running do
            ngx.sleep(0.001)
            ngx.update_time()
            gap = math.max(gap, ngx.now() - last)
            last = ngx.now()
        end
    end)
    ngx.sleep(0.005)
    gap = 0
    ngx.update_time()
    local t0 = ngx.now()
    local body = prometheus.render { yield = true }
    ngx.update_time()
    local yielding = ngx.now() - t0
    running = false
    ngx.thread.wait(ticker)
    ngx.log(ngx.NOTICE, "1000 peers (", with_samples, " with samples), ", #text, " bytes: render min ",
            times[1] * 1000, " ms, median ", times[5] * 1000, " ms, max ", times[9] * 1000, " ms; with yields ",
            yielding * 1000, " ms, longest stretch without yielding ", gap * 1000, " ms")
    ngx.say("promtool: rc=", rc, " output=[", out, "]")
    ngx.say("peers ", peers, ", most with window samples ", with_samples > 800)
    ngx.say("median render under 250 ms ", times[5] < 0.25, ", yielding render complete ", #body > 1e6)
    ngx.say("longest stretch without yielding under 250 ms ", gap < 0.25, ", shorter than the render ", gap < yielding)
} }
_EOC_
--- request
GET /t
--- timeout: 90
--- response_body
promtool: rc=0 output=[]
peers 1000, most with window samples true
median render under 250 ms true, yielding render complete true
longest stretch without yielding under 250 ms true, shorter than the render true
--- no_error_log eval
[qr/\[(?:error|crit|alert)\](?!.*connect\(\) failed \(111: Connection refused\) while connecting to upstream)/]



=== TEST 5: only GET and HEAD
--- http_config eval: $::HttpConfig
--- config
    location = /metrics { content_by_lua_block { autoscale.prometheus_handler() } }
--- request eval
["POST /metrics\nx", "HEAD /metrics"]
--- error_code eval
[405, 200]
--- response_headers eval
["Allow: GET, HEAD", "Content-Type: text/plain; version=0.0.4; charset=utf-8"]
--- no_error_log
[error]
