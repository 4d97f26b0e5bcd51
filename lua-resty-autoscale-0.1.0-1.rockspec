package = "lua-resty-autoscale"
version = "0.1.0-1"
source = {
   url = "git+https://github.com/lua-resty-autoscale/lua-resty-autoscale.git",
   tag = "v0.1.0",
}
description = {
   summary = "Latency- and failure-aware load balancing for nginx/OpenResty with statistics shared by all workers",
   detailed = [[
      A Rust library (shared-memory rolling windows, latency sketches, peak-EWMA, power-of-two-choices) called through
      LuaJIT FFI from balancer_by_lua* and log_by_lua*. Building needs cargo (Rust >= 1.82).
   ]],
   license = "Apache-2.0",
}
dependencies = {
   "lua >= 5.1",
}
build = {
   type = "command",
   build_command = "cargo build --release",
   install = {
      lua = {
         ["resty.autoscale"] = "lua/resty/autoscale.lua",
         ["resty.autoscale.balancer"] = "lua/resty/autoscale/balancer.lua",
         ["resty.autoscale.cdef"] = "lua/resty/autoscale/cdef.lua",
         ["resty.autoscale.config"] = "lua/resty/autoscale/config.lua",
         ["resty.autoscale.control"] = "lua/resty/autoscale/control.lua",
         ["resty.autoscale.dashboard"] = "lua/resty/autoscale/dashboard.lua",
         ["resty.autoscale.events"] = "lua/resty/autoscale/events.lua",
         ["resty.autoscale.healthcheck"] = "lua/resty/autoscale/healthcheck.lua",
         ["resty.autoscale.prometheus"] = "lua/resty/autoscale/prometheus.lua",
         ["resty.autoscale.spec"] = "lua/resty/autoscale/spec.lua",
         ["resty.autoscale.trace"] = "lua/resty/autoscale/trace.lua",
         ["resty.autoscale.lib"] = "lua/resty/autoscale/lib.lua",
         ["resty.autoscale.status"] = "lua/resty/autoscale/status.lua",
         ["resty.autoscale.redact"] = "lua/resty/autoscale/redact.lua",
      },
      lib = {
         ["libresty_autoscale"] = "target/release/libresty_autoscale.so",
      },
   },
}
