# The operator's image: built in one stage, run from a small, non-root runtime image.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY crds ./crds
COPY tests ./tests
# Release builds optimise across crates (Cargo.toml), which makes them slow to build; Tilt's
# inner loop turns that off with these two build arguments.
ARG RELEASE_LTO=fat
ARG RELEASE_CODEGEN_UNITS=1
RUN CARGO_PROFILE_RELEASE_LTO="$RELEASE_LTO" \
    CARGO_PROFILE_RELEASE_CODEGEN_UNITS="$RELEASE_CODEGEN_UNITS" \
    cargo build --release --locked --bin crownstone-webhooks \
 && cp target/release/crownstone-webhooks /crownstone-webhooks

# Distroless: glibc and CA certificates, no shell, no package manager; runs as nonroot (65532).
FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="crownstone-webhooks" \
      org.opencontainers.image.source="https://github.com/crownstone-webhooks/crownstone-webhooks" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /crownstone-webhooks /usr/local/bin/crownstone-webhooks
USER 65532:65532
# The REST API; /healthz, /readyz and /metrics; the handover records between replicas.
EXPOSE 8082 8081 8084
ENTRYPOINT ["/usr/local/bin/crownstone-webhooks"]
CMD ["run"]
