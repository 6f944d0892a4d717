# da-server images, CPU or GPU, built from source in a multi-stage build.
#
#   docker build -t da-server:0.1.0-cpu .                           # Debian slim, CPU backend
#   docker build -t da-server:0.1.0-gpu --build-arg VARIANT=gpu .   # CUDA runtime, CUDA backend
#   docker build -t da-server:0.1.0-cpu --build-arg VERSION=0.1.0 --build-arg REVISION="$(git rev-parse HEAD)" .
#   docker run --rm -p 50051:50051 -p 9464:9464 da-server:0.1.0-cpu
#   docker run --rm --gpus all -p 50051:50051 -p 9464:9464 da-server:0.1.0-gpu
#
# The build stage installs what serving needs (scripts/install-deps serve) and builds only
# da-server and da-client; the runtime stage gets the two binaries and the shared libraries they
# load that its base image does not have (found by ldd at build time), nothing else. The GPU
# variant builds on NVIDIA's CUDA devel image with cuDNN and runs on the matching runtime image,
# which brings cuDNN, NCCL and the CUDA runtime; the driver comes from the host (--gpus).
# deploy/README.md says what has and has not been validated (no Docker engine on the build
# machines: hadolint only).

ARG VARIANT=cpu
ARG CUDA_IMAGE_TAG=13.0.1-cudnn
ARG CUDA_UBUNTU=ubuntu24.04

FROM debian:bookworm AS build-cpu
ENV DA_CMAKE_FLAGS="-DDA_WITH_CUDA=OFF"

FROM nvidia/cuda:${CUDA_IMAGE_TAG}-devel-${CUDA_UBUNTU} AS build-gpu
ENV DA_CMAKE_FLAGS="-DDA_WITH_CUDA=ON"

FROM debian:bookworm-slim AS runtime-cpu

FROM nvidia/cuda:${CUDA_IMAGE_TAG}-runtime-${CUDA_UBUNTU} AS runtime-gpu

# hadolint ignore=DL3006
FROM build-${VARIANT} AS build
ARG REVISION=unknown
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /src
COPY scripts/install-deps scripts/install-deps
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends binutils file \
 && scripts/install-deps serve \
 && rm -rf /var/lib/apt/lists/*
COPY . .
# Builds the two binaries, then gathers every shared library they load except the C library
# itself, the CUDA driver (the host's) and, on the GPU image, the CUDA libraries its runtime base
# already holds. Ninja, as `make` uses for a new build tree (install-deps brings it).
RUN cmake -G Ninja -S . -B build -DCMAKE_BUILD_TYPE=Release -DDA_BUILD_TESTS=OFF "${DA_CMAKE_FLAGS}" \
      -DDA_REVISION="${REVISION}" \
 && cmake --build build --target da-server da-client -j"$(nproc)" \
 && mkdir -p /out/bin /out/lib \
 && cp build/bin/da-server build/bin/da-client /out/bin/ \
 && strip /out/bin/da-server /out/bin/da-client \
 && ldd /out/bin/da-server /out/bin/da-client \
      | awk '/=> \// { print $3 }' | sort -u \
      | grep -Ev '/(libc|libm|libdl|libpthread|librt|libresolv|ld-linux-x86-64)\.so' \
      | grep -Ev '/(libcuda|libcudart|libcudnn[a-z_]*|libnvrtc[a-z-]*|libnccl|libcublas[A-Za-z]*)\.so' \
      | xargs -r cp -L -t /out/lib/

# hadolint ignore=DL3006
FROM runtime-${VARIANT} AS runtime
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=https://github.com/da-project/da
LABEL org.opencontainers.image.title="da-server" \
      org.opencontainers.image.description="Dilated (LongNet-style) attention over long sequences as a gRPC service" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
COPY --from=build /out/lib/ /usr/local/lib/da/
COPY --from=build /out/bin/ /usr/local/bin/
RUN echo /usr/local/lib/da > /etc/ld.so.conf.d/da.conf \
 && ldconfig \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin da
USER 10001:10001
# gRPC (AttentionService, health, reflection); HTTP /metrics, /livez and /readyz.
EXPOSE 50051 9464
# Readiness from the plaintext /readyz on the metrics port, which answers whether or not the gRPC
# port is TLS-only (--tls-cert); with the metrics port moved or off (--metrics-listen), override
# this check.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD ["/usr/local/bin/da-client", "health", "--http", "127.0.0.1:9464", "--service", "da.v1.AttentionService"]
ENTRYPOINT ["/usr/local/bin/da-server"]
