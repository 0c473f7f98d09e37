# wazzup-sync: release build in a Rust image, run from a small Debian image as a non-root user.
# Build: docker build -t wazzup-sync .
# To package a binary built on the host instead (target/release/wazzup-sync):
#   docker build --build-arg BINARY_SOURCE=prebuilt -t wazzup-sync .
ARG BINARY_SOURCE=builder

FROM rust:1.95-bookworm AS builder
WORKDIR /src
# Dependencies first, in a layer of their own: source edits do not rebuild them. Every member
# of the workspace needs its manifest (and a stub) for the dependency graph to resolve.
COPY Cargo.toml Cargo.lock clippy.toml ./
COPY crates/wazzup-api/Cargo.toml crates/wazzup-api/
COPY crates/wazzup-sim/Cargo.toml crates/wazzup-sim/
COPY crates/bench/Cargo.toml crates/bench/
RUN mkdir -p src crates/wazzup-api/src crates/wazzup-sim/src crates/bench/src \
    && echo 'fn main() {}' > src/main.rs && touch src/lib.rs crates/wazzup-api/src/lib.rs \
    && touch crates/wazzup-sim/src/lib.rs \
    && echo 'fn main() {}' > crates/wazzup-sim/src/main.rs \
    && echo 'fn main() {}' > crates/bench/src/main.rs \
    && cargo build --release --locked -p wazzup-sync \
    && rm -rf src crates/*/src
COPY config ./config
COPY build.rs ./
COPY migrations ./migrations
COPY src ./src
COPY crates ./crates
COPY examples ./examples
# The image holds the daemon only: no simulator, no benchmark.
RUN touch src/main.rs src/lib.rs crates/wazzup-api/src/lib.rs \
    && cargo build --release --locked -p wazzup-sync \
    && cp target/release/wazzup-sync /wazzup-sync

FROM scratch AS prebuilt
COPY target/release/wazzup-sync /wazzup-sync

# hadolint ignore=DL3006
FROM ${BINARY_SOURCE} AS binary

FROM debian:bookworm-slim
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
    && useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin wazzup
COPY --from=binary /wazzup-sync /usr/local/bin/wazzup-sync
USER 10001
# Every setting comes from WAZZUP_SYNC__* variables; the defaults are built in.
ENV WAZZUP_SYNC__LOG__FORMAT=json
EXPOSE 9090
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["wazzup-sync", "healthcheck"]
ENTRYPOINT ["wazzup-sync"]
CMD ["run"]
