"""Serving fixtures: a real app around the shared tiny ViT, on a fresh models dir per test."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from bdi.patchcore.features import FeatureExtractor
from bdi.service import InspectionService
from serving.app import create_app
from serving.settings import ServingSettings
from tests.helpers.synthetic import disc_png
from tests.helpers.tiny import tiny_settings

ROLE, ROI = "Inspection", "inspection-1"
BASE = "SW5zcGVjdGlvbg__aW5zcGVjdGlvbi0x"  # b64(role) + "__" + b64(roi), docs/contract.md "Files"
MM = 0.2
TOKENS = 64  # tiny ViT: 112 px input / 14 px patches = 8 × 8 tokens per image
ANNULUS = {"kind": "annulus", "cx": 48, "cy": 48, "r": 44, "r_inner": 12}

ClientFactory = Callable[..., TestClient]


@pytest.fixture()
def client_factory(tmp_path: Path, tiny_extractor: FeatureExtractor) -> Iterator[ClientFactory]:
    """``make(**settings_overrides)`` → a started TestClient on ``tmp_path/models`` (lifespan run)."""
    stack: list[TestClient] = []

    def make(*, raise_server_exceptions: bool = True, **overrides: Any) -> TestClient:
        overrides.setdefault("log_dir", tmp_path / "logs")
        overrides.setdefault("metrics_dir", tmp_path / "metrics")  # this test's Prometheus values only
        serving = {k: overrides.pop(k) for k in list(overrides) if k in ServingSettings.model_fields}
        settings = tiny_settings(overrides.pop("models_dir", tmp_path / "models"), **overrides)
        service = InspectionService(settings=settings, extractor=tiny_extractor)
        app = create_app(service=service, serving_settings=ServingSettings(**serving) if serving else None)
        client = TestClient(app, raise_server_exceptions=raise_server_exceptions)
        client.__enter__()
        stack.append(client)
        return client

    yield make
    for client in reversed(stack):
        client.__exit__(None, None, None)


@pytest.fixture()
def client(client_factory: ClientFactory) -> TestClient:
    return client_factory()


@pytest.fixture()
def models_dir(tmp_path: Path) -> Path:
    return tmp_path / "models"


def meta(**fields: Any) -> str:
    """A GUI-like sidecar meta (JSON text) with an annulus shape_json string."""
    body: dict[str, Any] = {"mm_per_px": MM, "shape_json": json.dumps(ANNULUS)}
    body.update(fields)
    return json.dumps(body)


def upload(
    client: TestClient,
    label: str,
    *,
    seeds: range | list[int],
    role_id: str = ROLE,
    roi_id: str = ROI,
    defect: str | None = None,
    with_meta: bool = True,
    headers: dict[str, str] | None = None,
) -> list[str]:
    """Upload one sample per seed (one call each, like the GUI) and return the stored names."""
    saved: list[str] = []
    for seed in seeds:
        data: dict[str, Any] = {"role_id": role_id, "roi_id": roi_id}
        if with_meta:
            data["metas"] = [meta()]
        files = [("images", (f"sample_{seed}.png", disc_png(seed=seed, defect=defect), "image/png"))]
        response = client.post(f"/datasets/{label}/upload", data=data, files=files, headers=headers)
        assert response.status_code == 200, response.text
        saved.extend(response.json()["saved"])
    return saved


def fit_from_dataset(
    client: TestClient, *, role_id: str = ROLE, roi_id: str = ROI, mm_per_px: float = MM, **form: Any
) -> httpx.Response:
    data = {"role_id": role_id, "roi_id": roi_id, "mm_per_px": str(mm_per_px), "use_dataset": "true", **form}
    return client.post("/fit_ok", data=data)


def infer(
    client: TestClient,
    image: bytes,
    *,
    role_id: str = ROLE,
    roi_id: str = ROI,
    mm_per_px: float = MM,
    headers: dict[str, str] | None = None,
    **form: Any,
) -> httpx.Response:
    data = {"role_id": role_id, "roi_id": roi_id, "mm_per_px": str(mm_per_px), **form}
    return client.post("/infer", data=data, files={"image": ("crop.png", image, "image/png")}, headers=headers)


def calibrate_ng(client: TestClient, **body: Any) -> httpx.Response:
    payload = {"role_id": ROLE, "roi_id": ROI, **body}
    return client.post("/calibrate_ng", json=payload)


@pytest.fixture()
def fitted(client: TestClient) -> TestClient:
    """10 OK samples uploaded and fitted (not calibrated)."""
    upload(client, "ok", seeds=range(10))
    response = fit_from_dataset(client)
    assert response.status_code == 200, response.text
    return client


@pytest.fixture()
def calibrated(fitted: TestClient) -> TestClient:
    """Fitted, plus one NG sample and a dataset calibration (threshold > 0)."""
    upload(fitted, "ng", seeds=[100], defect="scratch")
    response = fitted.post("/calibrate_dataset", json={"role_id": ROLE, "roi_id": ROI})
    assert response.status_code == 200, response.text
    return fitted
