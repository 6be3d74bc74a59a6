# warmtune: one image for the API replicas and the update workers.
# CUDA PyTorch base: the worker fine-tunes on the GPU and the API serves on it where there is one;
# both fall back to the CPU on a host without a GPU. `make compose-test` builds on a Debian base
# made on the machine instead (BASE_IMAGE; PIP_EXTRA points pip at wheels on its disk).
ARG BASE_IMAGE=pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime
FROM ${BASE_IMAGE}

# PIP_BREAK_SYSTEM_PACKAGES: a Debian base's Python is the image's own, as the CUDA base's is.
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_BREAK_SYSTEM_PACKAGES=1 \
    WARMTUNE_HOME=/data

RUN apt-get update && apt-get install -y --no-install-recommends curl && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# The pins: torch 2.14.1 and torchvision 0.29.1, whatever the base image brought. PyTorch first, in
# a layer of its own that a change of warmtune's code leaves cached. (An ARG changes the cache key
# of every RUN after it: declared here, it keeps apt's layer cached.)
COPY constraints.txt ./
ARG PIP_EXTRA=""
RUN pip install ${PIP_EXTRA} -c constraints.txt torch torchvision
COPY pyproject.toml README.md ./
COPY app ./app
COPY worker ./worker
COPY bench ./bench
RUN pip install ${PIP_EXTRA} -c constraints.txt .

RUN useradd --create-home --uid 10001 warmtune && mkdir -p /data && chown warmtune /data
USER warmtune
VOLUME /data
EXPOSE 8000

HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8000/healthz || exit 1

# API keys are required to listen beyond loopback: set WARMTUNE_API_KEYS.
CMD ["warmtune", "serve", "--host", "0.0.0.0", "--port", "8000"]
