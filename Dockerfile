# syntax=docker/dockerfile:1
#
# One image for every Sluice service: `sluice` (ingest, process, ...) and `loadgen`.
#
#   docker build -t sluice:local .
#   docker run --rm sluice:local sluice --help
#
# Needs BuildKit (the default builder of Docker 23+ and `docker compose`) for the cache
# mounts, which keep the cargo registry and target dir between builds.

ARG RUST_VERSION=1

FROM rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /src
COPY . .
# Build only the two binaries (and what they depend on). The target dir is a cache mount,
# so the binaries are copied out in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --workspace --bin sluice --bin loadgen \
    && install -D -m 0755 target/release/sluice /out/sluice \
    && install -D -m 0755 target/release/loadgen /out/loadgen

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 sluice \
    && useradd --system --uid 10001 --gid sluice --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin sluice \
    && mkdir -p /data /results /etc/sluice \
    && chown sluice:sluice /data /results
COPY --from=builder /out/sluice /out/loadgen /usr/local/bin/

USER sluice:sluice
WORKDIR /data
# The readings table when no object store is configured (compose uses MinIO instead).
VOLUME ["/data"]
ENV SLUICE_STORE=/data \
    SLUICE_LOG=info
# 8080: ingest HTTP; 8070: the read API (SQL, latest values); 8090: router subscription
# API; 9090: Prometheus /metrics of every service.
EXPOSE 8070 8080 8090 9090
CMD ["sluice", "--help"]
