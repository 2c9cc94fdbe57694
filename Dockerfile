# syntax=docker/dockerfile:1.7
#
# The one Shoal image: `shoal` (node, gateway, function host, job and client CLI), `shoal-operator`
# and the eBPF object, non-root (uid/gid 65532, the chart's runAsUser/runAsGroup). The chart runs
# every process from it (image.repository, image.tag).
#
#   docker build -t registry.example.com/acme/shoal:0.1.0 .
#   docker push registry.example.com/acme/shoal:0.1.0
#   helm install shoal charts/shoal --set image.repository=registry.example.com/acme/shoal
#
# Builder and runtime are the same Debian release, so the glibc the binaries were linked against
# is the one they load (they need libc, libm and libgcc_s; ring's C parts are linked statically).
# The eBPF object is compiled into `shoal` (include_bytes of the committed, stripped
# ebpf/bpf/shoal.bpf.o; no clang at image build); the copy under /usr/lib/shoal is for
# inspection (`bpftool prog load`, `llvm-objdump -d`).

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM docker.io/library/rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS build
WORKDIR /src
COPY . .
# `cargo build --release` of the two binaries (the workspace's default members leave the operator
# out, hence -p). Debug info is stripped for the image only; the binaries are otherwise those of
# the release profile.
ENV CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=debuginfo
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p shoal-cli -p shoal-operator --bin shoal --bin shoal-operator \
    && install -D -m 0755 target/release/shoal /out/shoal \
    && install -D -m 0755 target/release/shoal-operator /out/shoal-operator

FROM docker.io/library/debian:${DEBIAN_RELEASE}-slim
# ca-certificates: TLS to NATS and the API server with the platform's roots (rustls-native-certs).
# coreutils (in the base): the gateway's init container chowns the node's /dev/shm/shoal with sh.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/shoal /out/shoal-operator /usr/local/bin/
COPY ebpf/bpf/shoal.bpf.o /usr/lib/shoal/shoal.bpf.o
USER 65532:65532
LABEL org.opencontainers.image.title="shoal" \
      org.opencontainers.image.description="Shoal federated-learning aggregation: node, gateway, function host, operator" \
      org.opencontainers.image.licenses="Apache-2.0"
CMD ["shoal", "--help"]
