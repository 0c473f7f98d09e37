# The Wazzup simulator, for trying wazzup-sync with docker compose (not for production).
# Build from the repository root: docker build -f deploy/compose/simulator.Dockerfile .
FROM rust:1.95-bookworm AS builder
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p wazzup-sim \
    && cp target/release/wazzup-sim /wazzup-sim

FROM debian:bookworm-slim
COPY --from=builder /wazzup-sim /usr/local/bin/wazzup-sim
USER 10001
EXPOSE 8089
ENTRYPOINT ["wazzup-sim"]
# --public: listen on the container's interfaces, so the published port reaches it.
CMD ["serve", "--listen", "0.0.0.0:8089", "--public"]
