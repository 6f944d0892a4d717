# da-server image: built from source on Debian bookworm, CPU backend only (DA_WITH_CUDA=OFF).
#
#   docker build -t da:dev .
#   docker run --rm -p 50051:50051 -p 9464:9464 da:dev
#   docker run --rm da:dev --help
#
# A CUDA image needs an nvidia/cuda base and DA_WITH_CUDA=ON; not drafted yet.

FROM debian:bookworm AS build

# The Debian packages of scripts/install-deps that the build needs (no test tools).
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      cmake g++ make pkg-config \
      libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler \
      libspdlog-dev libfmt-dev prometheus-cpp-dev libcli11-dev nlohmann-json3-dev libssl-dev \
      libgloo-dev \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY . .
RUN cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DDA_WITH_CUDA=OFF -DDA_BUILD_TESTS=OFF \
 && cmake --build build --target da-server da-client -j"$(nproc)" \
 && strip build/bin/da-server build/bin/da-client

FROM debian:bookworm-slim AS runtime

# Shared libraries the two binaries link against (gRPC, protobuf, Abseil, spdlog, prometheus-cpp,
# OpenSSL's libcrypto for the bearer-token digests, Gloo for multi-process serving).
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      libgrpc++1.51 libgrpc29 libprotobuf32 libabsl20220623 \
      libspdlog1.10 libfmt9 libprometheus-cpp-core1.0 libprometheus-cpp-pull1.0 libssl3 libgloo0 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin da

COPY --from=build /src/build/bin/da-server /src/build/bin/da-client /usr/local/bin/

USER 10001:10001
# gRPC (AttentionService, health, reflection) and Prometheus /metrics.
EXPOSE 50051 9464
# No HEALTHCHECK: Kubernetes probes the gRPC health service (deploy/kubernetes/deployment.yaml).
ENTRYPOINT ["/usr/local/bin/da-server"]
