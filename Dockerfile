# syntax=docker/dockerfile:1
# BDI backend image, two targets (docs/deploy.md "GPU box"):
#   docker build -t bdi:gpu .                 # default: CUDA runtime base, CUDA torch, faiss-gpu
#   docker build -t bdi:cpu --target cpu .    # Debian slim, CPU torch, faiss-cpu
# Multi-stage: each *-builder stage makes /opt/venv (wheels only, no compiler needed); the final stages copy
# that venv onto a clean base with no build tools, pip cache or sources, and run as a non-root user.
# FAISS: the two wheels install the same `faiss` package, so each target installs exactly one (the `cpu` or
# `gpu` extra of pyproject.toml) and a build step proves which build `import faiss` loads.
# (Not built in this repository's CI: its machines have no Docker engine; tests/deploy/test_deploy_files.py
# checks this file's structure.)
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_RUNTIME_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

# ------------------------------------------------------------------------------------------------ CPU
FROM ${PYTHON_IMAGE} AS cpu-builder
ARG TORCH_CPU_INDEX
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /build
COPY pyproject.toml README.md ./
COPY src ./src
COPY serving ./serving
COPY pipelines ./pipelines
# CPU wheels of the pinned torch pair first (torch==2.14.1 is satisfied by 2.14.1+cpu), then BDI with faiss-cpu
# and the exported runtimes (BDI_RUNTIME=auto); the pipeline and plots extras are not the server's.
RUN pip install --index-url "${TORCH_CPU_INDEX}" torch==2.14.1 torchvision==0.29.1 \
 && pip install ".[cpu,runtime]"
RUN python -c "import faiss; assert not hasattr(faiss, 'StandardGpuResources'); print('faiss', faiss.__version__, 'CPU build')"

FROM ${PYTHON_IMAGE} AS cpu
COPY --from=cpu-builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 \
    BDI_MODELS_DIR=/data/models BDI_GUI_LOG_DIR=/data/logs BDI_WEIGHTS_CACHE_DIR=/weights \
    BDI_BACKEND_HOST=0.0.0.0 BDI_BACKEND_PORT=8000 BDI_DEVICE=cpu BDI_REQUIRE_CUDA=0
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/bdi bdi \
 && mkdir -p /data/models /data/logs /weights && chown -R bdi:bdi /data /weights
USER bdi
WORKDIR /home/bdi
# Mount the official dinov2_vits14_pretrain.pth at /weights (BDI_WEIGHTS=official finds it there,
# sha256-checked) or set BDI_WEIGHTS to a file path; BDI_WEIGHTS=random for a smoke test.
VOLUME ["/data", "/weights"]
EXPOSE 8000
# start period: loading the backbone and the first registry sync happen before /health answers; with
# BDI_AUTH=required /health answers 401 without a key, which still says the server is up
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request as r, urllib.error as e\ntry: r.urlopen('http://127.0.0.1:8000/health', timeout=4)\nexcept e.HTTPError as x: raise SystemExit(x.code != 401)"]
CMD ["python", "-m", "serving", "--workers", "2"]

# ------------------------------------------------------------------------------------------------ GPU
FROM ${CUDA_RUNTIME_IMAGE} AS gpu-builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 DEBIAN_FRONTEND=noninteractive
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /build
COPY pyproject.toml README.md ./
COPY src ./src
COPY serving ./serving
COPY pipelines ./pipelines
# torch 2.14.1 from PyPI is a CUDA build on x86_64; the `gpu` extra brings faiss-gpu-cu12 and never faiss-cpu.
RUN pip install ".[gpu,runtime]"
# No GPU is visible while building: check the build itself (the GPU classes exist) and that no CPU wheel is there.
RUN python -c "import faiss; assert hasattr(faiss, 'StandardGpuResources'), 'faiss is the CPU build'; print('faiss', faiss.__version__, 'GPU build')" \
 && ! pip show -q faiss-cpu

FROM ${CUDA_RUNTIME_IMAGE} AS gpu
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=gpu-builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 \
    BDI_MODELS_DIR=/data/models BDI_GUI_LOG_DIR=/data/logs BDI_WEIGHTS_CACHE_DIR=/weights \
    BDI_BACKEND_HOST=0.0.0.0 BDI_BACKEND_PORT=8000 BDI_DEVICE=cuda BDI_REQUIRE_CUDA=1
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/bdi bdi \
 && mkdir -p /data/models /data/logs /weights && chown -R bdi:bdi /data /weights
USER bdi
WORKDIR /home/bdi
VOLUME ["/data", "/weights"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import urllib.request as r, urllib.error as e\ntry: r.urlopen('http://127.0.0.1:8000/health', timeout=4)\nexcept e.HTTPError as x: raise SystemExit(x.code != 401)"]
CMD ["python", "-m", "serving", "--workers", "2"]
