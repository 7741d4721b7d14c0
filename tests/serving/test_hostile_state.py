"""Issue 30 items 5-7 through the real app: a failed request leaves nothing behind, deletes stay in their recipe
and never reach a sidecar alone, and a calibration that detects nothing says so (docs/design.md)."""

from __future__ import annotations

import json
from pathlib import Path

from fastapi.testclient import TestClient

from bdi.cli import main
from tests.helpers.synthetic import disc_png
from tests.serving.conftest import BASE, ROI, ROLE, ClientFactory, calibrate_ng, infer, upload


def _clear(client: TestClient, recipe_id: str) -> object:
    return client.delete("/datasets/clear", params={"role_id": ROLE, "roi_id": ROI, "label": "ok"},
                         headers={"X-Recipe-Id": recipe_id})


# ------------------------------------------------------------------------------------------- item 5


def test_failed_infer_on_an_unused_recipe_leaves_no_folder_and_no_lock(client: TestClient, models_dir: Path) -> None:
    response = infer(client, disc_png(seed=1), mm_per_px=5.0, headers={"X-Recipe-Id": "unused"})
    assert response.status_code == 400 and "Memoria no encontrada" in response.text
    assert not (models_dir / "recipes" / "unused").exists()


def test_failed_infer_does_not_lock_the_scale_of_a_later_fit(fitted: TestClient, models_dir: Path) -> None:
    meta = models_dir / "recipes" / "default" / "recipe_meta.json"
    locked = json.loads(meta.read_text())["mm_per_px"]
    assert infer(fitted, disc_png(seed=1), mm_per_px=5.0, headers={"X-Recipe-Id": "other"}).status_code == 400
    files = [("images", (f"ok_{i}.png", disc_png(seed=i), "image/png")) for i in range(2)]
    fit = fitted.post("/fit_ok", data={"role_id": ROLE, "roi_id": ROI, "mm_per_px": "0.3"}, files=files,
                      headers={"X-Recipe-Id": "other"})
    assert fit.status_code == 200, fit.text
    assert json.loads((models_dir / "recipes" / "other" / "recipe_meta.json").read_text())["mm_per_px"] == 0.3
    assert json.loads(meta.read_text())["mm_per_px"] == locked


def test_a_mismatched_scale_is_still_409_before_anything_is_scored(calibrated: TestClient) -> None:
    response = infer(calibrated, disc_png(seed=1), mm_per_px=0.5)
    assert response.status_code == 409 and "mm_per_px mismatch" in response.text


def test_unlock_scale_command_resets_the_lock_for_the_next_fit(fitted: TestClient, models_dir: Path,
                                                                capsys: object) -> None:
    assert main(["recipe", "unlock-scale", "default", "--models-dir", str(models_dir)]) == 0
    meta = json.loads((models_dir / "recipes" / "default" / "recipe_meta.json").read_text())
    assert "mm_per_px" not in meta and "mm_per_px_unlocked_at_utc" in meta
    files = [("images", (f"ok_{i}.png", disc_png(seed=i), "image/png")) for i in range(2)]
    fit = fitted.post("/fit_ok", data={"role_id": ROLE, "roi_id": ROI, "mm_per_px": "0.5"}, files=files)
    assert fit.status_code == 200, fit.text
    assert main(["recipe", "unlock-scale", "nothing-here", "--models-dir", str(models_dir)]) == 0
    assert not (models_dir / "recipes" / "nothing-here").exists()


# ------------------------------------------------------------------------------------------- item 6


def test_clear_that_would_reach_the_default_recipe_is_refused_by_default(client: TestClient,
                                                                          models_dir: Path) -> None:
    upload(client, "ok", seeds=[1, 2])
    response = _clear(client, "zzz")
    assert response.status_code == 409 and set(response.json()) == {"detail"}
    assert "recipe 'default'" in response.json()["detail"]
    assert len(list((models_dir / "recipes" / "default" / "datasets" / BASE / "ok").iterdir())) == 4


def test_clear_allowed_to_cross_names_the_recipe_it_cleared_and_logs_it(client_factory: ClientFactory,
                                                                         tmp_path: Path) -> None:
    client = client_factory(dataset_clear_fallback=True)
    upload(client, "ok", seeds=[1])
    body = _clear(client, "zzz").json()
    assert body["cleared"] == 2 and body["recipe_id"] == "zzz" and body["resolved_recipe_id"] == "default"
    events = [json.loads(line) for line in (tmp_path / "logs" / "backend_diagnostics.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "datasets.clear.crossed" and e.get("resolved_recipe_id") == "default"
               for e in events)


def test_clear_of_the_recipes_own_folder_reports_it(client: TestClient) -> None:
    upload(client, "ok", seeds=[1])
    body = _clear(client, "default").json()
    assert body["cleared"] == 2 and body["resolved_recipe_id"] == "default"


def test_sidecar_cannot_be_deleted_or_downloaded_on_its_own(client: TestClient, models_dir: Path) -> None:
    (saved,) = upload(client, "ok", seeds=[1])
    sidecar = saved.rsplit(".", 1)[0] + ".json"
    params = {"role_id": ROLE, "roi_id": ROI, "label": "ok", "filename": sidecar}
    for method in ("GET", "DELETE"):
        response = client.request(method, "/datasets/file", params=params)
        assert response.status_code == 400 and set(response.json()) == {"detail"}, response.text
        assert "image" in response.json()["detail"]
    assert (models_dir / "recipes" / "default" / "datasets" / BASE / "ok" / sidecar).is_file()


# ------------------------------------------------------------------------------------------- item 7


def test_calibration_above_every_ng_score_warns_in_the_response_health_and_log(fitted: TestClient,
                                                                               tmp_path: Path) -> None:
    response = calibrate_ng(fitted, ok_scores=[1e30], ng_scores=[0.5, 0.7])
    assert response.status_code == 200
    assert "no NG sample would be detected" in response.json()["warnings"][0]
    (alert,) = fitted.get("/health").json()["calibration_warnings"]
    assert alert["roi_id"] == ROI and alert["threshold"] >= 1e30
    events = (tmp_path / "logs" / "backend_diagnostics.jsonl").read_text()
    assert '"calibration.detection_disabled"' in events


def test_calibration_without_ng_scores_is_checked_against_the_stored_ng_samples(fitted: TestClient) -> None:
    upload(fitted, "ng", seeds=[100], defect="scratch")
    warned = calibrate_ng(fitted, ok_scores=[1e30]).json()
    assert "every stored NG sample" in warned["warnings"][0]
    fine = calibrate_ng(fitted, ok_scores=[1e-6]).json()
    assert "warnings" not in fine  # the contract's keys only
    assert fitted.get("/health").json()["calibration_warnings"] == []  # cleared by the new calibration
