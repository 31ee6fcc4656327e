# syntax=docker/dockerfile:1
#
# backfilld container image.
#
#   docker build -t backfilld:dev .
#   docker run --rm -e DATABASE_URL=postgres://... -p 9187:9187 backfilld:dev
#
# Stages: chef (toolchain + cargo-chef) -> planner (dependency recipe) -> builder (cached
# dependency layer, then the workspace) -> runtime (distroless, non-root, no shell).
# The dependency layer is rebuilt only when Cargo.toml / Cargo.lock files change.

# Pinned toolchain; keep it >= the workspace's rust-version (Cargo.toml).
ARG RUST_VERSION=1.95
ARG CARGO_CHEF_VERSION=0.1.76

# Base images are pinned by digest as well as tag: a rebuild fetches the bytes that were
# reviewed, not whatever the tag points at today. Update tag and digest together
# (docker buildx imagetools inspect rust:1.95-bookworm).
FROM rust:${RUST_VERSION}-bookworm@sha256:6258907abe69656e41cd992e0b705cdcfabcbbe3db374f92ed2d47121282d4a1 AS chef
ARG CARGO_CHEF_VERSION
RUN cargo install cargo-chef --locked --version "${CARGO_CHEF_VERSION}"
WORKDIR /src

FROM chef AS planner
COPY . .
# Only the manifests and Cargo.lock end up in the recipe.
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
# sqlx's query macros, if used, check against the committed .sqlx/ metadata: no database
# is reachable while building an image.
ENV SQLX_OFFLINE=true
COPY --from=planner /src/recipe.json recipe.json
# Dependencies of the backfilld package only, in release mode: this layer stays cached until
# the dependency graph changes. --no-default-features leaves out the `demo` verb and with it
# the test kit that starts throwaway clusters: the image has no use for either.
RUN cargo chef cook --release --no-default-features --recipe-path recipe.json -p backfilld
COPY . .
RUN cargo build --release --locked --no-default-features -p backfilld \
    && install -D -m 0755 target/release/backfilld /out/backfilld

# glibc + libgcc + CA certificates (for TLS to PostgreSQL); no shell, no package manager.
# The :nonroot tag runs as uid/gid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot@sha256:9dac0a79194e45a7da0158a9c6da57b217585af0786db3845d1f0ec1a0dd182f AS runtime
COPY --from=builder /out/backfilld /usr/local/bin/backfilld
# The built-in defaults, for reference and for `--config /etc/backfilld/backfilld.toml`;
# in Kubernetes a ConfigMap is mounted over /etc/backfilld (deploy/k8s).
COPY config/default.toml /etc/backfilld/backfilld.toml
USER 65532:65532
# /metrics, /healthz, /readyz (config http.listen)
EXPOSE 9187
ENTRYPOINT ["backfilld"]
CMD ["run", "--exit-when-idle"]
