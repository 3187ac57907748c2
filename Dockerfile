# Multi-stage build: compile modrun in the Rust image, run it in a slim Debian image as a
# non-root user with the bundled example config (its modules need only /bin/sh and coreutils).
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin modrun

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends curl ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --create-home --home-dir /srv/modrun modrun
COPY --from=build /src/target/release/modrun /usr/local/bin/modrun
COPY --chown=modrun:modrun config /srv/modrun/config
WORKDIR /srv/modrun
USER modrun
ENV MODRUN_BIND=0.0.0.0:8080
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=3s --start-period=5s --retries=3 \
  CMD curl -fsS http://127.0.0.1:8080/healthz || exit 1
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/modrun"]
CMD ["serve", "--config", "/srv/modrun/config/modrun.toml"]
