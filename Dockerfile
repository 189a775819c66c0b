# syntax=docker/dockerfile:1
#
# The `tensor-wasm` binary (proxy, executor, up and the client commands) on
# Debian bookworm, as a non-root user.
#
#   docker build -t tensor-wasm:0.1.0 .                                # CPU backend
#   docker build -t tensor-wasm:0.1.0-cuda --build-arg FEATURES=cuda .  # + CUDA backend
#
# The CUDA image carries NVRTC and cuBLAS (CUDA 13, from NVIDIA's wheels);
# the driver (libcuda, NVML) comes from the host through the NVIDIA
# container toolkit.

ARG RUST_VERSION=1.95
# Cargo features of the binary: empty, or `cuda`.
ARG FEATURES=""

FROM rust:${RUST_VERSION}-bookworm AS builder
RUN apt-get update \
 && apt-get install -y --no-install-recommends libopenblas-dev cmake pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
ARG FEATURES
# The commit, for --version and build_info (the context has no .git).
ARG GIT_SHA=unknown
ENV TENSOR_WASM_GIT_SHA=${GIT_SHA}
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p tensor-wasm ${FEATURES:+--features "$FEATURES"} \
 && cp target/release/tensor-wasm /usr/local/bin/tensor-wasm

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends libopenblas0 ca-certificates \
 && rm -rf /var/lib/apt/lists/*
# uid/gid 10001, matching the Kubernetes manifests' runAsUser; home and
# state under /var/lib/tensor-wasm (mount volumes on proxy/ or executor/:
# the image is meant to run with a read-only root filesystem, and a fresh
# named volume takes the owner of the folder it is mounted on).
RUN groupadd --system --gid 10001 tensor-wasm \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/tensor-wasm \
      --no-create-home --shell /usr/sbin/nologin tensor-wasm \
 && install -d -o tensor-wasm -g tensor-wasm -m 0750 /var/lib/tensor-wasm \
      /var/lib/tensor-wasm/proxy /var/lib/tensor-wasm/executor /var/cache/tensor-wasm
COPY --from=builder /usr/local/bin/tensor-wasm /usr/local/bin/tensor-wasm
ENV HOME=/var/lib/tensor-wasm \
    TENSOR_WASM_KERNEL_CACHE_DIR=/var/cache/tensor-wasm/kernels
USER 10001:10001
WORKDIR /var/lib/tensor-wasm
# 8080 public (proxy), 9090 admin (proxy), 7070 executor.
EXPOSE 8080 9090 7070
ENTRYPOINT ["/usr/local/bin/tensor-wasm"]
CMD ["--help"]

# NVRTC and cuBLAS for the CUDA backend, which loads them at run time.
FROM debian:bookworm-slim AS cuda-libs
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-pip \
 && rm -rf /var/lib/apt/lists/*
RUN pip3 install --break-system-packages --no-cache-dir --no-deps --target /opt/nvidia \
      "nvidia-cuda-nvrtc==13.0.*" "nvidia-cublas==13.0.*"

FROM runtime AS runtime-cuda
COPY --from=cuda-libs /opt/nvidia/nvidia/cu13/lib/ /usr/local/lib/tensor-wasm/cuda/
ENV LD_LIBRARY_PATH=/usr/local/lib/tensor-wasm/cuda \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# The image: `runtime`, or `runtime-cuda` when FEATURES is set.
FROM runtime${FEATURES:+-cuda}
