"""`make run`'s demo model (bdi/demo.py) on the synthetic discs a user without ../shared gets, with the
pretrained CNN, served over HTTP: its NG sample is NG and its OK sample is OK; and its launcher
(serving/demo.py) names the server address of the environment."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from bdi.backbones import PRETRAINED_CNN
from bdi.config import Settings
from bdi.data.synthetic import write_mvtec_dataset
from bdi.demo import MM_PER_PX, ROI_ID, ROLE_ID, build_demo_model, overlay
from serving.app import create_app
from serving.demo import try_lines
from serving.settings import ServingSettings


def test_demo_samples_are_judged_ng_and_ok_over_http(tmp_path: Path) -> None:
    data = write_mvtec_dataset(tmp_path / "discs", n_train=10, n_test_good=4, n_test_per_defect=2, size=128)
    settings = Settings(
        models_dir=tmp_path / "models", log_dir=tmp_path / "logs", weights_cache_dir=tmp_path / "cache",
        model={"features": {"backbone": PRETRAINED_CNN, "weights": "official", "device": "cpu", "input_size": 128}},
    )
    demo = build_demo_model(settings, data_root=data, n_train=10)
    decisions = {}
    with TestClient(create_app(settings)) as client:
        for name, item in (("ng", demo.ng_sample), ("ok", demo.ok_sample)):
            response = client.post(
                "/infer",
                data={"role_id": ROLE_ID, "roi_id": ROI_ID, "mm_per_px": str(MM_PER_PX)},
                files={"image": ("sample.png", item.path.read_bytes(), "image/png")},
            )
            assert response.status_code == 200, response.text
            decisions[name] = response.json()
    assert decisions["ng"]["decision"] == "ng" and decisions["ng"]["heatmap_png_base64"]
    assert decisions["ok"]["decision"] == "ok"
    assert decisions["ng"]["threshold"] == decisions["ok"]["threshold"] == demo.threshold


def test_demo_overlay_puts_the_heatmap_peak_on_the_defect(tmp_path: Path) -> None:
    data = write_mvtec_dataset(tmp_path / "discs", n_train=10, n_test_good=4, n_test_per_defect=2, size=128)
    settings = Settings(
        models_dir=tmp_path / "models", weights_cache_dir=tmp_path / "cache",
        model={"features": {"backbone": PRETRAINED_CNN, "weights": "official", "device": "cpu", "input_size": 128}},
    )
    demo = build_demo_model(settings, data_root=data, n_train=10)
    import cv2
    import numpy as np

    assert demo.ng_sample.mask_path is not None
    truth = cv2.imread(str(demo.ng_sample.mask_path), cv2.IMREAD_GRAYSCALE) > 127
    peak = np.unravel_index(np.argmax(demo.ng_result.anomaly_map), truth.shape)
    ys, xs = np.nonzero(truth)
    distance = np.min(np.hypot(ys - peak[0], xs - peak[1]))
    assert distance <= 16, f"heatmap peak {peak} is {distance:.1f} px (> 2 feature cells) from the defect"
    anomaly = demo.ng_result.anomaly_map
    # blur σ 8 (the registry's, tuned on 1024-px tiles) spreads the map over much of this 128-px disc
    assert anomaly[truth].mean() > 1.5 * anomaly[~truth].mean()
    image = cv2.imread(str(demo.ng_sample.path))
    assert overlay(image, demo.ng_result, mask_path=demo.ng_sample.mask_path).shape[1] == 2 * image.shape[1]


@pytest.mark.parametrize(
    ("env", "base"),
    [
        ({}, "http://127.0.0.1:8000"),
        ({"BDI_BACKEND_HOST": "0.0.0.0", "BDI_BACKEND_PORT": "9001"}, "http://0.0.0.0:9001"),
        ({"BRAKEDISC_BACKEND_HOST": "10.0.0.1", "PORT": "9002"}, "http://10.0.0.1:9002"),
    ],
    ids=["defaults", "bdi", "legacy-and-plain"],
)
def test_demo_launcher_prints_curl_lines_for_the_server_address_of_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: dict[str, str], base: str
) -> None:
    for name in ("BDI_BACKEND_HOST", "BDI_BACKEND_PORT", "BRAKEDISC_BACKEND_HOST", "BRAKEDISC_BACKEND_PORT",
                 "HOST", "PORT", "BDI_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    ng_png, ok_png = tmp_path / "demo_ng.png", tmp_path / "demo_ok.png"
    health, ng, ok = try_lines(serving_settings=ServingSettings(), ng_png=ng_png, ok_png=ok_png)
    assert health == f"curl -s {base}/health"
    form = f"-F role_id={ROLE_ID} -F roi_id={ROI_ID} -F mm_per_px={MM_PER_PX}"
    assert ng.startswith(f"curl -s {form} -F image=@{ng_png} {base}/infer")
    assert ok.startswith(f"curl -s {form} -F image=@{ok_png} {base}/infer")
