# Multi-stage build: compile modrun in the Rust image, run it in a slim Debian image as a
# non-root user. History goes to the volume /data; the config may be mounted read-only.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# Dependencies first, in a layer of their own: it is rebuilt only when a manifest or the lock
# file changes, not on every source change. (Stub sources stand in for ours meanwhile.)
COPY Cargo.toml Cargo.lock ./
COPY bench/harness/Cargo.toml bench/harness/Cargo.toml
RUN mkdir -p src bench/harness/src \
 && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
 && echo 'fn main() {}' > bench/harness/src/main.rs \
 && cargo build --release --locked --bin modrun \
 && rm -rf src target/release/.fingerprint/modrun-* target/release/deps/modrun-* \
           target/release/deps/libmodrun-* target/release/modrun
COPY openapi.yaml ./
COPY ui ui
COPY src src
RUN cargo build --release --locked --bin modrun

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends curl ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --create-home --home-dir /srv/modrun modrun \
 && mkdir /data && chown modrun:modrun /data
COPY --from=build /src/target/release/modrun /usr/local/bin/modrun
COPY config /srv/modrun/config
WORKDIR /srv/modrun
USER modrun
# Every setting can come from the environment (MODRUN_<SECTION>__<KEY>): the store lives in
# the volume, whatever the mounted config says.
ENV MODRUN_BIND=0.0.0.0:8080 \
    MODRUN_STORAGE__PATH=/data
VOLUME /data
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=3s --start-period=5s --retries=3 \
  CMD curl -fsS http://127.0.0.1:8080/healthz || exit 1
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/modrun"]
CMD ["serve", "--config", "/srv/modrun/config/modrun.toml"]
