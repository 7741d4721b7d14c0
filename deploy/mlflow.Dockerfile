# The plant's MLflow tracking server: PostgreSQL backend store (psycopg2), artefacts proxied to MinIO (boto3).
# Same pins as pyproject.toml's `mlflow-server` extra. Built by deploy/compose.yaml.
FROM python:3.11-slim-bookworm
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN pip install "mlflow>=2.14" "psycopg2-binary>=2.9.9" "boto3>=1.34" \
 && useradd --system --uid 10002 --user-group --create-home mlflow
USER mlflow
EXPOSE 5000
HEALTHCHECK --interval=15s --timeout=5s --start-period=90s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/health', timeout=4)"]
