"""``BDI_PRECISION=bf16`` on a real server (issue 31): /health says bf16, and /infer's scores stay within the
parity tolerance of fp32 on the same model and images."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest

from bdi.patchcore.features import FeatureExtractor
from bdi.refs import ModelRef
from bdi.runtime.parity import SCORE_REL_TOL
from bdi.service import InspectionService
from tests.helpers.servers import UvicornServer, server_env
from tests.helpers.synthetic import png_bytes
from tests.helpers.tiny import tiny_settings

pytestmark = pytest.mark.slow

ROLE, ROI, MM = "Inspection", "inspection-1", 0.2
REF = ModelRef.create(recipe_id="default", role_id=ROLE, roi_id=ROI, model_key=None)


def test_a_bf16_server_says_so_and_scores_within_parity_of_fp32(
    tmp_path: Path, tiny_extractor: FeatureExtractor, good_discs: list[np.ndarray], defect_discs: list[np.ndarray]
) -> None:
    models_dir = tmp_path / "models"
    fp32 = InspectionService(settings=tiny_settings(models_dir), extractor=tiny_extractor)
    assert fp32.extractor.precision == "fp32"
    fp32.fit_images(ref=REF, mm_per_px=MM, images=good_discs[:8])
    fp32.calibrate_from_scores(ref=REF, ok_scores=[0.1], ng_scores=None, mm_per_px=MM)
    probes = [png_bytes(image) for image in (*good_discs[8:10], *defect_discs)]
    reference = [float(fp32.infer(ref=REF, mm_per_px=MM, image=probe).result.score) for probe in probes]

    env = server_env(tmp_path, models_dir, BDI_PRECISION="bf16", BDI_RUNTIME="torch")
    with UvicornServer(cwd=tmp_path, env=env) as server, httpx.Client(base_url=server.base_url, timeout=120) as client:
        health = client.get("/health").json()
        served = []
        for probe in probes:
            response = client.post("/infer", data={"role_id": ROLE, "roi_id": ROI, "mm_per_px": str(MM)},
                                   files={"image": ("crop.png", probe, "image/png")})
            assert response.status_code == 200, response.text
            served.append(float(response.json()["score"]))
    assert (health["runtime"], health["runtime_precision"], health["runtime_fallback"]) == ("torch", "bf16", None)
    assert health["runtime_parity"]["torch-bf16"]["passed"] is True
    rel = [abs(s - r) / abs(r) for s, r in zip(served, reference, strict=True)]
    assert max(rel) <= SCORE_REL_TOL, rel  # parity with fp32 ...
    assert max(rel) > 0, "bf16 scores equal fp32's to the last bit: bf16 did not run"  # ... computed in bf16
