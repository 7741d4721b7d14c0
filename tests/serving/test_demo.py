"""`make run`'s demo model (bdi/demo.py) on the synthetic discs a user without ../shared gets, with the
pretrained CNN, served over HTTP: its NG sample is NG and its OK sample is OK."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from bdi.backbones import PRETRAINED_CNN
from bdi.config import Settings
from bdi.data.synthetic import write_mvtec_dataset
from bdi.demo import MM_PER_PX, ROI_ID, ROLE_ID, build_demo_model, overlay
from serving.app import create_app


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
