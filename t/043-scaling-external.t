# vim:set ft= ts=4 sw=4 et:
# The external signal: a Prometheus instant query fetched in a background timer (a real Prometheus server, started
# and stopped here by PID, scrapes a "queue_depth" gauge the test sets); the decision follows it.

use lib 't';
use Autoscale;
require './t/lib/scaling_ports.pl';
scaling_ports('PROM');

workers(1);
master_on();

our %Have = map { my $tool = $_; ($tool => scalar grep { -x "$_/$tool" } split /:/, $ENV{PATH}) } qw(prometheus);
diag("prometheus not found (Debian package prometheus): skipped") unless $Have{prometheus};

our $HttpConfig = <<'_EOC_';
    lua_shared_dict autoscale_scaling 1m;
    lua_shared_dict demand 1m;
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_1;
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_2;
        location / { return 200 "ok\n"; }
    }
    init_by_lua_block {
        autoscale = require "resty.autoscale"
        autoscale.configure { upstreams = {
            queue = { peers = { "127.0.0.1:$TEST_NGINX_RAND_PORT_1", "127.0.0.1:$TEST_NGINX_RAND_PORT_2" },
                      scaling = { min = 2, max = 20, external = { url = "http://127.0.0.1:$TEST_NGINX_PROM_PORT",
                                  query = "queue_depth", target = 10, interval = 1 } } },
        } }
    }
    init_worker_by_lua_block { autoscale.init_worker() }
    server {
        listen 127.0.0.1:$TEST_NGINX_RAND_PORT_5;
        location = /scaling { content_by_lua_block { autoscale.scaling_handler() } }
        location = /demand {    # what Prometheus scrapes
            content_by_lua_block { ngx.print("queue_depth ", ngx.shared.demand:get("depth") or 0, "\n") }
        }
    }
_EOC_

run_tests();

__DATA__

=== TEST 1: a queue depth of 60 (target 10 per instance) read from Prometheus: 2 instances become 6
--- skip_eval: 3: !$::Have{prometheus}
--- http_config eval: $::HttpConfig
--- config
location = /t {
    content_by_lua_block {
        local t = require "autoscale_test"
        local process = require "autoscale_process"
        local cjson = require "cjson"
        local dir = ngx.config.prefix() .. "logs/"
        local function state()
            return cjson.decode((select(2, t.get($TEST_NGINX_RAND_PORT_5, "/scaling?service=queue&decisions=400"))))
        end
        process.write(dir .. "prometheus.yml", "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
            .. "scrape_configs:\n  - job_name: demand\n    metrics_path: /demand\n"
            .. "    static_configs:\n      - targets: ['127.0.0.1:$TEST_NGINX_RAND_PORT_5']\n")
        ngx.shared.demand:set("depth", 60)
        local prom = process.start("prometheus --config.file=" .. dir .. "prometheus.yml --storage.tsdb.path="
                                   .. dir .. "prometheus-data --web.listen-address=127.0.0.1:$TEST_NGINX_PROM_PORT",
                                   dir .. "prometheus.log", 60)
        local ok, err = pcall(function()
            local before
            t.poll(function() before = state() return before.reason ~= nil end, 3) -- the first decision
            local st
            local reached = t.poll(function() st = state() return (st.desired or 0) >= 6 end, 30)
            local acted
            for _, d in ipairs(st.decisions) do
                if d.action then acted = d break end
            end
            ngx.say("before Prometheus answered: ", before.reason, ", desired ", before.desired)
            ngx.say("reached 6: ", reached, ", desired ", st.desired, ", signal ", acted and acted.signal,
                    ", input external ", acted and acted.inputs.external, ", value per instance ", acted and acted.value)
        end)
        prom:stop()
        os.execute("rm -rf " .. dir .. "prometheus-data")
        assert(ok, err)
    }
}
--- request
GET /t
--- timeout: 50
--- response_body
before Prometheus answered: no_data, desired 2
reached 6: true, desired 6, signal external, input external 60, value per instance 30
