# lua-resty-autoscale
#
#   make run      gateway + three demo backends on loopback, prints the URLs (Ctrl-C stops everything)
#   make test     Rust tests + Test::Nginx suites in t/
#   make bench    overhead against plain nginx, interleaved, front worker pinned (first: make bench-reconfigure)
#   make demo     the lab's headline scenario: round robin vs resty.autoscale, side by side, with an HTML report
#   make lab      SCENARIO=name (lab/lab --list)
#   make lib      only the library: cargo build --release -> target/release/libresty_autoscale.so (no apt-get)
#   make module   the native nginx module -> target/release/ngx_http_autoscale_module.so, against the nginx of
#                 NGINX_SOURCE_DIR (default /usr/share/nginx/src, Debian's nginx-dev) or an already configured
#                 NGINX_BUILD_DIR (its objs/ directory); see docs/native-module.md
#   make install  every Lua module under lua/, the library and (when built) the native module; PREFIX=/usr/local,
#                 DESTDIR (staging root), NGINX_MODULES_DIR=/usr/lib/nginx/modules (the native module; empty: not it),
#                 LUA_LIB_DIR=$(PREFIX)/share/lua/5.1 (Lua files), LUA_CLIB_DIR=$(PREFIX)/lib/lua/5.1 (the .so)
#   make uninstall  removes what `make install` put there (same variables)
#   make check-config CONF=/etc/nginx/nginx.conf (or a .lua file returning the configuration): what nginx -t cannot see
#                 (installed as $(BINDIR)/resty-autoscale-check, BINDIR=$(PREFIX)/bin)
#   make soak     10 minutes of keepalive load (2,000 req/s) through reloads, worker SIGKILLs, peer churn, admin
#                 changes and scaling; SOAK_SECONDS=600, SOAK_RATE=2000; report in lab/out/soak.html (t/060-soak.t)
#   make cdef     regenerate include/resty_autoscale.h and lua/resty/autoscale/cdef.lua from src/lib.rs
#   make fuzz     every coverage-guided fuzz target in fuzz/ for FUZZ_TIME seconds each (default 600), growing the
#                 corpora in fuzz/corpus/ (FUZZ_TARGETS=..., FUZZ_SANITIZER=address|none; docs/fuzzing.md); `make test` runs
#                 each target for FUZZ_SMOKE_TIME seconds (default 3) over its corpus (`make fuzz-smoke`)
#
# `run`, `test` and `bench` install the Debian packages they need first (`make deps`).

SHELL := /bin/bash
CARGO ?= cargo
PREFIX ?= /usr/local
LUA_LIB_DIR ?= $(PREFIX)/share/lua/5.1
LUA_CLIB_DIR ?= $(PREFIX)/lib/lua/5.1
BINDIR ?= $(PREFIX)/bin
PROVE ?= prove
LIB := target/release/libresty_autoscale.so
TESTS ?= t/

DEB_PACKAGES := nginx-core libnginx-mod-http-lua lua-resty-core lua-resty-lrucache lua-cjson wrk curl python3 chromium prometheus \
	libtest-base-perl libtext-diff-perl libtest-longstring-perl liblist-moreutils-perl \
	libhttp-message-perl libipc-run-perl liburi-perl \
	lua-nginx-dns dnsmasq-base etcd-server etcd-client \
	redis-server redis-sentinel lua-nginx-redis openssl luarocks python3-yaml \
	nginx-dev libclang-dev g++

SCENARIO ?= headline

.PHONY: all deps build lib module test test-rust test-nginx test-native test-native-long test-discovery-long run bench \
	bench-reconfigure demo lab install uninstall cdef clean check-config soak fuzz fuzz-build fuzz-smoke

all: build

# Installs what is missing, without starting any system service.
deps:
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing:" $$missing; \
		SUDO=; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
		printf '#!/bin/sh\nexit 101\n' | $$SUDO tee /usr/sbin/policy-rc.d >/dev/null && $$SUDO chmod +x /usr/sbin/policy-rc.d; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
		rc=$$?; $$SUDO rm -f /usr/sbin/policy-rc.d; exit $$rc; \
	fi
	@command -v $(CARGO) >/dev/null || { echo "cargo (Rust >= 1.85) is required: https://rustup.rs"; exit 1; }

build: deps
	$(CARGO) build --release
	$(MAKE) --no-print-directory module

# The native module: its bindings (the `ngx` crate's nginx-sys) need the configure output of the nginx that will load
# it; nginx-module/prepare makes it from the sources (once) unless NGINX_BUILD_DIR names one.
NGINX_MODULES_DIR ?= /usr/lib/nginx/modules
MODULE := target/release/ngx_http_autoscale_module.so
module:
	@objs="$${NGINX_BUILD_DIR:-}"; \
	if [ -z "$$objs" ]; then objs=$$(nginx-module/prepare target/nginx-build) || exit 1; fi; \
	[ -f "$$objs/ngx_auto_config.h" ] || { echo "NGINX_BUILD_DIR=$$objs is not a configured nginx objs/ directory"; exit 1; }; \
	echo "building the native module against $$objs"; \
	cd nginx-module && NGINX_BUILD_DIR="$$objs" $(CARGO) build --release --target-dir ../target
	cp target/release/libngx_http_autoscale_module.so $(MODULE)

# The library alone, without `make deps` (used by `luarocks make` and after `opm get`).
RUST_SOURCES := $(shell find src rust-core/src -name '*.rs' 2>/dev/null) build.rs Cargo.toml rust-core/Cargo.toml Cargo.lock
lib: $(LIB)

$(LIB): $(RUST_SOURCES)
	$(CARGO) build --release

test: build test-rust test-nginx test-native fuzz-smoke

test-rust:
	$(CARGO) test --release --workspace

test-nginx:
	$(PROVE) -r $(TESTS)

# The behaviour suites again, against native upstreams (`autoscale backend;` instead of balancer_by_lua): balancing,
# workers / reload / SIGKILL and no-allocation in `make test` (about 55 s on 2 cores); `make test-native-long` adds
# the resilience suite (ejection, half-open, panic mode, fallback: about 100 s more).
NATIVE_TESTS ?= t/003-balancing.t t/004-workers.t t/007-no-alloc.t
NATIVE_LONG_TESTS ?= t/008-resilience.t
test-native:
	AUTOSCALE_NATIVE=1 $(PROVE) $(NATIVE_TESTS)

test-native-long:
	AUTOSCALE_NATIVE=1 $(PROVE) $(NATIVE_TESTS) $(NATIVE_LONG_TESTS)

# The Consul registry away for 30 s under load (make test runs the same with 3 s).
test-discovery-long: build
	TEST_AUTOSCALE_OUTAGE=30 $(PROVE) t/050-discovery-consul.t

# Coverage-guided fuzzing (docs/fuzzing.md): libFuzzer-linked binaries built with the stable toolchain by
# fuzz/build.sh (FUZZ_SANITIZER=address by default, or none); corpora in fuzz/corpus/<target>, crashes in
# fuzz/artifacts/<target>/ (not committed).
FUZZ_TARGETS ?= addr ffi_config layout admission engine report
FUZZ_TIME ?= 600
FUZZ_SMOKE_TIME ?= 3
FUZZ_SANITIZER ?= address
export FUZZ_SANITIZER
FUZZ_BIN = fuzz/target/$(FUZZ_SANITIZER)/x86_64-unknown-linux-gnu/release

fuzz-build: deps
	fuzz/build.sh

fuzz: fuzz-build
	@set -e; for t in $(FUZZ_TARGETS); do \
		mkdir -p fuzz/corpus/$$t fuzz/artifacts/$$t; \
		echo "fuzz $$t for $(FUZZ_TIME) s"; \
		nice -n 19 $(FUZZ_BIN)/$$t -max_total_time=$(FUZZ_TIME) \
			-artifact_prefix=fuzz/artifacts/$$t/ -print_final_stats=1 fuzz/corpus/$$t 2>&1 | \
			grep -E '^(stat::|Done|==[0-9]+== ERROR|SUMMARY|thread .* panicked)' || true; \
		if ls fuzz/artifacts/$$t/crash-* fuzz/artifacts/$$t/timeout-* fuzz/artifacts/$$t/oom-* >/dev/null 2>&1; then \
			echo "fuzz $$t: findings in fuzz/artifacts/$$t/"; exit 1; fi; \
	done

# Each target over its committed corpus (every input that ever found new coverage, and every past finding), then
# FUZZ_SMOKE_TIME seconds of new inputs; nothing written into the repository.
fuzz-smoke: fuzz-build
	@set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; pass=0; fail=0; \
	for t in $(FUZZ_TARGETS); do \
		mkdir -p $$tmp/$$t; \
		if $(FUZZ_BIN)/$$t -max_total_time=$(FUZZ_SMOKE_TIME) -artifact_prefix=$$tmp/$$t- -print_final_stats=1 \
			$$tmp/$$t fuzz/corpus/$$t > $$tmp/$$t.log 2>&1; then \
			pass=$$((pass+1)); echo "ok - fuzz smoke $$t: $$(grep -m1 -o 'stat::number_of_executed_units: [0-9]*' $$tmp/$$t.log)"; \
		else \
			fail=$$((fail+1)); echo "not ok - fuzz smoke $$t"; tail -40 $$tmp/$$t.log; \
		fi; \
	done; \
	echo "fuzz smoke: $$pass passed, $$fail failed"; [ $$fail = 0 ]

run: build
	scripts/demo

bench: build bench-reconfigure
	bench/run

# Cost of a run-time peer change (add_peer, a 100-peer discovery change) at 100, 1,000 and 10,000 peers.
bench-reconfigure:
	$(CARGO) run --release -p autoscale-core --example reconfigure

demo: build
	lab/lab headline

SOAK_SECONDS ?= 600
soak: build
	mkdir -p lab/out
	SOAK_SECONDS=$(SOAK_SECONDS) SOAK_REPORT=$(CURDIR)/lab/out/soak.html $(PROVE) t/060-soak.t

lab: build
	lab/lab $(SCENARIO)

# The start-up validation of a configuration (autoscale.configure / autoscale.admin) in a throwaway nginx, with this
# checkout's library: CONF is an nginx.conf or a Lua file returning the configuration table (bin/resty-autoscale-check).
check-config: $(LIB)
	@[ -n "$(CONF)" ] || { echo "usage: make check-config CONF=/etc/nginx/nginx.conf (or a .lua file)"; exit 2; }
	RESTY_AUTOSCALE_LUA_DIR=$(CURDIR)/lua RESTY_AUTOSCALE_LIB_DIR=$(CURDIR)/target/release bin/resty-autoscale-check "$(CONF)"

cdef:
	AUTOSCALE_REGEN=1 $(CARGO) build --release

# Every module under lua/ (found, not listed: a new file cannot be left out) and the library.
LUA_MODULES = $(shell cd lua && find resty -name '*.lua' | LC_ALL=C sort)

install: $(LIB)
	@set -e; for f in $(LUA_MODULES); do \
		echo "install $(DESTDIR)$(LUA_LIB_DIR)/$$f"; \
		install -D -m 0644 lua/$$f $(DESTDIR)$(LUA_LIB_DIR)/$$f; \
	done
	install -d $(DESTDIR)$(LUA_CLIB_DIR)
	install -m 0755 $(LIB) $(DESTDIR)$(LUA_CLIB_DIR)/
	install -d $(DESTDIR)$(BINDIR)
	sed -e 's|^INSTALLED_LUA_DIR=$$|INSTALLED_LUA_DIR=$(LUA_LIB_DIR)|' -e 's|^INSTALLED_LIB_DIR=$$|INSTALLED_LIB_DIR=$(LUA_CLIB_DIR)|' \
		bin/resty-autoscale-check > $(DESTDIR)$(BINDIR)/resty-autoscale-check
	chmod 0755 $(DESTDIR)$(BINDIR)/resty-autoscale-check
	@if [ -f $(MODULE) ] && [ -n "$(NGINX_MODULES_DIR)" ]; then \
		echo "install $(DESTDIR)$(NGINX_MODULES_DIR)/ngx_http_autoscale_module.so"; \
		install -D -m 0644 $(MODULE) $(DESTDIR)$(NGINX_MODULES_DIR)/ngx_http_autoscale_module.so; \
	elif [ -n "$(NGINX_MODULES_DIR)" ]; then echo "(no native module: make module builds it)"; fi

uninstall:
	rm -f $(addprefix $(DESTDIR)$(LUA_LIB_DIR)/,$(LUA_MODULES)) $(DESTDIR)$(LUA_CLIB_DIR)/libresty_autoscale.so \
		$(DESTDIR)$(BINDIR)/resty-autoscale-check \
		$(if $(NGINX_MODULES_DIR),$(DESTDIR)$(NGINX_MODULES_DIR)/ngx_http_autoscale_module.so)
	-rmdir $(DESTDIR)$(LUA_LIB_DIR)/resty/autoscale/discovery $(DESTDIR)$(LUA_LIB_DIR)/resty/autoscale 2>/dev/null

clean:
	$(CARGO) clean
	rm -rf fuzz/target fuzz/artifacts
	rm -rf t/servroot* .run lab/out
