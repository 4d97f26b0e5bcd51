package = "lua-resty-autoscale"
version = "0.2.0-1"
source = {
   url = "git+https://github.com/lua-resty-autoscale/lua-resty-autoscale.git",
   tag = "v0.2.0",
}
description = {
   summary = "Latency- and failure-aware load balancing for nginx/OpenResty with statistics shared by all workers",
   detailed = [[
      A Rust library (shared-memory rolling windows, latency sketches, peak-EWMA, power-of-two-choices) called through
      LuaJIT FFI from balancer_by_lua* and log_by_lua*. Building needs cargo (Rust >= 1.85) and make.
   ]],
   homepage = "https://github.com/lua-resty-autoscale/lua-resty-autoscale",
   license = "Apache-2.0",
}
-- What it really needs at run time, which luarocks cannot express: nginx with lua-nginx-module (OpenResty, or Debian's
-- libnginx-mod-http-lua), that is LuaJIT 2.1 (OpenResty's branch) with its FFI, plus lua-resty-core (bundled with
-- OpenResty; Debian's lua-resty-core package). It does not run under PUC Lua. "lua ~> 5.1" (>= 5.1, < 5.2) is the
-- Lua ABI LuaJIT provides: install with `luarocks --lua-version 5.1`.
dependencies = {
   "lua ~> 5.1",
}
-- `make lib` builds target/release/libresty_autoscale.so with cargo; `make install` installs every module found under
-- lua/ (no list here that could drift from it) and the library into the rock's directories.
build = {
   type = "make",
   build_target = "lib",
   build_variables = {},
   install_target = "install",
   install_variables = {
      LUA_LIB_DIR = "$(LUADIR)",
      LUA_CLIB_DIR = "$(LIBDIR)",
      PREFIX = "$(PREFIX)",
      NGINX_MODULES_DIR = "", -- a rock holds no nginx module (make install puts a built one into nginx's directory)
      BINDIR = "$(BINDIR)",
   },
}
