"""`make run`'s model building (serving/demo.py) on the synthetic discs, then served over HTTP."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from bdi.synthetic import write_mvtec_dataset
from serving.app import create_app
from serving.demo import MM_PER_PX, ROI_ID, ROLE_ID, build_demo_model
from tests.conftest import tiny_settings


def test_demo_model_answers_infer_with_its_calibrated_threshold(tmp_path: Path) -> None:
    data = write_mvtec_dataset(tmp_path / "discs", n_train=6, n_test_good=3, n_test_per_defect=1, size=96)
    settings = tiny_settings(tmp_path / "models", log_dir=tmp_path / "logs")
    ref, ng_sample = build_demo_model(settings, data_root=data, n_train=6)
    with TestClient(create_app(settings)) as client:
        body = client.post(
            "/infer",
            data={"role_id": ROLE_ID, "roi_id": ROI_ID, "mm_per_px": str(MM_PER_PX)},
            files={"image": ("sample.png", ng_sample.read_bytes(), "image/png")},
        ).json()
    stored = settings.models_dir / "recipes" / ref.recipe_id / ref.model_key_fs / f"{ref.base}_calib.json"
    assert stored.is_file()
    assert body["decision"] in {"ok", "ng"}
    assert body["threshold"] > 0 and body["token_shape"] == [8, 8]
