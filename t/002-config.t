# vim:set ft= ts=4 sw=4 et:
# A bad configuration stops nginx at start with the field path and the reason.

use lib 't';
use Autoscale;

add_block_preprocessor(sub {
    my $block = shift;
    if (!defined $block->config) {
        $block->set_value("config", "location = /t { return 200; }");
    }
});

run_tests();

__DATA__

=== TEST 1: port out of range, named with its index
--- http_config
    init_by_lua_block {
        require("resty.autoscale").configure {
            upstreams = { api = { peers = { "127.0.0.1:8081", "10.0.0.1:99999" } } },
        }
    }
--- must_die
--- error_log
upstreams.api.peers[2]: "10.0.0.1:99999": port out of range



=== TEST 2: a DNS name is refused with the reason
--- http_config
    init_by_lua_block {
        require("resty.autoscale").configure { upstreams = { api = { peers = { "backend:80" } } } }
    }
--- must_die
--- error_log
upstreams.api.peers[1]: "backend:80": host must be an IPv4 address or a bracketed IPv6 address



=== TEST 3: an unknown option (a typo) is an error, with the valid names
--- http_config
    init_by_lua_block {
        require("resty.autoscale").configure { upstreams = { api = { peers = { "127.0.0.1:1" }, retires = 3 } } }
    }
--- must_die
--- error_log
upstreams.api.retires: unknown option (valid: admission, balancer, default_rtt, discovery, ewma_decay, failure_penalty, failure_statuses, fallback, healthcheck, outlier, peers, reports, retries, scaling, slow_peer_factor, slow_peer_penalty, slow_start, slow_start_aggression, slow_start_min_weight)



=== TEST 4: wrong types and ranges
--- http_config
    init_by_lua_block {
        local autoscale = require "resty.autoscale"
        local function many(n)
            local t = {}
            for i = 1, n do t[i] = "127.0.0.1:" .. i end
            return t
        end
        local cases = {
            { { upstreams = { api = { peers = { "127.0.0.1:1" }, retries = 1.5 } } }, "upstreams.api.retries: must be an integer between 0 and 100 (got 1.5)" },
            { { upstreams = { api = { peers = { "127.0.0.1:1" }, balancer = "fastest" } } }, 'upstreams.api.balancer: must be "peak_ewma", "round_robin" or "random" (got "fastest")' },
            { { upstreams = { api = { peers = {} } } }, "upstreams.api.peers: must be a non-empty list of peers" },
            { { upstreams = { api = { peers = { { addr = "127.0.0.1:1", weight = 0 } } } } }, "upstreams.api.peers[1].weight: must be between 1 and 10000 (got 0)" },
            { { upstreams = { api = { peers = { 42 } } } }, 'upstreams.api.peers[1]: must be "host:port" or { addr = "host:port", weight = n } (got number)' },
            { { upstreams = { api = { peers = { "127.0.0.1:1" }, ewma_decay = -1 } } }, "upstreams.api.ewma_decay: must be between 0.001 and 3600 (got -1)" },
            { { upstreams = { api = { peers = { "127.0.0.1:1", "127.0.0.1:1" } } } }, 'upstreams.api.peers: "127.0.0.1:1" listed twice' },
            { { upstreams = { ["bad name"] = { peers = { "127.0.0.1:1" } } } }, "upstreams.bad name: upstream names are 1 to 63 characters" },
            { { upstreams = {} }, "upstreams: must be a table of at least one upstream, keyed by name" },
            { { upstreams = { api = { peers = { "127.0.0.1:1" } } }, window = { buckets = 0 } }, "window.buckets: must be between 1 and 600 (got 0)" },
            { { upstreams = { api = { peers = { "127.0.0.1:1" } } }, max_peers = 1e9 }, "max_peers: must be between 1 and 65536 (got 1000000000)" },
            { { upstreams = { api = { peers = many(300) } } }, "300 peers configured in all but max_peers is 256" },
            { { upstreams = { api = { peers = { "127.0.0.1:1" }, slow_peer_factor = 1 } } }, "upstreams.api.slow_peer_factor: must be between 1.1 and 1000 (got 1) (or 0 to switch the rule off)" },
            { { upstreams = { api = { peers = { "127.0.0.1:1" }, slow_peer_penalty = 0.5 } } }, "upstreams.api.slow_peer_penalty: must be between 1 and 1000000 (got 0.5)" },
            { { upstreams = { api = { peers = { "127.0.0.1:1" } } }, admission_rate_slots = 1000 }, "admission_rate_slots: must be a power of two (got 1000)" },
            { { upstreams = { api = { peers = { "127.0.0.1:1" } } }, admission_rate_slots = 32 }, "admission_rate_slots: must be between 64 and 1048576 (got 32)" },
            { { upstream = {} }, "upstream: unknown option" },
            { "api", "configuration: must be a table (got string)" },
        }
        for i, c in ipairs(cases) do
            local ok, err = pcall(autoscale.configure, c[1])
            assert(not ok, "case " .. i .. " was accepted")
            if not err:find(c[2], 1, true) then
                error("case " .. i .. ": expected '" .. c[2] .. "', got '" .. err .. "'")
            end
        end
        error("all " .. #cases .. " cases refused as expected")
    }
--- must_die
--- error_log
all 18 cases refused as expected



=== TEST 5: the shared library is looked up along package.cpath and every path tried is listed
--- http_config
    lua_package_cpath "/nonexistent/dir/?.so;;";
    init_by_lua_block {
        local lib = require "resty.autoscale.lib"
        local l, err = lib.load()
        assert(l, "the library should be found further along package.cpath")
        l, err = lib.load("/nonexistent/libresty_autoscale.so")
        error(err)
    }
--- must_die
--- error_log
cannot load libresty_autoscale.so; tried:
/nonexistent/libresty_autoscale.so (not found)



=== TEST 6: a valid configuration starts
--- http_config
    init_by_lua_block {
        require("resty.autoscale").configure {
            max_peers = 16, window = { buckets = 5, bucket = 0.5 },
            upstreams = { api = { peers = { "127.0.0.1:1", { addr = "[::1]:2", weight = 3 } }, balancer = "round_robin", retries = 0, slow_start = 0 } },
        }
    }
--- config
    location = /t { content_by_lua_block { local st = require("resty.autoscale").status("api") ngx.say(st.peers[2].addr, " ", st.peers[2].weight, " ", st.balancer) } }
--- request
GET /t
--- response_body
[::1]:2 3 round_robin
--- no_error_log
[error]
