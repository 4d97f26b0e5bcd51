# OpenResty with lua-resty-autoscale. Build: docker build -t resty-autoscale .
# The library is compiled in a builder stage; the final image is the official OpenResty image plus two directories.

FROM rust:1-bookworm AS builder
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY src ./src
COPY rust-core ./rust-core
COPY tests ./tests
COPY include ./include
COPY lua ./lua
RUN cargo build --release --locked

FROM openresty/openresty:bookworm
COPY --from=builder /src/target/release/libresty_autoscale.so /usr/local/openresty/site/lualib/
COPY lua/resty /usr/local/openresty/site/lualib/resty
# The image's nginx.conf includes /etc/nginx/conf.d/*.conf inside http {}; mount yours there, e.g. docs/example.conf.
