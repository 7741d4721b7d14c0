"""/health stays O(1) and answers while the same process is busy fitting."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
from fastapi.testclient import TestClient

from tests.helpers.synthetic import disc_png

from .conftest import ROI, ROLE


def test_health_answers_during_a_fit_in_the_same_process(client: TestClient) -> None:
    images = [("images", (f"{i}.png", disc_png(seed=i), "image/png")) for i in range(120)]
    outcome: dict[str, httpx.Response] = {}

    def run_fit() -> None:
        outcome["fit"] = client.post("/fit_ok", data={"role_id": ROLE, "roi_id": ROI, "mm_per_px": "0.2"},
                                     files=images)

    fit_thread = threading.Thread(target=run_fit, daemon=True)
    fit_thread.start()
    overlapping: list[float] = []
    deadline = time.monotonic() + 60
    while fit_thread.is_alive() and time.monotonic() < deadline:
        started = time.monotonic()
        response = client.get("/health")
        elapsed = time.monotonic() - started
        assert response.status_code == 200 and elapsed < 2.0
        if fit_thread.is_alive():
            overlapping.append(elapsed)
        time.sleep(0.02)
    fit_thread.join(timeout=60)
    assert outcome["fit"].status_code == 200
    assert overlapping, "the fit finished before any /health call overlapped it"


def test_health_touches_no_disk(client: TestClient, models_dir: Any) -> None:
    assert client.get("/health").status_code == 200
    assert not models_dir.exists()
