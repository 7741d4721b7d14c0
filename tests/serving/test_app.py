"""App assembly: lifespan from Settings, CUDA requirement, cheap import, ``python -m serving``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from bdi.config import Settings
from serving.__main__ import parse_args
from serving.app import CudaRequiredError, create_app
from serving.settings import ServingSettings
from tests.helpers.tiny import tiny_settings

from .conftest import ClientFactory

HOST_PORT_ENV = ("BDI_BACKEND_HOST", "BDI_BACKEND_PORT", "BRAKEDISC_BACKEND_HOST", "BRAKEDISC_BACKEND_PORT",
                 "HOST", "PORT")


def test_lifespan_builds_the_service_from_settings_and_logs_startup(tmp_path: Path) -> None:
    settings = tiny_settings(tmp_path / "models", log_dir=tmp_path / "logs")
    with TestClient(create_app(settings)) as client:
        body = client.get("/health").json()
        assert body["status"] == "ok" and body["weights"]["source"] == "random"
    events = [json.loads(line) for line in (tmp_path / "logs" / "backend_diagnostics.jsonl").read_text().splitlines()]
    (startup,) = [e for e in events if e["event"] == "startup"]
    assert startup["models_dir"] == str((tmp_path / "models").absolute())
    assert startup["resolved_log_file"].endswith("backend_diagnostics.jsonl")
    http = [e for e in events if e["event"] == "http"]
    assert http and http[0]["path"] == "/health" and http[0]["status_code"] == 200
    assert http[0]["request_id"] == body["request_id"] and "elapsed_ms" in http[0]


def test_require_cuda_without_cuda_fails_startup(tmp_path: Path) -> None:
    settings = tiny_settings(tmp_path / "models", log_dir=tmp_path / "logs", require_cuda=True)
    with pytest.raises(CudaRequiredError, match="BDI_REQUIRE_CUDA"):
        with TestClient(create_app(settings)):
            pass


def test_module_app_reads_no_settings_at_import() -> None:
    import serving.app as module

    assert not hasattr(module.app.state, "settings")
    assert not hasattr(module.app.state, "service")


def test_request_events_carry_request_and_recipe_ids(tmp_path: Path, client_factory: ClientFactory) -> None:
    client = client_factory()
    client.post("/calibrate_ng", json={"role_id": "R", "roi_id": "x", "ok_scores": [1.0]},
                headers={"X-Request-Id": "rid-log", "X-Recipe-Id": "Line1"})
    events = [json.loads(line) for line in (tmp_path / "logs" / "backend_diagnostics.jsonl").read_text().splitlines()]
    mine = [e for e in events if e.get("request_id") == "rid-log"]
    names = {e["event"] for e in mine}
    assert {"calibrate_ng.request", "calibrate.saved", "calibrate_ng.response", "http"} <= names
    assert all(e["recipe_id"] == "line1" for e in mine)
    assert all(e["roi_id"] == "x" for e in mine if e["event"].startswith("calibrat"))


@pytest.mark.parametrize(
    ("env", "host", "port"),
    [
        ({}, "127.0.0.1", 8000),
        ({"BDI_BACKEND_HOST": "0.0.0.0", "BDI_BACKEND_PORT": "9001"}, "0.0.0.0", 9001),
        ({"BRAKEDISC_BACKEND_HOST": "10.0.0.1", "BRAKEDISC_BACKEND_PORT": "9002"}, "10.0.0.1", 9002),
        ({"HOST": "::1", "PORT": "9003"}, "::1", 9003),
        ({"BDI_BACKEND_PORT": "not-a-port"}, "127.0.0.1", 8000),
    ],
    ids=["defaults", "bdi", "legacy", "plain", "invalid-port"],
)
def test_python_m_serving_takes_host_and_port_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], host: str, port: int
) -> None:
    for name in (*HOST_PORT_ENV, "BDI_CONFIG", "BDI_WORKERS", "BRAKEDISC_WORKERS", "WEB_CONCURRENCY"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    serving_settings = ServingSettings()
    assert (serving_settings.backend_host, serving_settings.backend_port) == (host, port)
    args = parse_args([], settings=Settings(), serving_settings=serving_settings)
    assert (args.host, args.port, args.workers) == (host, port, 1)
    args = parse_args(["--workers", "3", "--port", "7000"], settings=Settings(), serving_settings=serving_settings)
    assert (args.workers, args.port) == (3, 7000)


def test_host_and_port_are_read_from_the_config_file_and_the_environment_wins(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in (*HOST_PORT_ENV, "BDI_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    config = tmp_path / "app.yaml"
    config.write_text("server:\n  backend_host: 0.0.0.0\n  backend_port: 9010\ncoreset_rate: 0.2\n")
    monkeypatch.setenv("BDI_CONFIG", str(config))
    assert (ServingSettings().backend_host, ServingSettings().backend_port) == ("0.0.0.0", 9010)
    assert Settings().model.memory.coreset_rate == 0.2  # the library's settings accept the server's keys
    monkeypatch.setenv("PORT", "9011")
    assert ServingSettings().backend_port == 9011


def test_library_settings_know_no_server_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BDI_BACKEND_HOST", "0.0.0.0")
    assert not {"backend_host", "backend_port"} & set(Settings.model_fields)
    assert not hasattr(Settings(), "backend_host")


def test_cors_origins_are_read_from_the_bdi_and_legacy_names_and_the_config_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in ("BDI_CORS_ORIGINS", "BRAKEDISC_CORS_ORIGINS", "CORS_ORIGINS", "cors_origins", "BDI_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("cors_origins", "http://bare.local")  # a field's bare name is never read
    assert ServingSettings().cors_origins == "*"
    config = tmp_path / "app.yaml"
    config.write_text("cors_origins: http://file.local\ncoreset_rate: 0.2\n")
    monkeypatch.setenv("BDI_CONFIG", str(config))
    assert ServingSettings().cors_origins == "http://file.local"
    assert Settings().model.memory.coreset_rate == 0.2  # the library's settings accept the server's key
    monkeypatch.setenv("BRAKEDISC_CORS_ORIGINS", "http://legacy.local")
    assert ServingSettings().cors_origins == "http://legacy.local"
    monkeypatch.setenv("BDI_CORS_ORIGINS", "http://gui.local")
    assert ServingSettings().cors_origins == "http://gui.local"
