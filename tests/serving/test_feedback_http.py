"""Operator feedback that retrains (issue 27): over a real two-worker server that keeps the inspected images, false
rejects become OK samples of their ROI (provenance in the sidecar) and the next ``/fit_ok use_dataset=true`` fits
on them; a missed defect with its corrected region becomes an NG sample and counts in the recall by area; a verdict
that contradicts the decision, an unknown request id, and a sent image that is not the inspected one are refused."""

from __future__ import annotations

import base64
from pathlib import Path

import httpx
import pytest

from tests.helpers.servers import UvicornServer, server_env
from tests.helpers.synthetic import disc_png

pytestmark = pytest.mark.slow

ROLE, ROI, MM = "Inspection", "disc-1", 0.2


def test_false_rejects_become_the_ok_samples_the_next_fit_uses(tmp_path: Path) -> None:
    env = server_env(tmp_path, BDI_INSPECTIONS_STORE_IMAGES="1", BDI_MIN_OK_SAMPLES="3")
    with UvicornServer(cwd=tmp_path, env=env, workers=2) as server, \
            httpx.Client(base_url=server.base_url, timeout=120) as client:
        form = {"role_id": ROLE, "roi_id": ROI, "mm_per_px": str(MM)}
        fit = client.post("/fit_ok", data=form,
                          files=[("images", (f"fit_{i}.png", disc_png(seed=i), "image/png")) for i in range(10)])
        assert fit.status_code == 200, fit.text
        per_image = fit.json()["n_embeddings"] // 10
        # a threshold below every score: every crop is rejected, as a too-strict line would
        assert client.post("/calibrate_manual", json={"role_id": ROLE, "roi_id": ROI,
                                                      "threshold": 1e-6}).status_code == 200
        rejected = []
        for i in range(4):
            answer = client.post("/infer", data=form,
                                 files={"image": ("crop.png", disc_png(seed=100 + i), "image/png")}).json()
            assert answer["decision"] == "ng"
            rejected.append(answer["request_id"])

        samples = {}
        for rid in rejected[:3]:
            given = client.post("/feedback", json={"request_id": rid, "verdict": "false_reject",
                                                   "operator": "op-7", "comment": "good part"})
            assert given.status_code == 200, given.text
            assert given.json()["feedback"]["label"] == "ok"
            samples[rid] = given.json()["feedback"]["sample"]
        defect = client.post("/feedback", json={"request_id": rejected[3], "verdict": "confirmed_defect",
                                                "region": {"bbox": [10, 10, 20, 10]}})
        assert defect.status_code == 200 and defect.json()["feedback"]["area_mm2"] == pytest.approx(200 * MM**2)

        again = client.post("/feedback", json={"request_id": rejected[0], "verdict": "false_reject"})
        assert again.status_code == 200  # a double click: the first verdict's sample, no second one
        assert again.json()["feedback"]["sample"] == samples[rejected[0]]
        contradicting = client.post("/feedback", json={"request_id": rejected[0], "verdict": "missed_defect"})
        assert contradicting.status_code == 400 and "decided 'ng'" in contradicting.text
        assert client.post("/feedback", json={"request_id": "nope", "verdict": "false_reject"}).status_code == 404
        assert client.post("/feedback", json={"request_id": rejected[0], "verdict": "maybe"}).status_code == 400

        listing = client.get("/datasets/list", params={"role_id": ROLE, "roi_id": ROI}).json()
        assert listing["classes"]["ok"]["count"] == 3 and listing["classes"]["ng"]["count"] == 1
        name = listing["classes"]["ok"]["files"][0]
        meta = client.get("/datasets/meta", params={"role_id": ROLE, "roi_id": ROI, "label": "ok", "filename": name})
        assert meta.status_code == 200, meta.text
        assert meta.json()["mm_per_px"] == MM
        provenance = meta.json()["feedback"]
        assert provenance["source"] == "feedback" and provenance["verdict"] == "false_reject"
        assert provenance["inspection_request_id"] in rejected and provenance["operator"] == "op-7"

        refit = client.post("/fit_ok", data={**form, "use_dataset": "true"})
        assert refit.status_code == 200, refit.text
        assert refit.json()["n_embeddings"] == 3 * per_image  # the three false rejects, nothing else

        monitor = client.get("/monitor", params={"roi_id": ROI}).json()["rois"][0]
        rates = monitor["feedback"]
        assert rates["n_false_reject"] == 3 and rates["n_confirmed_defect"] == 1
        assert rates["false_reject_rate"] == pytest.approx(3 / 4) and rates["recall"] == 1.0
        assert rates["recall_by_area_mm2"]["5-20"]["detected"] == 1


def test_without_kept_images_the_feedback_carries_the_inspected_image(tmp_path: Path) -> None:
    env = server_env(tmp_path)  # BDI_INSPECTIONS_STORE_IMAGES off: the default
    with UvicornServer(cwd=tmp_path, env=env, workers=1) as server, \
            httpx.Client(base_url=server.base_url, timeout=120) as client:
        form = {"role_id": ROLE, "roi_id": ROI, "mm_per_px": str(MM)}
        assert client.post("/fit_ok", data=form, files=[("images", (f"f{i}.png", disc_png(seed=i), "image/png"))
                                                        for i in range(10)]).status_code == 200
        assert client.post("/calibrate_manual", json={"role_id": ROLE, "roi_id": ROI,
                                                      "threshold": 1e9}).status_code == 200
        image = disc_png(seed=7, defect="scratch")
        answer = client.post("/infer", data=form, files={"image": ("crop.png", image, "image/png")}).json()
        assert answer["decision"] == "ok"
        body = {"request_id": answer["request_id"], "verdict": "missed_defect",
                "region": {"polygon": [[0, 0], [10, 0], [10, 10]]}}
        refused = client.post("/feedback", json=body)
        assert refused.status_code == 400 and "send it as image" in refused.text
        other = base64.b64encode(disc_png(seed=8)).decode()
        assert client.post("/feedback", json={**body, "image_base64": other}).status_code == 400
        given = client.post("/feedback", json={**body, "image_base64": base64.b64encode(image).decode()})
        assert given.status_code == 200, given.text
        assert given.json()["feedback"]["label"] == "ng"
        assert given.json()["feedback"]["area_mm2"] == pytest.approx(50 * MM**2)
        stored = client.get("/datasets/list", params={"role_id": ROLE, "roi_id": ROI}).json()
        assert stored["classes"]["ng"]["count"] == 1
