# BDI backend image. GPU by default: torch 2.14.1 from PyPI is a CUDA build on x86_64, and the
# `gpu` extra swaps in faiss-gpu. Build a CPU-only image with --build-arg EXTRAS=test.
# (Not built in this repository's CI: its machines have no Docker engine.)
FROM python:3.11-slim

ARG EXTRAS=gpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \
    BDI_MODELS_DIR=/data/models BDI_BACKEND_HOST=0.0.0.0 BDI_BACKEND_PORT=8000 \
    BDI_WEIGHTS_CACHE_DIR=/weights

WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
COPY serving ./serving
COPY pipelines ./pipelines
COPY conf ./conf
RUN pip install --no-cache-dir -e ".[${EXTRAS}]" \
 && if [ "${EXTRAS}" = "gpu" ]; then pip uninstall -y faiss-cpu; fi

# Mount the official dinov2_vits14_pretrain.pth at /weights (BDI_WEIGHTS=official finds it there,
# sha256-checked) or set BDI_WEIGHTS to a file path; BDI_WEIGHTS=random for a smoke test.
VOLUME ["/data", "/weights"]
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)" || exit 1
CMD ["python", "-m", "serving", "--workers", "2"]
