# syntax=docker/dockerfile:1
# Images for walcache's daemons and CLI, one build:
#   docker build --target producer -t walcache-producer .
#   docker build --target consumer -t walcache-consumer .
#   docker build --target cli      -t walcache .
# Runtime images are distroless (no shell, no package manager), run as uid 65532, and check
# their own health with the daemon's `probe` subcommand (no curl needed). librdkafka is built
# from source and linked statically by rdkafka-sys, as in every other build; zlib is the one
# shared library the binaries need beyond glibc and libgcc.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /src
COPY . .
# The cache mounts keep crates and the target directory between builds; the binaries are
# copied out of the cached target directory because the mount is not part of the layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p walcache-producer -p walcache-consumer -p walcache-client --bins \
 && mkdir -p /out/bin /out/lib \
 && cp target/release/walcache-producer target/release/walcache-consumer target/release/walcache /out/bin/ \
 && cp -L "$(ldconfig -p | awk '/libz\.so\.1 / { print $NF; exit }')" /out/lib/

FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
COPY --from=build /out/lib/ /usr/local/lib/walcache/
ENV LD_LIBRARY_PATH=/usr/local/lib/walcache \
    WALCACHE_LOG_FORMAT=json
USER 65532:65532

FROM runtime AS producer
COPY --from=build /out/bin/walcache-producer /usr/local/bin/walcache-producer
ENV WALCACHE_CONFIG=/etc/walcache/producer.toml
# ops.listen must be reachable from outside the container (0.0.0.0:9187 in deploy/'s configs).
EXPOSE 9187
HEALTHCHECK --interval=10s --timeout=6s --start-period=20s --retries=3 \
    CMD ["/usr/local/bin/walcache-producer", "probe"]
ENTRYPOINT ["/usr/local/bin/walcache-producer"]

FROM runtime AS consumer
COPY --from=build /out/bin/walcache-consumer /usr/local/bin/walcache-consumer
ENV WALCACHE_CONFIG=/etc/walcache/consumer.toml
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=6s --start-period=20s --retries=3 \
    CMD ["/usr/local/bin/walcache-consumer", "probe"]
ENTRYPOINT ["/usr/local/bin/walcache-consumer"]

FROM runtime AS cli
COPY --from=build /out/bin/walcache /usr/local/bin/walcache
ENTRYPOINT ["/usr/local/bin/walcache"]
