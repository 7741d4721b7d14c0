"""The disc benchmark's harness runs end to end on a tiny model: fit, per-ROI scoring, results on disk."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType

import pytest

from bdi.backbones import DINOV2_VITS14
from bdi.data.disc_scenes import ROIS
from tests.helpers.tiny import TINY_FEATURES

TINY = ["--backbone", DINOV2_VITS14, "--weights", "random",
        "--set", f"features.input_size={TINY_FEATURES['input_size']}",
        "--set", f"features.depth={TINY_FEATURES['depth']}",
        "--set", "features.blocks=" + json.dumps(list(TINY_FEATURES["blocks"]))]


def _discs(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # bench.discs sets it when first imported
    return importlib.import_module("bench.discs")


def test_a_two_image_run_reports_every_roi_and_writes_its_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    discs = _discs(monkeypatch)
    argv = ["--quick", "--size", "128", "--n-train", "2", "--n-test", "2", *TINY, "--out-dir", str(tmp_path)]
    assert discs.main(argv) == 0
    results = json.loads((tmp_path / "discs-quick.json").read_text(encoding="utf-8"))
    assert results["params"]["n_train"] == 2 and results["params"]["seeds"] == [0]
    assert results["params"]["runtime"]["runtime"] == "torch"
    assert set(results["rois"]) == set(ROIS)
    for roi in ROIS:
        for metric in ("image_auroc", "pixel_auroc"):
            assert 0.0 <= results["rois"][roi][metric]["mean"] <= 1.0, (roi, metric)
        seed = results["per_seed"]["0"][roi]
        assert len(seed["good_scores"]) == 2 and len(seed["defect_scores"]) == 2
    markdown = (tmp_path / "discs-quick.md").read_text(encoding="utf-8")
    assert "| hub | crop |" in markdown and "python -m bench.discs --quick" in markdown


def test_model_overrides_reach_the_fitted_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    discs = _discs(monkeypatch)
    overrides = discs.parse_overrides(["memory.fit_rotations=3", "scoring.blur_sigma=2"])
    assert overrides == {"memory": {"fit_rotations": 3}, "scoring": {"blur_sigma": 2}}
    service = discs.build_service(work=tmp_path, backbone=DINOV2_VITS14, weights="random", threads=1,
                                  model_overrides={**overrides, "features": {"input_size": 56, "depth": 2,
                                                                             "blocks": [1]}})
    split = discs.draw_split(seed=0, size=128, n_train=1, n_test=1)
    fit = service.fit_images(ref=discs.REF, mm_per_px=discs.MM_PER_PX, images=[d.image for d in split.train])
    rows, cols = fit.token_shape
    assert fit.n_images == 1 and fit.n_embeddings == 3 * rows * cols  # the disc and 2 rotated copies
    assert service.settings.model.scoring.blur_sigma == 2


def test_the_crop_protocol_fits_a_model_per_roi_on_that_rois_crops(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    discs = _discs(monkeypatch)
    service = discs.build_service(work=tmp_path, backbone=DINOV2_VITS14, weights="random", threads=1,
                                  model_overrides={"features": {"input_size": 56, "depth": 2, "blocks": [1]}})
    split = discs.draw_split(seed=0, size=128, n_train=2, n_test=1)
    fitted: list[tuple[str, tuple[int, ...]]] = []
    fit_images = service.fit_images

    def recording_fit(**kwargs):  # type: ignore[no-untyped-def]
        fitted.append((kwargs["ref"].roi_id, tuple(kwargs["images"][0].shape)))
        return fit_images(**kwargs)

    monkeypatch.setattr(service, "fit_images", recording_fit)
    metrics = discs.measure_seed(split, service, protocol="crop")
    assert [roi for roi, _ in fitted] == list(ROIS)
    crops = {roi: split.train[0].roi_crop(roi).image.shape for roi in ROIS}
    assert dict(fitted) == crops and crops["hub"][0] < crops["ring"][0] < 128
    assert set(metrics) == set(ROIS)
    fitted.clear()
    discs.measure_seed(split, service, protocol="whole")
    assert fitted == [(discs.REF.roi_id, (128, 128, 3))]  # one model on the whole discs


def test_the_crop_protocol_sends_each_crops_annulus_so_the_polar_view_is_measurable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    discs = _discs(monkeypatch)
    service = discs.build_service(work=tmp_path, backbone=DINOV2_VITS14, weights="random", threads=1,
                                  model_overrides={"features": {"input_size": 56, "depth": 2, "blocks": [1]},
                                                   "memory": {"unwrap": "annulus"}})
    split = discs.draw_split(seed=0, size=128, n_train=2, n_test=1)
    metrics = discs.measure_seed(split, service, protocol="crop")
    views = {}
    for roi in ROIS:
        ref = discs.ModelRef.create(recipe_id="discs", role_id="Inspection", roi_id=roi, model_key=None)
        memory = service.store.load_memory(ref)
        assert memory is not None
        views[roi] = memory.metadata["view"]
    assert views == {"ring": "polar", "vents": "polar", "hub": "crop"}  # the hub's bore is small: a crop
    assert {roi: m.view for roi, m in metrics.items()} == views  # reported as measured
