# OpenResty with lua-resty-autoscale, serving examples/nginx.conf by default.
#
#   docker build -t resty-autoscale .
#   docker run --rm -p 8080:8080 -p 127.0.0.1:9145:9145 resty-autoscale
#
# Base images are pinned by exact version tag: rust 1.95.0 (the toolchain the test suite is run with; the committed
# Cargo.lock needs Rust >= 1.85) and OpenResty 1.27.1.2-0 on Debian 12. Add a digest (`@sha256:...`, from
# `docker buildx imagetools inspect <image>`) to pin them byte for byte.

FROM rust:1.95.0-bookworm AS builder
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY src ./src
COPY rust-core ./rust-core
COPY tests ./tests
COPY include ./include
COPY lua ./lua
# A stripped library: the release profile keeps line tables for profiling; the image does not need them.
RUN CARGO_PROFILE_RELEASE_STRIP=true CARGO_PROFILE_RELEASE_DEBUG=0 cargo build --release --locked \
    && test -s target/release/libresty_autoscale.so

FROM openresty/openresty:1.27.1.2-0-bookworm
# site/lualib is on OpenResty's default lua_package_path and lua_package_cpath; the library is found there as
# libresty_autoscale.so by walking package.cpath.
COPY --from=builder /src/target/release/libresty_autoscale.so /usr/local/openresty/site/lualib/
COPY lua/resty /usr/local/openresty/site/lualib/resty
# The default configuration: gateway on 8080; status, Prometheus metrics and dashboard on 9145. Mount your own over
# it: -v "$PWD/nginx.conf:/usr/local/openresty/nginx/conf/nginx.conf:ro".
COPY examples/nginx.conf /usr/local/openresty/nginx/conf/nginx.conf
EXPOSE 8080 9145
