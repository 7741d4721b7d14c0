"""A deployment with ``model.memory.unwrap: annulus`` through the public API: a ring ROI fitted from the dataset (its
samples' annulus shape_json) is unwrapped; /infer then needs that annulus, and answers on the crop."""

from __future__ import annotations

import base64
import json

import cv2
import numpy as np
from fastapi.testclient import TestClient

from tests.helpers.synthetic import disc_png
from tests.helpers.tiny import TINY_FEATURES
from tests.serving.conftest import MM, ROI, ROLE, ClientFactory, fit_from_dataset, infer

RING = {"kind": "annulus", "cx": 48, "cy": 48, "r": 44, "r_inner": 26}  # r_inner >= r / 2: unwrapped


def _unwrapping_client(client_factory: ClientFactory) -> TestClient:
    return client_factory(model={"features": TINY_FEATURES, "memory": {"unwrap": "annulus"}})


def _upload(client: TestClient, label: str, seeds: range, *, defect: str | None = None) -> None:
    for seed in seeds:
        meta = json.dumps({"mm_per_px": MM, "shape_json": json.dumps(RING)})
        files = [("images", (f"s{seed}.png", disc_png(seed=seed, defect=defect), "image/png"))]
        response = client.post(f"/datasets/{label}/upload", data={"role_id": ROLE, "roi_id": ROI, "metas": [meta]},
                               files=files)
        assert response.status_code == 200, response.text


def test_a_ring_fitted_from_the_dataset_is_unwrapped_and_infer_needs_and_honours_its_annulus(
    client_factory: ClientFactory,
) -> None:
    client = _unwrapping_client(client_factory)
    _upload(client, "ok", range(10))
    assert fit_from_dataset(client).status_code == 200
    _upload(client, "ng", range(100, 102), defect="scratch")
    calibrated = client.post("/calibrate_dataset", json={"role_id": ROLE, "roi_id": ROI})
    assert calibrated.status_code == 200, calibrated.text
    image = disc_png(seed=200, defect="pit")
    refused = infer(client, image)  # no shape: the model cannot see the crop as it was fitted
    assert refused.status_code == 400 and "annulus" in refused.text
    answered = infer(client, image, shape=json.dumps(RING), include_heatmap="true")
    assert answered.status_code == 200, answered.text
    body = answered.json()
    heatmap = cv2.imdecode(np.frombuffer(base64.b64decode(body["heatmap_png_base64"]), np.uint8),
                           cv2.IMREAD_GRAYSCALE)
    assert heatmap.shape == (96, 96)  # on the crop, not the strip
    outside = heatmap[48, 48], heatmap[2, 2]  # the bore and a corner lie outside the annulus
    assert outside == (0, 0)
    scored = client.post("/infer_dataset", json={"role_id": ROLE, "roi_id": ROI})
    assert scored.status_code == 200, scored.text
    assert all(item["error"] is None for item in scored.json()["items"])
