"""/health stays O(1), answers while the same process is busy fitting, and names what runs the feature net."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
from fastapi.testclient import TestClient

from bdi.patchcore.features import FeatureExtractor
from bdi.runtime.select import ensure_export
from serving.app import create_app
from tests.helpers.exports import perturb_export
from tests.helpers.synthetic import disc_png
from tests.helpers.tiny import tiny_settings

from .conftest import ROI, ROLE, calibrate_ng, fit_from_dataset, infer, upload


def test_health_answers_during_a_fit_in_the_same_process(client: TestClient) -> None:
    images = [("images", (f"{i}.png", disc_png(seed=i), "image/png")) for i in range(120)]
    outcome: dict[str, httpx.Response] = {}

    def run_fit() -> None:
        outcome["fit"] = client.post("/fit_ok", data={"role_id": ROLE, "roi_id": ROI, "mm_per_px": "0.2"},
                                     files=images)

    fit_thread = threading.Thread(target=run_fit, daemon=True)
    fit_thread.start()
    answered_during_fit = 0
    deadline = time.monotonic() + 120
    while fit_thread.is_alive() and time.monotonic() < deadline:
        assert client.get("/health").status_code == 200
        answered_during_fit += fit_thread.is_alive()  # answered before the fit ended: not queued behind it
        time.sleep(0.02)
    fit_thread.join(timeout=120)
    assert outcome["fit"].status_code == 200
    # a /health queued behind the fit could complete at most once while it runs (no wall-clock bound: the
    # machine may be loaded; the behaviour is that /health does not wait for the fit)
    assert answered_during_fit >= 2, "/health did not answer while the fit was running"


def test_health_touches_no_disk(client: TestClient, models_dir: Any) -> None:
    assert client.get("/health").status_code == 200
    assert not models_dir.exists()


def _served_with_runtime(tmp_path: Path, *, runtime: str, perturb: bool = False) -> TestClient:
    """A real app whose service is built from settings (as a server starts), on the tiny model."""
    settings = tiny_settings(tmp_path / "models", runtime=runtime, log_dir=tmp_path / "logs")
    if perturb:  # an export in the machine's cache whose numbers differ from torch
        extractor = FeatureExtractor(settings.model.features, cache_dir=settings.weights_cache_dir)
        perturb_export(ensure_export(extractor, root=settings.exports_dir()).path)
    return TestClient(create_app(settings))


def test_health_names_the_runtime_in_use(tmp_path: Path) -> None:
    with _served_with_runtime(tmp_path, runtime="onnxruntime") as client:
        body = client.get("/health").json()
    assert (body["runtime"], body["runtime_requested"], body["runtime_fallback"]) == ("onnxruntime", "onnxruntime",
                                                                                      None)
    assert body["runtime_parity"]["onnxruntime"]["passed"] is True
    assert body["runtime_parity"]["onnxruntime"]["score_rel_err"] <= 1e-3
    assert body["runtime_precision"] == "fp32"


def test_health_says_when_a_failed_parity_fell_back_to_torch_and_infer_still_serves(tmp_path: Path) -> None:
    with _served_with_runtime(tmp_path, runtime="openvino", perturb=True) as client:
        body = client.get("/health").json()
        upload(client, "ok", seeds=range(10))
        assert fit_from_dataset(client).status_code == 200
        assert calibrate_ng(client, ok_scores=[0.2, 0.3], ng_scores=[0.9]).status_code == 200
        response = infer(client, disc_png(seed=50))
    assert (body["runtime"], body["runtime_requested"]) == ("torch", "openvino")
    assert "parity check failed" in body["runtime_fallback"]
    assert body["runtime_parity"]["openvino"]["passed"] is False
    assert response.status_code == 200, response.text
