# syntax=docker/dockerfile:1
#
# whydenied sidecar image.
#
#   docker build -t whydenied .
#   docker run --rm -p 8080:8080 whydenied --help
#
# The shipped config (config/whydenied.yaml, installed at
# /etc/whydenied/whydenied.yaml) listens on 127.0.0.1:8080, which is not
# reachable from outside a container, so CMD passes `--listen 0.0.0.0:8080`.
# The admin listener (health, readiness, metrics) stays on 127.0.0.1:9901:
# the HEALTHCHECK runs inside the container, and in Kubernetes the containers
# of a pod share one loopback, so nothing needs it on a public address.
#
# To use your own config, mount a directory over /etc/whydenied (a directory,
# not a single file, so that live reload sees updates) and keep the CMD, or
# pass your own arguments:
#   docker run -v "$PWD/conf:/etc/whydenied:ro" whydenied \
#     serve --config /etc/whydenied/whydenied.yaml --listen 0.0.0.0:8080

# --- Build -------------------------------------------------------------------
# Debian 12 (bookworm), like the runtime image below: the binary links
# against the same glibc it runs with.
FROM rust:1-slim-bookworm AS builder

WORKDIR /src

# The stub step below pipes awk into a loop: a failing awk must fail the
# build (hadolint DL4006).
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# 1. Dependencies only. Stub targets let cargo resolve and compile every
#    dependency of the binary; this layer is rebuilt only when Cargo.toml or
#    Cargo.lock change. cargo refuses to build a package whose declared
#    `[[bench]]` or `[[example]]` targets have no file, so each one declared
#    in Cargo.toml gets a stub too (found by the awk line; they are never
#    built here). .ci/run runs this step as it is, so a new target that
#    breaks it fails CI.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches examples \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && awk '/^\[/ { dir = "" } /^\[\[bench\]\]/ { dir = "benches" } /^\[\[example\]\]/ { dir = "examples" } dir != "" && /^name *=/ { gsub(/[" ]/, ""); sub(/^name=/, ""); print dir "/" $0 ".rs"; dir = "" }' Cargo.toml \
       | while read -r stub; do echo 'fn main() {}' > "$stub"; done \
    && cargo build --release --locked --bin whydenied \
    && rm -rf src

# 2. The crate itself: the same command CI runs. The sources are touched so
#    that cargo does not take them for older than the stub build above (COPY
#    keeps the files' original modification times). The binary embeds
#    config/whydenied.yaml (`whydenied demo`), so config/ is needed here.
COPY src ./src
COPY config ./config
RUN find src -name '*.rs' -exec touch {} + \
    && cargo build --release --locked --bin whydenied \
    && cp target/release/whydenied /usr/local/bin/whydenied

# --- Runtime -----------------------------------------------------------------
# distroless/cc: glibc, libgcc and CA certificates, no shell, no package
# manager. The :nonroot tag runs as uid/gid 65532. The binary needs nothing
# else (no OpenSSL or other system library).
FROM gcr.io/distroless/cc-debian12:nonroot

COPY --from=builder /usr/local/bin/whydenied /usr/local/bin/whydenied
COPY config/whydenied.yaml /etc/whydenied/whydenied.yaml

# Numeric, so that Kubernetes' runAsNonRoot can verify it without a passwd
# lookup.
USER 65532:65532

# 8080: the proxy. 9901: the admin listener, bound to 127.0.0.1 by the config
# (documented here; publishing it has no effect unless you pass
# `--admin 0.0.0.0:9901`, which exposes metrics and denial lookups).
EXPOSE 8080 9901

# Exec form: distroless has no shell. `whydenied health` GETs /healthz on the
# admin listener and gives up after 3 seconds.
HEALTHCHECK --interval=30s --timeout=5s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/whydenied", "health", "--admin", "http://127.0.0.1:9901"]

# SIGTERM (docker stop's default) makes the proxy stop accepting and lets
# in-flight requests finish within `shutdown_grace` (30s by default); give
# `docker stop -t 35` or more to let it.
ENTRYPOINT ["/usr/local/bin/whydenied"]
CMD ["serve", "--config", "/etc/whydenied/whydenied.yaml", "--listen", "0.0.0.0:8080"]
