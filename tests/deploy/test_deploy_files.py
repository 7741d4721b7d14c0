"""The deployment files, checked without a Docker engine: the compose file parses and names every service of
the plant, the Dockerfile has the structure the issue asks for, and docs/deploy.md shows the commands
that tests/deploy/test_plant_sync.py runs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import tomllib
import yaml

from tests.helpers.servers import MlflowServer

PROJECT = Path(__file__).resolve().parents[2]
DEPLOY = PROJECT / "deploy"


def _compose() -> dict:
    data = yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def _stages() -> dict[str, list[str]]:
    """Dockerfile stage name → its instruction lines (continuations joined)."""
    text = (PROJECT / "Dockerfile").read_text(encoding="utf-8").replace("\\\n", " ")
    stages: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)", line, re.IGNORECASE)
        if match:
            current = stages.setdefault(match.group(2), [line])
        elif current is not None:
            current.append(line)
    return stages


def test_compose_names_every_service_of_the_plant() -> None:
    services = _compose()["services"]
    assert {"postgres", "minio", "mlflow", "bdi-a", "bdi-b", "nginx"} <= set(services)


def test_mlflow_runs_on_postgresql_with_artefacts_in_minio() -> None:
    mlflow = _compose()["services"]["mlflow"]
    command = " ".join(mlflow["command"].split())
    assert "--backend-store-uri postgresql+psycopg2://" in command and "@postgres:5432/" in command
    assert "--artifacts-destination s3://" in command and "--serve-artifacts" in command
    assert mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert {"postgres", "minio-init"} <= set(mlflow["depends_on"])
    assert "psycopg2-binary" in (DEPLOY / "mlflow.Dockerfile").read_text(encoding="utf-8")


def test_each_replica_has_its_own_models_volume_and_follows_the_registry() -> None:
    compose = _compose()
    volumes = []
    for name in ("bdi-a", "bdi-b"):
        service = compose["services"][name]
        env = service["environment"]
        assert env["BDI_MLFLOW_TRACKING_URI"] == "http://mlflow:5000" and env["BDI_REGISTRY_SYNC_ON_START"] == "1"
        assert float(env["BDI_REGISTRY_SYNC_INTERVAL_S"]) > 0
        [data] = [v.split(":")[0] for v in service["volumes"] if v.split(":")[1] == "/data"]
        volumes.append(data)
        assert data in compose["volumes"]
    assert len(set(volumes)) == 2


def test_nginx_fronts_both_replicas() -> None:
    nginx = _compose()["services"]["nginx"]
    assert any(v.startswith("./nginx.conf:") for v in nginx["volumes"])
    assert {"bdi-a", "bdi-b"} <= set(nginx["depends_on"])
    conf = (DEPLOY / "nginx.conf").read_text(encoding="utf-8")
    assert "server bdi-a:8000" in conf and "server bdi-b:8000" in conf


def test_dockerfile_has_a_cuda_runtime_gpu_target_and_a_cpu_target() -> None:
    stages = _stages()
    assert list(stages)[-1] == "gpu"  # the default target
    text = (PROJECT / "Dockerfile").read_text(encoding="utf-8")
    cuda = re.search(r"ARG CUDA_RUNTIME_IMAGE=(\S+)", text)
    assert cuda and cuda.group(1).startswith("nvidia/cuda:") and "runtime" in cuda.group(1)
    assert stages["gpu"][0].startswith("FROM ${CUDA_RUNTIME_IMAGE}") and "cpu" in stages


def test_faiss_gpu_is_installed_alone_and_proven_to_be_the_gpu_build() -> None:
    text = (PROJECT / "Dockerfile").read_text(encoding="utf-8")
    assert "uninstall" not in text
    builder = " ".join(_stages()["gpu-builder"])
    assert '.[gpu,runtime]' in builder and "StandardGpuResources" in builder and "import faiss" in builder
    project = tomllib.loads((PROJECT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert not any(d.startswith("faiss") for d in project["dependencies"])
    assert project["optional-dependencies"]["gpu"] == ["faiss-gpu-cu12>=1.8"]
    assert project["optional-dependencies"]["cpu"] == ["faiss-cpu>=1.8"]


def test_final_stages_run_as_non_root_with_a_healthcheck_and_no_build_tools() -> None:
    for name in ("cpu", "gpu"):
        lines = _stages()[name]
        users = [line.split()[1] for line in lines if line.startswith("USER ")]
        assert users and users[-1] not in ("root", "0")
        [health] = [line for line in lines if line.startswith("HEALTHCHECK")]
        assert "--start-period=" in health and "/health" in health
        body = " ".join(lines)
        assert not re.search(r"build-essential|gcc|g\+\+|python3-dev|pip install", body), name
        assert any(line.startswith("COPY --from=") and "/opt/venv" in line for line in lines)


def test_deploy_page_shows_the_commands_the_plant_test_runs() -> None:
    section = (PROJECT / "docs" / "deploy.md").read_text(encoding="utf-8")
    # the mlflow server command tests/deploy/test_plant_sync.py starts, with any values in the placeholders
    pattern = re.escape(MlflowServer.COMMAND).replace(r"\{backend\}", r"postgresql\+psycopg2://\S+")
    pattern = re.sub(r"\\\{\w+\\\}", r"\\S+", pattern)
    assert re.search(pattern, " ".join(section.split())), MlflowServer.COMMAND
    for fragment in ("BDI_REGISTRY_SYNC_ON_START=1", "BDI_REGISTRY_SYNC_INTERVAL_S=", "bdi promote",
                     "--skip-gate", "docker build --target cpu", "docker compose -f deploy/compose.yaml up",
                     "readinessProbe", "bdi sync --watch"):
        assert fragment in section, fragment


def test_nginx_bounds_slow_and_greedy_clients() -> None:
    """Issue 30: a body that stalls, headers that never end, too many connections or requests per address."""
    conf = (DEPLOY / "nginx.conf").read_text(encoding="utf-8")
    for directive in ("client_header_timeout", "client_body_timeout", "limit_conn_zone", "limit_req_zone",
                      "limit_conn bdi_conn", "limit_req zone=bdi_req"):
        assert re.search(rf"^\s*{re.escape(directive)}\b", conf, re.MULTILINE), directive


def _self_signed(cert: Path, key: Path) -> None:
    """A throw-away certificate where compose mounts BDI_TLS_CERT / BDI_TLS_KEY."""
    argv = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=bdi",
            "-keyout", str(key), "-out", str(cert)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr


def test_nginx_terminates_tls_and_forwards_the_client_address_to_trusted_servers() -> None:
    """Issue 28: TLS at the edge; the servers believe X-Forwarded-For from nginx's address only."""
    conf = (DEPLOY / "nginx.conf").read_text(encoding="utf-8")
    for directive in ("listen 443 ssl", "ssl_certificate /etc/nginx/tls/bdi.crt",
                      "ssl_certificate_key /etc/nginx/tls/bdi.key", "proxy_set_header X-Forwarded-For $remote_addr",
                      "proxy_set_header X-Forwarded-Proto $scheme"):
        assert re.search(rf"^\s*{re.escape(directive)}\b", conf, re.MULTILINE), directive
    compose = _compose()
    nginx = compose["services"]["nginx"]
    assert any(v.endswith(":/etc/nginx/tls/bdi.crt:ro") and "BDI_TLS_CERT" in v for v in nginx["volumes"])
    proxy_ip = nginx["networks"]["default"]["ipv4_address"]
    for name in ("bdi-a", "bdi-b"):
        env = compose["services"][name]["environment"]
        assert env["BDI_TRUSTED_PROXIES"] == proxy_ip and env["BDI_SECURITY_DIR"] == "/security"


def test_nginx_accepts_the_config(tmp_path: Path) -> None:
    """``nginx -t`` on the config as compose mounts it (inside ``http``), the replicas' names resolved to
    loopback as the compose network would resolve them."""
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").is_file() else None)
    if nginx is None:
        reason = "nginx is not installed (apt-get install nginx-light)"
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(f"{reason}; CI=true: .ci/run installs it", pytrace=False)
        pytest.skip(reason)
    site = (DEPLOY / "nginx.conf").read_text(encoding="utf-8")
    site = re.sub(r"\bbdi-[ab]:8000", "127.0.0.1:8000", site).replace("/etc/nginx/tls/", f"{tmp_path}/")
    _self_signed(tmp_path / "bdi.crt", tmp_path / "bdi.key")
    (tmp_path / "default.conf").write_text(site, encoding="utf-8")
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log stderr;\nevents {{}}\n"
        f"http {{\n  access_log off;\n  include {tmp_path}/default.conf;\n}}\n", encoding="utf-8")
    out = subprocess.run([nginx, "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert "test is successful" in out.stderr
