# vim:set ft= ts=4 sw=4 et:
# The dashboard: the page and its JSON; then headless Chromium loads the page against a gateway with live traffic
# (one peer failing for a while) and the test checks that the charts hold the data: latency, throughput, errors,
# share, states and the event timeline.
#
# AUTOSCALE_DASHBOARD_SCREENSHOT=docs/dashboard.png prove t/011-dashboard.t also saves a screenshot of that page.

use lib 't';
use Autoscale;
use File::Spec;

workers(2);
master_on();

# AUTOSCALE_CHROMIUM=/path/to/chromium, else chromium on the PATH; without one the browser test is skipped.
our ($Chromium) = grep { -x } $ENV{AUTOSCALE_CHROMIUM} // map { "$_/chromium" } split /:/, $ENV{PATH};
diag("chromium not found (Debian package chromium, or AUTOSCALE_CHROMIUM): the browser test is skipped")
    unless $Chromium;
$ENV{TEST_NGINX_CHROMIUM} = $Chromium // '';
$ENV{TEST_NGINX_SCREENSHOT} = $ENV{AUTOSCALE_DASHBOARD_SCREENSHOT}
    ? File::Spec->rel2abs($ENV{AUTOSCALE_DASHBOARD_SCREENSHOT}) : '';

# Backends on ports 1-4: latency (ms) from the port, status from the shared dict ("status:<port>", default 200).
our $HttpConfig = <<'_EOC_';
    lua_shared_dict ctl 1m;
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1;
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_2;
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_3;
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_4;
        location / {
            content_by_lua_block {
                local port = ngx.var.server_port
                local ms = ({ ["$TEST_NGINX_RAND_PORT_1"] = 2, ["$TEST_NGINX_RAND_PORT_2"] = 20,
                              ["$TEST_NGINX_RAND_PORT_3"] = 6, ["$TEST_NGINX_RAND_PORT_4"] = 4 })[port]
                ngx.sleep(ms * (0.8 + 0.4 * math.random()) / 1000)
                ngx.status = ngx.shared.ctl:get("status:" .. port) or 200
                ngx.say(port)
            }
        }
    }
    init_by_lua_block {
        autoscale = require "resty.autoscale"
        autoscale.configure { upstreams = {
            api = {
                peers = { "127.0.0.1:$TEST_NGINX_RAND_PORT_1", "127.0.0.1:$TEST_NGINX_RAND_PORT_2",
                          "127.0.0.1:$TEST_NGINX_RAND_PORT_3" },
                outlier = { consecutive_5xx = 3, base_ejection_time = 2, max_ejection_percent = 50 },
                slow_start = 0,
            },
            web = { peers = { "127.0.0.1:$TEST_NGINX_RAND_PORT_1", "127.0.0.1:$TEST_NGINX_RAND_PORT_4" }, slow_start = 0 },
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
        location = /autoscale/dashboard { content_by_lua_block { autoscale.dashboard_handler() } }
        # What the browser test loads: the same dashboard polling a copy of its JSON that answers after 0.25 s.
        # Headless Chromium runs page time virtually (a 1 s poll interval passes at once) but waits for the
        # network, so this delay paces the polls in real time and the rates are computed over real traffic.
        location = /paced { content_by_lua_block { autoscale.dashboard_handler { status_url = "/paced-json?format=json", history = 60 } } }
        location = /paced-json { content_by_lua_block { ngx.sleep(0.25) autoscale.dashboard_handler() } }
    }
_EOC_

our $Helpers = <<'_EOC_';
    local t = require "autoscale_test"
    local cjson = require "cjson"
    local gw = $TEST_NGINX_RAND_PORT_5
    local dir = ngx.config.prefix() .. "logs/"

    local process = require "autoscale_process" -- background processes, stopped by PID
    local read = process.read

    local CHROMIUM = "$TEST_NGINX_CHROMIUM"
    local function chromium(args, out, err)
        local profile = dir .. "chromium-profile-" .. ngx.now() .. "-" .. math.random(1e6)
        return process.start(CHROMIUM .. " --headless --no-sandbox --disable-gpu --no-first-run"
                             .. " --disable-background-networking --disable-component-update --disable-sync"
                             .. " --user-data-dir=" .. profile .. " " .. args, out, 90, err), profile
    end

    -- attributes of every <tag ...> in `html` whose attributes contain all of `want` (name = value)
    local function elements(html, tag, want)
        local out = {}
        for attrs in html:gmatch("<" .. tag .. "(%s[^>]*)>") do
            local a = {}
            for k, v in attrs:gmatch('([%w%-]+)="([^"]*)"') do
                a[k] = v
            end
            local ok = true
            for k, v in pairs(want or {}) do
                if a[k] ~= v then
                    ok = false
                end
            end
            if ok then
                out[#out + 1] = a
            end
        end
        return out
    end

    -- the <svg> of chart `kind` of upstream `up`
    local function chart(html, kind, up)
        return html:match('<svg class="chart" data%-chart="' .. kind .. '" data%-upstream="' .. up .. '".-</svg>') or ""
    end
_EOC_

run_tests();

__DATA__

=== TEST 1: the page is self-contained, its JSON has the status and the server's clock
--- http_config eval: $::HttpConfig
--- config eval
"location = /t { content_by_lua_block { $::Helpers " . <<'_EOC_';
    t.load { port = gw, path = "/api", concurrency = 2, requests = 20 }
    local code, page, h = t.get(gw, "/autoscale/dashboard")
    ngx.say(code, " ", h["content-type"], ", ", #page > 10000, ", external references: ",
            page:find("https?://") ~= nil or page:find("src=") ~= nil or page:find("@import") ~= nil)
    ngx.say("csp: ", h["content-security-policy"]:find("default-src 'none'", 1, true) ~= nil,
            ", connect-src self: ", h["content-security-policy"]:find("connect-src 'self'", 1, true) ~= nil)
    local cfg = cjson.decode(page:match('<script id="cfg" type="application/json">(.-)</script>'))
    ngx.say("config: interval ", cfg.interval, ", history ", cfg.history, ", status_url ", tostring(cfg.status_url))
    local body
    code, body = t.get(gw, "/autoscale/dashboard?format=json")
    local j = cjson.decode(body)
    ngx.say(code, " time ", math.abs(j.time - ngx.now()) < 5, ", upstreams ", j.upstreams.api.name, " ",
            j.upstreams.web.name, ", api peers ", #j.upstreams.api.peers, ", events ", type(j.events))
    code, body = t.get(gw, "/autoscale/dashboard?format=json&upstream=web")
    j = cjson.decode(body)
    ngx.say(code, " only web ", j.upstreams.api == nil and j.upstreams.web.name == "web")
    code, body = t.get(gw, "/autoscale/dashboard?format=json&upstream=nope")
    ngx.say(code, " ", cjson.decode(body).error)
} }
_EOC_
--- request
GET /t
--- response_body
200 text/html; charset=utf-8, true, external references: false
csp: true, connect-src self: true
config: interval 1, history 300, status_url nil
200 time true, upstreams api web, api peers 3, events table
200 only web true
404 unknown upstream nope
--- no_error_log
[error]



=== TEST 2: a bad option is a programming error, raised where the handler is called
--- http_config eval: $::HttpConfig
--- config
    location = /t {
        content_by_lua_block {
            for _, opts in ipairs { { history = 5 }, { colour = "red" }, { interval = "1" }, "x" } do
                local ok, err = pcall(function()
                    autoscale.dashboard_handler(opts) -- the error names this line
                end)
                ngx.say((err:gsub("^content_by_lua%(nginx.conf:%d+%):4: ", "line 4: ")))
            end
        }
    }
--- request
GET /t
--- response_body
line 4: resty.autoscale.dashboard: value out of range (10 to 3600): 5
line 4: resty.autoscale.dashboard: unknown option colour
line 4: resty.autoscale.dashboard: interval must be a number (got string)
line 4: resty.autoscale.dashboard: options must be a table (got string)
--- no_error_log
[error]



=== TEST 3: headless Chromium shows live data: latency, throughput, errors, share, states and events
--- skip_eval: 3: !$::Chromium
--- http_config eval: $::HttpConfig
--- config eval
"location = /t { content_by_lua_block { $::Helpers " . <<'_EOC_';
    local bad = "127.0.0.1:$TEST_NGINX_RAND_PORT_3"
    local fast, slow = "127.0.0.1:$TEST_NGINX_RAND_PORT_1", "127.0.0.1:$TEST_NGINX_RAND_PORT_2"
    t.load { port = gw, path = "/api", concurrency = 2, requests = 50 } -- the first poll sees estimates
    local running = true
    local loads = {}
    for i = 1, 4 do
        loads[i] = ngx.thread.spawn(function()
            local n = 0
            while running do
                t.load { port = gw, path = i <= 3 and "/api" or "/web", concurrency = 1, duration = 1 }
                n = n + 1
            end
            return n
        end)
    end
    -- the third api peer answers 500 from 5 s to 12 s: ejected, probed (half-open), ejected again, then healthy
    local episode = ngx.thread.spawn(function()
        ngx.sleep(5)
        ngx.shared.ctl:set("status:$TEST_NGINX_RAND_PORT_3", 500)
        ngx.sleep(7)
        ngx.shared.ctl:delete("status:$TEST_NGINX_RAND_PORT_3")
    end)
    local url = "http://127.0.0.1:" .. gw .. "/paced"
    local procs, profiles = {}, {}
    procs[1], profiles[1] = chromium("--virtual-time-budget=60000 --dump-dom " .. url,
                                    dir .. "dom.html", dir .. "chromium.log")
    local shot = "$TEST_NGINX_SCREENSHOT"
    if shot ~= "" then
        procs[2], profiles[2] = chromium("--virtual-time-budget=60000 --hide-scrollbars --window-size=1280,1560"
                                        .. " --screenshot=" .. shot .. " " .. url, dir .. "shot.log", dir .. "shot.err")
    end
    local finished = t.poll(function()
        for _, p in ipairs(procs) do
            if p:alive() then return false end
        end
        return true
    end, 80)
    running = false
    for _, p in ipairs(procs) do p:stop() end
    for _, p in ipairs(profiles) do os.execute("rm -rf " .. p) end
    for _, th in ipairs(loads) do ngx.thread.wait(th) end
    ngx.thread.wait(episode)

    local dom = read(dir .. "dom.html")
    if not dom:find("</html>") then
        ngx.log(ngx.WARN, "chromium: ", read(dir .. "chromium.log"))
    end
    local polls = tonumber(dom:match('<body data%-polls="(%d+)"')) or 0
    ngx.say("chromium finished ", finished, ", polls >= 30 ", polls >= 30)

    local function series(kind, up, addr, key)
        local pts, last, max = 0, nil, 0
        for _, a in ipairs(elements(chart(dom, kind, up), "polyline", { ["data-peer"] = addr, ["data-series"] = key })) do
            pts = pts + tonumber(a["data-n"])
            last = tonumber(a["data-last"])
            max = math.max(max, tonumber(a["data-max"]))
        end
        return pts, last, max
    end
    local lat = {}
    for name, addr in pairs { fast = fast, slow = slow, bad = bad } do
        local n50 = series("latency", "api", addr, "p50")
        local n99, last99 = series("latency", "api", addr, "p99")
        lat[name] = { n50 = n50, n99 = n99, p99 = last99 }
    end
    ngx.say("latency: points per line >= 20 ", lat.fast.n99 >= 20 and lat.slow.n99 >= 20 and lat.bad.n99 >= 20
            and lat.fast.n50 >= 20 and lat.slow.n50 >= 20,
            ", slow peer's p99 above the fast one's ", (lat.slow.p99 or 0) > (lat.fast.p99 or 1e9),
            ", above 12 ms ", (lat.slow.p99 or 0) > 12)
    local rps, share = 0, 0
    for _, addr in ipairs { fast, slow, bad } do
        local n, last = series("rps", "api", addr, "rps")
        rps = rps + (n >= 20 and last or 0)
        local _, s = series("share", "api", addr, "share")
        share = share + (s or 0)
    end
    local web_n, web_last = 0, 0 -- two lines; the balancer may send nearly everything to one of them
    for _, addr in ipairs { "127.0.0.1:$TEST_NGINX_RAND_PORT_1", "127.0.0.1:$TEST_NGINX_RAND_PORT_4" } do
        local n, last = series("rps", "web", addr, "rps")
        web_n, web_last = math.min(n, web_n == 0 and n or web_n), web_last + (last or 0)
    end
    ngx.say("throughput: api > 20 req/s ", rps > 20, ", web lines ", web_n >= 20 and web_last > 0,
            ", shares add up to 100 % ", math.abs(share - 100) < 1)
    local _, _, bad_errors = series("errors", "api", bad, "eps")
    local _, _, fast_errors = series("errors", "api", fast, "eps")
    ngx.log(ngx.NOTICE, "dashboard: polls ", polls, ", p99 points fast/slow/bad ", lat.fast.n99, "/", lat.slow.n99, "/",
            lat.bad.n99, ", last p99 fast/slow ", lat.fast.p99, "/", lat.slow.p99, " ms, api ", rps, " req/s, shares ",
            share, " %, web ", web_n, " points last ", web_last, ", errors/s max bad/fast ", bad_errors, "/", fast_errors)
    ngx.say("errors: failing peer > 0 ", bad_errors > 0, ", healthy peer 0 ", fast_errors == 0)
    local states = {}
    for _, a in ipairs(elements(chart(dom, "state", "api"), "rect", { ["data-peer"] = bad })) do
        states[a["data-state"]] = true
    end
    ngx.say("states of the failing peer: healthy ", states.healthy, ", ejected ", states.ejected)
    local marks = #elements(chart(dom, "latency", "api"), "line", { class = "mark", ["data-event"] = "ejected" })
    local dots = #elements(dom, "circle", { class = "ev", ["data-event"] = "ejected" })
    local rows = #elements(dom, "tr", { ["data-event"] = "ejected" })
    ngx.say("ejections: on the charts ", marks > 0, ", on the timeline ", dots > 0, ", in the table ", rows > 0)
    local peers = #elements(dom:match('<section class="card" id="up%-api".-</section>') or "", "tr", {})
    ngx.say("api table rows ", peers)
    if shot ~= "" then
        ngx.log(ngx.NOTICE, "screenshot saved to ", shot)
    end
} }
_EOC_
--- request
GET /t
--- timeout: 120
--- response_body
chromium finished true, polls >= 30 true
latency: points per line >= 20 true, slow peer's p99 above the fast one's true, above 12 ms true
throughput: api > 20 req/s true, web lines true, shares add up to 100 % true
errors: failing peer > 0 true, healthy peer 0 true
states of the failing peer: healthy true, ejected true
ejections: on the charts true, on the timeline true, in the table true
api table rows 3
--- no_error_log
[error]
