"""The reference's request → response cases (docs/contract.md), run against the real app and the tiny real ViT;
each test is named after its case id (H health, D datasets, F /fit_ok, C /calibrate_ng, CD /calibrate_dataset,
I /infer, ID /infer_dataset, M /manifest, S /state).

Numbers that depend on the backbone use the tiny model: 112 px input → token grid [8, 8], 64
patches per image (the reference's 448 px gives [32, 32] and 1024). Where one of our deliberate
improvements (docs/design.md) differs from the reference, the test name says so and asserts OUR behaviour.
"""

from __future__ import annotations

import base64
import json
import math
import re
import uuid
from pathlib import Path

import cv2
import faiss
import numpy as np
import pytest
from fastapi.testclient import TestClient

from bdi.data.synthetic import make_disc
from bdi.patchcore.features import FeatureExtractor
from bdi.patchcore.memory import Memory
from tests.helpers.synthetic import disc_png, png_bytes

from .conftest import (
    BASE,
    MM,
    ROI,
    ROLE,
    TOKENS,
    ClientFactory,
    calibrate_ng,
    fit_from_dataset,
    infer,
    upload,
)

MASTER, PATTERN = "Master", "Pattern"
MASTER_BASE = "TWFzdGVy__UGF0dGVybg"
STAMP = re.compile(r"^\d{8}-\d{6}-\d{6}\.png$")
RECIPE_PATTERN = "^[a-z0-9][a-z0-9_-]{0,63}$"
GUI_MEMORY_PHRASES = ("memoria no encontrada", "memory not found", "not fitted", "ejecuta /fit_ok")


def assert_shape_a(response, status: int = 400) -> str:  # type: ignore[no-untyped-def]
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "request_id", "recipe_id"}
    assert body["request_id"] == response.headers["x-request-id"]
    return str(body["error"])


def assert_shape_b(response, status: int = 400) -> str:  # type: ignore[no-untyped-def]
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"detail"} and isinstance(body["detail"], str)
    return str(body["detail"])


def assert_shape_c(response, status: int = 400) -> dict:  # type: ignore[no-untyped-def,type-arg]
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert set(detail) == {"error", "request_id", "recipe_id"}
    assert detail["request_id"] == response.headers["x-request-id"]
    return dict(detail)


def dataset_dir(models_dir: Path, *, recipe: str = "default", base: str = BASE) -> Path:
    return models_dir / "recipes" / recipe / "datasets" / base


def decode_heatmap(b64: str) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(base64.b64decode(b64, validate=True), np.uint8), cv2.IMREAD_UNCHANGED)
    assert image is not None
    return image


def crop_png(*, seed: int, width: int = 96, height: int = 80, defect: str | None = None) -> bytes:
    """A non-square crop of a synthetic disc (so W×H mix-ups show)."""
    image = make_disc(size=96, defect=defect, rng=np.random.default_rng(seed)).image
    return png_bytes(np.ascontiguousarray(image[:height, :width]))


# ---------------------------------------------------------------------------------------------- H


def test_h1_health_reports_status_device_and_honest_model_name(client: TestClient) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["device"] == "cpu" and body["reason"] == "cuda_not_available"
    assert body["version"] == "0.1.0"
    assert body["recipe_id"] == "default"
    assert uuid.UUID(body["request_id"]).version == 4
    assert response.headers["x-request-id"] == body["request_id"]
    # Random weights: the model name says so instead of claiming the pretrained DINOv2.
    assert body["model"] == "vit_small_patch14_dinov2(random,seed=0)"
    assert body["pretrained"] is False
    assert body["weights"]["source"] == "random" and body["weights"]["pretrained"] is False
    assert {"source", "name", "sha256", "pretrained"} <= set(body["weights"])


def test_h2_health_echoes_caller_request_id(client: TestClient) -> None:
    response = client.get("/health", headers={"X-Request-Id": "rid-123:abc.DEF"})
    assert response.status_code == 200
    assert response.json()["request_id"] == "rid-123:abc.DEF"
    assert response.headers["x-request-id"] == "rid-123:abc.DEF"


@pytest.mark.parametrize("recipe", ["last", "LAST", " Last "])
def test_h3_reserved_recipe_is_400_shape_c(client: TestClient, recipe: str) -> None:
    detail = assert_shape_c(client.get("/health", headers={"X-Recipe-Id": recipe}))
    assert "reserved" in detail["error"]
    assert detail["recipe_id"] == "default"


def test_h4_recipe_header_is_lower_cased(client: TestClient) -> None:
    response = client.get("/health", headers={"X-Recipe-Id": "DefaultLayout"})
    assert response.status_code == 200
    assert response.json()["recipe_id"] == "defaultlayout"


def test_h5_invalid_recipe_names_the_allowed_pattern(client: TestClient) -> None:
    detail = assert_shape_c(client.get("/health", headers={"X-Recipe-Id": "My Layout"}))
    assert "invalid" in detail["error"] and RECIPE_PATTERN in detail["error"]
    assert detail["recipe_id"] == "default"


def test_h6_recipe_longer_than_64_is_rejected(client: TestClient) -> None:
    assert_shape_c(client.get("/health", headers={"X-Recipe-Id": "a" * 65}))
    assert client.get("/health", headers={"X-Recipe-Id": "a" * 64}).status_code == 200


@pytest.mark.parametrize("path", ["/fit_ok", "/calibrate_ng"])
def test_h7_h8_bare_options_on_post_routes_is_405(client: TestClient, path: str) -> None:
    response = client.options(path)
    assert response.status_code == 405
    assert response.headers["x-request-id"]


def test_h9_options_on_unknown_path_is_404(client: TestClient) -> None:
    assert client.options("/does_not_exist").status_code == 404


def test_h10_unknown_route_is_404_with_request_id_header(client: TestClient) -> None:
    response = client.get("/unknown", headers={"X-Request-Id": "rid-404"})
    assert response.status_code == 404
    assert response.json() == {"detail": "Not Found"}
    assert response.headers["x-request-id"] == "rid-404"


def test_cors_preflight_is_200_and_exposes_id_headers(client: TestClient) -> None:
    preflight = client.options(
        "/fit_ok", headers={"Origin": "http://gui.local", "Access-Control-Request-Method": "POST"}
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in preflight.headers
    simple = client.get("/health", headers={"Origin": "http://gui.local"})
    exposed = simple.headers["access-control-expose-headers"].lower()
    assert "x-request-id" in exposed and "x-recipe-id" in exposed


def test_cors_with_origin_list_allows_credentials(client_factory: ClientFactory) -> None:
    client = client_factory(cors_origins="http://gui.local, http://other.local")
    response = client.get("/health", headers={"Origin": "http://gui.local"})
    assert response.headers["access-control-allow-origin"] == "http://gui.local"
    assert response.headers["access-control-allow-credentials"] == "true"
    denied = client.options(
        "/fit_ok", headers={"Origin": "http://evil.local", "Access-Control-Request-Method": "POST"}
    )
    assert denied.status_code == 400


# ---------------------------------------------------------------------------------------------- D


def test_d1_upload_stores_image_and_sidecar(client: TestClient, models_dir: Path) -> None:
    response = client.post(
        "/datasets/ok/upload",
        data={"role_id": ROLE, "roi_id": ROI},
        files=[("images", ("a.png", disc_png(seed=1), "image/png"))],
    )
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok" and body["recipe_id"] == "default"
    assert body["request_id"] == response.headers["x-request-id"]
    (saved,) = body["saved"]
    assert STAMP.match(saved)
    image = dataset_dir(models_dir) / "ok" / saved
    assert image.read_bytes() == disc_png(seed=1)
    sidecar = json.loads(image.with_suffix(".json").read_text())
    assert sidecar["role_id"] == ROLE and sidecar["roi_id"] == ROI
    assert sidecar["label"] == "ok" and sidecar["filename"] == saved
    assert sidecar["recipe_id"] == "default" and sidecar["created_at_utc"].endswith("Z")


def test_d2_upload_meta_locks_recipe_and_sidecar_filename_is_stored_name(
    client: TestClient, models_dir: Path
) -> None:
    """Our improvement: the sidecar's ``filename`` is the stored name (the client's is kept aside),
    so the GUI's delete-by-meta-name works; the reference kept "sample_x.png"."""
    shape = json.dumps({"kind": "rect", "x": 0, "y": 0, "w": 10, "h": 10})
    meta = json.dumps({"mm_per_px": 0.2, "filename": "sample_x.png", "shape_json": shape})
    response = client.post(
        "/datasets/ok/upload",
        data={"role_id": ROLE, "roi_id": ROI, "metas": [meta]},
        files=[("images", ("a.png", disc_png(seed=1), "image/png"))],
        headers={"X-Recipe-Id": "r1"},
    )
    assert response.status_code == 200, response.text
    assert response.json()["recipe_id"] == "r1"
    lock = json.loads((models_dir / "recipes" / "r1" / "recipe_meta.json").read_text())
    assert lock["mm_per_px"] == 0.2
    (saved,) = response.json()["saved"]
    sidecar = json.loads((dataset_dir(models_dir, recipe="r1") / "ok" / saved).with_suffix(".json").read_text())
    assert sidecar["filename"] == saved
    assert sidecar["client_filename"] == "sample_x.png"
    assert sidecar["shape_json"] == shape


def test_d3_upload_with_other_mm_per_px_is_409_shape_c(client: TestClient) -> None:
    upload(client, "ok", seeds=[1], headers={"X-Recipe-Id": "r1"})
    response = client.post(
        "/datasets/ok/upload",
        data={"role_id": ROLE, "roi_id": ROI, "metas": [json.dumps({"mm_per_px": 0.25})]},
        files=[("images", ("a.png", disc_png(seed=2), "image/png"))],
        headers={"X-Recipe-Id": "r1"},
    )
    detail = assert_shape_c(response, 409)
    assert "mm_per_px mismatch" in detail["error"]
    assert detail["recipe_id"] == "r1"


@pytest.mark.parametrize("mm", [0, -1])
def test_d4_upload_meta_with_bad_mm_per_px_is_400_shape_b(client: TestClient, mm: float) -> None:
    response = client.post(
        "/datasets/ok/upload",
        data={"role_id": ROLE, "roi_id": ROI, "metas": [json.dumps({"mm_per_px": mm})]},
        files=[("images", ("a.png", disc_png(seed=1), "image/png"))],
    )
    assert assert_shape_b(response) == "mm_per_px must be > 0 and finite"


def test_d5_metas_length_mismatch_is_400_and_saves_nothing(client: TestClient, models_dir: Path) -> None:
    response = client.post(
        "/datasets/ok/upload",
        data={"role_id": ROLE, "roi_id": ROI, "metas": ["{}"]},
        files=[("images", ("a.png", disc_png(seed=1), "image/png")),
               ("images", ("b.png", disc_png(seed=2), "image/png"))],
    )
    assert assert_shape_b(response) == "metas length must match images length"
    assert not dataset_dir(models_dir).exists()


def test_d6_upload_without_images_is_422(client: TestClient) -> None:
    response = client.post("/datasets/ok/upload", data={"role_id": ROLE, "roi_id": ROI})
    assert response.status_code == 422
    assert isinstance(response.json()["detail"], list)


def test_d7_malformed_metas_json_is_400_not_500(client: TestClient, models_dir: Path) -> None:
    """Our improvement: the reference answered a plain-text 500."""
    response = client.post(
        "/datasets/ok/upload",
        data={"role_id": ROLE, "roi_id": ROI, "metas": ["not json"]},
        files=[("images", ("a.png", disc_png(seed=1), "image/png"))],
    )
    assert "metas[0]" in assert_shape_b(response)
    assert not dataset_dir(models_dir).exists()


def test_d8_uppercase_extension_is_lower_cased(client: TestClient) -> None:
    response = client.post(
        "/datasets/ok/upload",
        data={"role_id": ROLE, "roi_id": ROI},
        files=[("images", ("PHOTO.JPG", disc_png(seed=1), "image/jpeg"))],
    )
    assert response.status_code == 200
    assert response.json()["saved"][0].endswith(".jpg")


def test_d9_list_shows_files_and_sidecars(client: TestClient) -> None:
    (saved,) = upload(client, "ok", seeds=[1])
    response = client.get("/datasets/list", params={"role_id": ROLE, "roi_id": ROI})
    assert response.status_code == 200
    body = response.json()
    assert body["role_id"] == ROLE and body["roi_id"] == ROI and body["recipe_id"] == "default"
    assert body["request_id"] == response.headers["x-request-id"]
    assert body["classes"] == {"ok": {"count": 1, "files": [saved], "meta": {saved: True}}}


def test_d10_list_of_unknown_roi_is_empty(client: TestClient) -> None:
    response = client.get("/datasets/list", params={"role_id": "Nobody", "roi_id": "nothing"})
    assert response.status_code == 200
    assert response.json()["classes"] == {}


def test_d11_list_without_roi_id_is_422(client: TestClient) -> None:
    assert client.get("/datasets/list", params={"role_id": ROLE}).status_code == 422


@pytest.mark.parametrize("prefix", ["", "../../x/"])
def test_d12_d13_download_returns_raw_bytes_using_only_the_basename(client: TestClient, prefix: str) -> None:
    (saved,) = upload(client, "ok", seeds=[3])
    response = client.get(
        "/datasets/file", params={"role_id": ROLE, "roi_id": ROI, "label": "ok", "filename": prefix + saved}
    )
    assert response.status_code == 200
    assert response.content == disc_png(seed=3)
    assert response.headers["content-type"] == "image/png"
    assert response.headers["content-disposition"] == f'attachment; filename="{saved}"'


def test_d14_download_of_missing_file_is_404_shape_b(client: TestClient) -> None:
    upload(client, "ok", seeds=[3])
    response = client.get(
        "/datasets/file", params={"role_id": ROLE, "roi_id": ROI, "label": "ok", "filename": "nope.png"}
    )
    assert assert_shape_b(response, 404) == "file not found"


def test_d15_meta_returns_sidecar_plus_ids(client: TestClient) -> None:
    (saved,) = upload(client, "ok", seeds=[3])
    response = client.get(
        "/datasets/meta", params={"role_id": ROLE, "roi_id": ROI, "label": "ok", "filename": saved}
    )
    assert response.status_code == 200
    body = response.json()
    assert body["filename"] == saved and body["label"] == "ok" and body["mm_per_px"] == MM
    assert body["recipe_id"] == "default"  # stored key
    assert body["request_id"] == response.headers["x-request-id"]  # added: the sidecar has none


def test_d16_meta_without_sidecar_is_404_shape_b(client: TestClient, models_dir: Path) -> None:
    (saved,) = upload(client, "ok", seeds=[3])
    (dataset_dir(models_dir) / "ok" / saved).with_suffix(".json").unlink()
    response = client.get(
        "/datasets/meta", params={"role_id": ROLE, "roi_id": ROI, "label": "ok", "filename": saved}
    )
    assert assert_shape_b(response, 404) == "meta not found"


def test_d17_d18_delete_removes_image_and_sidecar_then_reports_false(
    client: TestClient, models_dir: Path
) -> None:
    (saved,) = upload(client, "ok", seeds=[3])
    params = {"role_id": ROLE, "roi_id": ROI, "label": "ok", "filename": saved}
    first = client.delete("/datasets/file", params=params)
    assert first.status_code == 200
    assert first.json() == {"deleted": True, "filename": saved, "request_id": first.headers["x-request-id"],
                            "recipe_id": "default"}
    assert list((dataset_dir(models_dir) / "ok").iterdir()) == []
    second = client.delete("/datasets/file", params=params)
    assert second.status_code == 200 and second.json()["deleted"] is False


def test_d19_delete_with_bad_label_is_400_not_500(client: TestClient) -> None:
    """Our improvement: the reference answered a plain-text 500."""
    (saved,) = upload(client, "ok", seeds=[3])
    response = client.delete(
        "/datasets/file", params={"role_id": ROLE, "roi_id": ROI, "label": "bad", "filename": saved}
    )
    assert "label" in assert_shape_b(response)


def test_d20_clear_counts_images_and_sidecars(client: TestClient) -> None:
    upload(client, "ok", seeds=[1, 2, 3])
    response = client.delete("/datasets/clear", params={"role_id": ROLE, "roi_id": ROI, "label": "ok"})
    assert response.status_code == 200
    body = response.json()
    assert body["cleared"] == 6 and body["label"] == "ok" and body["recipe_id"] == "default"


def test_d21_clear_of_unknown_roi_is_zero(client: TestClient) -> None:
    response = client.delete("/datasets/clear", params={"role_id": "Nobody", "roi_id": "x", "label": "ok"})
    assert response.status_code == 200 and response.json()["cleared"] == 0


def test_d22_new_recipe_lists_default_samples_until_its_first_upload(client: TestClient) -> None:
    (default_file,) = upload(client, "ok", seeds=[1])
    params = {"role_id": ROLE, "roi_id": ROI}
    r2 = {"X-Recipe-Id": "r2"}
    before = client.get("/datasets/list", params=params, headers=r2).json()
    assert before["recipe_id"] == "r2" and before["classes"]["ok"]["files"] == [default_file]
    (r2_file,) = upload(client, "ok", seeds=[2], headers=r2)
    after = client.get("/datasets/list", params=params, headers=r2).json()
    assert after["classes"]["ok"]["files"] == [r2_file]


def test_metas_part_sent_as_application_json_without_filename_is_read_as_text(
    client: TestClient, models_dir: Path
) -> None:
    """The GUI sends ``metas`` with ``Content-Type: application/json`` and no filename."""
    boundary = "----bdi-test-boundary"
    meta = json.dumps({"mm_per_px": 0.2, "filename": "sample_gui.png", "angle": None})
    parts = [
        (b'Content-Disposition: form-data; name="role_id"\r\n\r\n', ROLE.encode()),
        (b'Content-Disposition: form-data; name="roi_id"\r\n\r\n', ROI.encode()),
        (b'Content-Disposition: form-data; name="images"; filename="sample_gui.png"\r\n'
         b"Content-Type: image/png\r\n\r\n", disc_png(seed=5)),
        (b'Content-Disposition: form-data; name="metas"\r\nContent-Type: application/json; charset=utf-8'
         b"\r\n\r\n", meta.encode()),
    ]
    body = b"".join(b"--" + boundary.encode() + b"\r\n" + head + data + b"\r\n" for head, data in parts)
    body += b"--" + boundary.encode() + b"--\r\n"
    response = client.post(
        "/datasets/ok/upload", content=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert response.status_code == 200, response.text
    (saved,) = response.json()["saved"]
    sidecar = json.loads((dataset_dir(models_dir) / "ok" / saved).with_suffix(".json").read_text())
    assert sidecar["mm_per_px"] == 0.2 and sidecar["client_filename"] == "sample_gui.png"
    assert "angle" in sidecar and sidecar["angle"] is None


# ---------------------------------------------------------------------------------------------- F


def test_f1_fit_from_ten_dataset_samples(client: TestClient, models_dir: Path) -> None:
    upload(client, "ok", seeds=range(10), role_id=MASTER, roi_id=PATTERN, with_meta=False)
    response = fit_from_dataset(client, role_id=MASTER, roi_id=PATTERN, mm_per_px=0.25, memory_fit="false")
    assert response.status_code == 200, response.text
    body = response.json()
    n = 10 * TOKENS
    assert body["n_embeddings"] == n
    assert body["coreset_size"] == math.ceil(n * 0.1)
    assert body["token_shape"] == [8, 8]
    assert body["coreset_rate_requested"] == 0.1
    assert body["coreset_rate_applied"] == pytest.approx(math.ceil(n * 0.1) / n)
    assert body["recipe_id"] == "default" and body["request_id"] == response.headers["x-request-id"]
    model_dir = models_dir / "recipes" / "default" / PATTERN
    assert (model_dir / f"{MASTER_BASE}.npz").is_file()
    assert (model_dir / f"{MASTER_BASE}_index.faiss").is_file()


def test_f2_memory_fit_keeps_every_patch(client: TestClient) -> None:
    upload(client, "ok", seeds=range(10), role_id=MASTER, roi_id=PATTERN, with_meta=False)
    response = fit_from_dataset(client, role_id=MASTER, roi_id=PATTERN, mm_per_px=0.25, memory_fit="true")
    assert response.status_code == 200
    body = response.json()
    assert body["coreset_size"] == body["n_embeddings"] == 10 * TOKENS
    assert body["coreset_rate_requested"] == 1.0 and body["coreset_rate_applied"] == 1.0


def test_f3_nine_samples_are_insufficient(client: TestClient) -> None:
    upload(client, "ok", seeds=range(9))
    error = assert_shape_a(fit_from_dataset(client))
    assert "Insufficient OK samples: need at least 10, found 9" in error


def test_f4_no_samples_found(client: TestClient) -> None:
    assert assert_shape_a(fit_from_dataset(client)) == "No OK dataset samples found"


def test_f5_dataset_only_mode_refuses_uploaded_images(client_factory: ClientFactory) -> None:
    client = client_factory(train_dataset_only=True)
    response = client.post(
        "/fit_ok", data={"role_id": ROLE, "roi_id": ROI, "mm_per_px": "0.2"},
        files=[("images", ("a.png", disc_png(seed=1), "image/png"))],
    )
    assert assert_shape_a(response) == (
        "Training only supported from dataset (use_dataset=true) in this deployment."
    )


def test_f6_no_images_provided(client: TestClient) -> None:
    response = client.post("/fit_ok", data={"role_id": ROLE, "roi_id": ROI, "mm_per_px": "0.2"})
    assert assert_shape_a(response) == "No images provided"


def test_f7_fit_from_uploaded_images_when_dataset_only_is_off(client_factory: ClientFactory) -> None:
    client = client_factory(train_dataset_only=False)
    response = client.post(
        "/fit_ok", data={"role_id": ROLE, "roi_id": ROI, "mm_per_px": "0.2"},
        files=[("images", ("a.png", disc_png(seed=1), "image/png")),
               ("images", ("b.png", disc_png(seed=2), "image/png"))],
    )
    assert response.status_code == 200, response.text
    body = response.json()
    n = 2 * TOKENS
    assert body["n_embeddings"] == n and body["token_shape"] == [8, 8]
    assert body["coreset_size"] == math.ceil(n * 0.1)
    assert body["coreset_rate_applied"] == pytest.approx(math.ceil(n * 0.1) / n)


@pytest.mark.parametrize("mm", ["0", "-1", "nan", "inf"])
def test_f8_fit_with_bad_mm_per_px_is_400_shape_b(client: TestClient, mm: str) -> None:
    response = fit_from_dataset(client, mm_per_px=mm)  # type: ignore[arg-type]
    assert assert_shape_b(response) == "mm_per_px must be > 0 and finite"


def test_f9_fit_with_non_numeric_mm_per_px_is_422(client: TestClient) -> None:
    assert fit_from_dataset(client, mm_per_px="abc").status_code == 422  # type: ignore[arg-type]


def test_f10_fit_with_mm_per_px_other_than_the_uploads_is_409(client: TestClient) -> None:
    upload(client, "ok", seeds=range(10))  # metas lock 0.2
    detail = assert_shape_c(fit_from_dataset(client, mm_per_px=0.25), 409)
    assert "mm_per_px mismatch" in detail["error"]


def test_f11_fit_without_role_id_is_422(client: TestClient) -> None:
    response = client.post("/fit_ok", data={"roi_id": ROI, "mm_per_px": "0.2", "use_dataset": "true"})
    assert response.status_code == 422


def test_f12_form_recipe_last_is_reserved(client: TestClient) -> None:
    detail = assert_shape_c(fit_from_dataset(client, recipe_id="Last"))
    assert "reserved" in detail["error"]


def test_f13_form_recipe_wins_over_header(client: TestClient, models_dir: Path) -> None:
    response = client.post(
        "/fit_ok", data={"role_id": ROLE, "roi_id": ROI, "mm_per_px": "0.2", "recipe_id": "abc"},
        files=[("images", ("a.png", disc_png(seed=1), "image/png"))], headers={"X-Recipe-Id": "xyz"},
    )
    assert response.status_code == 200, response.text
    assert response.json()["recipe_id"] == "abc"
    assert (models_dir / "recipes" / "abc" / ROI / f"{BASE}.npz").is_file()
    assert not (models_dir / "recipes" / "xyz").exists()


def test_f14_undecodable_dataset_file_is_400_not_500(client: TestClient, models_dir: Path) -> None:
    """Our improvement: 400 A instead of the reference's 500 A (same message prefix).

    Uploads are checked, so the broken file is planted on disk (a legacy or corrupted sample).
    """
    upload(client, "ok", seeds=range(9))
    (dataset_dir(models_dir) / "ok" / "29990101-000000-000000.png").write_bytes(b"not an image")
    error = assert_shape_a(fit_from_dataset(client))
    assert error.startswith("No se pudo decodificar la imagen")


def test_f15_fit_under_model_key_is_not_found_by_roi_id(client: TestClient) -> None:
    upload(client, "ok", seeds=range(10))
    assert fit_from_dataset(client, model_key="mk1").status_code == 200
    error = assert_shape_a(infer(client, disc_png(seed=1)))
    assert error.startswith("Memoria no encontrada")


# ---------------------------------------------------------------------------------------------- C

C1 = {"role_id": MASTER, "roi_id": PATTERN, "mm_per_px": 0.2, "ok_scores": [10, 11, 13], "ng_scores": [22],
      "score_percentile": 99, "area_mm2_thr": 1.0}


def test_c1_calibrate_ng_midpoint_threshold_and_file(client: TestClient, models_dir: Path) -> None:
    response = client.post("/calibrate_ng", json=C1)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"threshold", "ok_mean", "ng_mean", "p99_ok", "p5_ng", "mm_per_px", "area_mm2_thr",
                         "score_percentile", "request_id", "recipe_id"}
    assert body["p99_ok"] == pytest.approx(12.96)
    assert body["p5_ng"] == pytest.approx(22.0)
    assert body["threshold"] == pytest.approx(17.48)
    assert body["ok_mean"] == pytest.approx(34 / 3)
    assert body["ng_mean"] == 22.0 and body["mm_per_px"] == 0.2
    assert body["area_mm2_thr"] == 1.0 and body["score_percentile"] == 99
    assert body["recipe_id"] == "default"
    stored = json.loads((models_dir / "recipes" / "default" / PATTERN / f"{MASTER_BASE}_calib.json").read_text())
    for key in ("threshold", "ok_mean", "ng_mean", "p99_ok", "p5_ng", "mm_per_px", "area_mm2_thr",
                "score_percentile"):
        assert stored[key] == body[key]


@pytest.mark.parametrize("ng", [None, "absent"])
def test_c2_c4_without_ng_scores_threshold_is_ok_percentile(client: TestClient, ng: object) -> None:
    payload = dict(C1)
    if ng == "absent":
        del payload["ng_scores"]
    else:
        payload["ng_scores"] = None
    body = client.post("/calibrate_ng", json=payload).json()
    assert body["threshold"] == pytest.approx(12.96)
    assert body["p5_ng"] is None and body["ng_mean"] == 0.0


def test_c3_overlapping_ng_raises_threshold_by_two_percent(client: TestClient) -> None:
    body = client.post("/calibrate_ng", json={**C1, "ng_scores": [12]}).json()
    assert body["threshold"] == pytest.approx(12.96 * 1.02)


@pytest.mark.parametrize("ok_scores", [[], [float("nan"), float("nan")]])
def test_c5_no_usable_ok_score_is_400_shape_a(client: TestClient, ok_scores: list[float]) -> None:
    body = json.dumps({**C1, "ok_scores": ok_scores})  # NaN as the JSON token, like Python clients send
    response = client.post("/calibrate_ng", content=body, headers={"Content-Type": "application/json"})
    error = assert_shape_a(response)
    assert "Se requiere al menos 1 score OK" in error


def test_c6_score_percentile_50(client: TestClient) -> None:
    body = client.post("/calibrate_ng", json={**C1, "score_percentile": 50}).json()
    assert body["p99_ok"] == pytest.approx(11.0) and body["threshold"] == pytest.approx(16.5)


def test_score_percentile_float_is_truncated(client: TestClient) -> None:
    body = client.post("/calibrate_ng", json={**C1, "score_percentile": 50.9}).json()
    assert body["score_percentile"] == 50 and body["p99_ok"] == pytest.approx(11.0)


def test_c7_json_recipe_last_is_reserved(client: TestClient) -> None:
    detail = assert_shape_c(client.post("/calibrate_ng", json={"recipe_id": "last"}))
    assert "reserved" in detail["error"]


def test_c8_missing_role_id_is_keyerror_text(client: TestClient) -> None:
    assert assert_shape_a(client.post("/calibrate_ng", json={"roi_id": "x", "ok_scores": [1]})) == "'role_id'"


def test_c9_array_body_is_422(client: TestClient) -> None:
    response = client.post("/calibrate_ng", json=[1, 2])
    assert response.status_code == 422 and isinstance(response.json()["detail"], list)


def test_c10_non_numeric_score_is_400_shape_a(client: TestClient) -> None:
    assert_shape_a(client.post("/calibrate_ng", json={**C1, "ok_scores": [1.0, "a"]}))


# ---------------------------------------------------------------------------------------------- I

INFER_KEYS = {"score", "threshold", "token_shape", "heatmap_png_base64", "regions", "request_id", "recipe_id",
              "decision", "lineage",  # lineage: additive (issue 17), the GUI ignores unknown fields
              "review", "threshold_low", "threshold_high"}  # the OK / review / NG band: additive (issue 29)
HIGH_THRESHOLD = [10.0]  # distances are ≤ 2, so every crop is "ok"
LOW_THRESHOLD = [1e-6]  # every crop is "ng" and most of the mask is a region


def full_rect(width: int = 96, height: int = 80) -> str:
    return json.dumps({"kind": "rect", "x": 0, "y": 0, "w": width, "h": height})


def test_i1_ok_crop(fitted: TestClient) -> None:
    assert calibrate_ng(fitted, ok_scores=HIGH_THRESHOLD).status_code == 200
    response = infer(fitted, crop_png(seed=1), shape=full_rect())
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == INFER_KEYS
    assert isinstance(body["score"], float) and 0.0 <= body["score"] <= 2.0
    assert body["threshold"] == 10.0 and body["decision"] == "ok"
    assert body["review"] is False and body["threshold_low"] is None and body["threshold_high"] is None  # no band
    assert body["token_shape"] == [8, 8]
    assert body["heatmap_png_base64"] is None
    assert isinstance(body["regions"], list)
    assert body["request_id"] == response.headers["x-request-id"] and body["recipe_id"] == "default"


def test_i2_ng_crop_has_heatmap_and_sorted_regions(fitted: TestClient) -> None:
    assert calibrate_ng(fitted, ok_scores=LOW_THRESHOLD, area_mm2_thr=0.0).status_code == 200
    response = infer(fitted, crop_png(seed=7, defect="scratch"), shape=full_rect())
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["decision"] == "ng" and body["score"] >= body["threshold"]
    heatmap = decode_heatmap(body["heatmap_png_base64"])
    assert heatmap.dtype == np.uint8 and heatmap.shape == (80, 96)  # grayscale, H×W of the crop
    regions = body["regions"]
    assert regions, "a threshold near 0 must produce regions"
    for region in regions:
        assert {"bbox", "area_px", "area_mm2", "contour", "x", "y", "w", "h"} <= set(region)
        assert len(region["bbox"]) == 4 and all(isinstance(v, int) for v in region["bbox"])
        assert [region["x"], region["y"], region["w"], region["h"]] == [float(v) for v in region["bbox"]]
        assert all(isinstance(region[k], float) for k in ("x", "y", "w", "h"))
        assert region["area_mm2"] == pytest.approx(region["area_px"] * MM**2)
        assert all(len(point) == 2 for point in region["contour"])
    areas = [r["area_px"] for r in regions]
    assert areas == sorted(areas, reverse=True)


def test_i3_include_heatmap_true_on_ok(fitted: TestClient) -> None:
    calibrate_ng(fitted, ok_scores=HIGH_THRESHOLD)
    body = infer(fitted, crop_png(seed=1), include_heatmap="true").json()
    assert body["decision"] == "ok" and decode_heatmap(body["heatmap_png_base64"]).shape == (80, 96)


def test_i4_include_heatmap_false_on_ng(fitted: TestClient) -> None:
    calibrate_ng(fitted, ok_scores=LOW_THRESHOLD)
    body = infer(fitted, crop_png(seed=1), include_heatmap="false").json()
    assert body["decision"] == "ng" and body["heatmap_png_base64"] is None


def test_i5_circle_mask_zeroes_heatmap_outside(fitted: TestClient) -> None:
    calibrate_ng(fitted, ok_scores=HIGH_THRESHOLD)
    shape = json.dumps({"kind": "circle", "cx": 48, "cy": 48, "r": 48})
    body = infer(fitted, disc_png(seed=1), shape=shape, include_heatmap="true").json()
    heatmap = decode_heatmap(body["heatmap_png_base64"])
    assert heatmap.shape == (96, 96)
    assert heatmap[0, 0] == heatmap[0, 95] == heatmap[95, 0] == heatmap[95, 95] == 0
    assert heatmap[30:66, 30:66].max() > 0


def test_i6_annulus_mask_zeroes_inner_disc_and_outside(fitted: TestClient) -> None:
    calibrate_ng(fitted, ok_scores=HIGH_THRESHOLD)
    shape = json.dumps({"kind": "annulus", "cx": 48, "cy": 48, "r": 44, "r_inner": 16})
    body = infer(fitted, disc_png(seed=1), shape=shape, include_heatmap="true").json()
    heatmap = decode_heatmap(body["heatmap_png_base64"])
    assert heatmap[40:57, 40:57].max() == 0  # inside r_inner
    assert heatmap[0, 0] == heatmap[95, 95] == 0
    assert heatmap.max() > 0


def test_i7_empty_or_absent_shape_means_whole_image(fitted: TestClient) -> None:
    calibrate_ng(fitted, ok_scores=HIGH_THRESHOLD)
    image = crop_png(seed=2)
    scores = {
        infer(fitted, image).json()["score"],
        infer(fitted, image, shape="").json()["score"],
        infer(fitted, image, shape="{}").json()["score"],
        infer(fitted, image, shape="null").json()["score"],
        infer(fitted, image, shape=full_rect()).json()["score"],
    }
    assert len(scores) == 1


def test_i8_malformed_shape_is_400_not_500(fitted: TestClient) -> None:
    """Our improvement: 400 A instead of the reference's 500 A."""
    calibrate_ng(fitted, ok_scores=HIGH_THRESHOLD)
    assert "shape" in assert_shape_a(infer(fitted, crop_png(seed=1), shape="{bad json"))


def test_i9_not_fitted(client: TestClient) -> None:
    error = assert_shape_a(infer(client, crop_png(seed=1)))
    assert error == "Memoria no encontrada. Ejecuta /fit_ok antes de /infer."


def test_i10_fitted_without_calibration(fitted: TestClient) -> None:
    assert assert_shape_a(infer(fitted, crop_png(seed=1))) == "calibration_missing"


def test_i10_threshold_not_above_zero_is_calibration_missing(fitted: TestClient) -> None:
    assert calibrate_ng(fitted, ok_scores=[-1.0]).status_code == 200
    assert assert_shape_a(infer(fitted, crop_png(seed=1))).startswith("calibration_missing")


def test_i11_memory_error_comes_before_calibration_error(client: TestClient) -> None:
    assert assert_shape_a(infer(client, crop_png(seed=1))).startswith("Memoria no encontrada")


def test_i12_lock_mismatch_is_checked_before_decode_and_memory(client: TestClient) -> None:
    upload(client, "ok", seeds=[1])  # locks 0.2
    detail = assert_shape_c(infer(client, b"hello", mm_per_px=0.25), 409)
    assert "mm_per_px mismatch" in detail["error"]


def test_i13_negative_mm_per_px_is_400_shape_b(client: TestClient) -> None:
    assert assert_shape_b(infer(client, crop_png(seed=1), mm_per_px=-1)) == "mm_per_px must be > 0 and finite"


def test_i14_undecodable_image_is_400_not_500(client: TestClient) -> None:
    """Our improvement: 400 A instead of 500 A; the text matches no GUI memory/calibration phrase."""
    error = assert_shape_a(infer(client, b"hello"))
    assert error.startswith("No se pudo decodificar la imagen")
    lowered = error.lower()
    assert not any(p in lowered for p in GUI_MEMORY_PHRASES) and "calibration" not in lowered


def test_i15_memory_with_other_token_grid(
    client: TestClient, models_dir: Path, tiny_extractor: FeatureExtractor
) -> None:
    """A legacy flat-layout memory whose grid (5×5) differs from the extractor's (8×8)."""
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((25, tiny_extractor.embed_dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    legacy = models_dir / f"{ROLE}_{ROI}"
    models_dir.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(f"{legacy}.npz", emb=emb, token_h=np.int64(5), token_w=np.int64(5),
                        metadata=np.asarray("{}"))
    index = faiss.IndexFlatL2(emb.shape[1])
    index.add(emb)
    Path(f"{legacy}_index.faiss").write_bytes(faiss.serialize_index(index).tobytes())
    fingerprint = Memory(embeddings=emb, token_shape=(5, 5)).fingerprint  # a calibration bound to it
    Path(f"{legacy}_calib.json").write_text(json.dumps({"threshold": 0.5, "memory_fingerprint": fingerprint}))
    error = assert_shape_a(infer(client, crop_png(seed=1)))
    assert error == "Token grid mismatch: got (8, 8), expected (5, 5)"


def test_i16_missing_index_is_not_fitted_while_state_says_fitted(fitted: TestClient, models_dir: Path) -> None:
    calibrate_ng(fitted, ok_scores=HIGH_THRESHOLD)
    (models_dir / "recipes" / "default" / ROI / f"{BASE}_index.faiss").unlink()
    error = assert_shape_a(infer(fitted, crop_png(seed=1)))
    assert any(p in error.lower() for p in GUI_MEMORY_PHRASES)
    state = fitted.get("/state", params={"role_id": ROLE, "roi_id": ROI}).json()
    assert state["memory_fitted"] is True


def test_i17_recipe_without_model_falls_back_to_default(fitted: TestClient) -> None:
    calibrate_ng(fitted, ok_scores=HIGH_THRESHOLD)
    response = infer(fitted, crop_png(seed=1), headers={"X-Recipe-Id": "r1"})
    assert response.status_code == 200, response.text
    assert response.json()["recipe_id"] == "r1"


def test_i18_square_crop_score_is_a_distance_in_0_2(fitted: TestClient) -> None:
    calibrate_ng(fitted, ok_scores=HIGH_THRESHOLD)
    for seed, defect in ((1, None), (8, "pit"), (9, "crack")):
        score = infer(fitted, disc_png(seed=seed, size=112, defect=defect)).json()["score"]
        assert 0.0 <= score <= 2.0


# ---------------------------------------------------------------------------------------------- S/M


def test_s1_state_with_nothing_fitted(client: TestClient) -> None:
    response = client.get("/state", params={"role_id": ROLE, "roi_id": ROI})
    assert response.status_code == 200
    assert response.json() == {
        "status": "ok", "memory_fitted": False, "calib_present": False,
        "request_id": response.headers["x-request-id"], "recipe_id": "default",
        "role_id": ROLE, "roi_id": ROI, "model_key": ROI, "lineage": None,
    }


def test_s2_state_after_fit_and_calibrate(calibrated: TestClient) -> None:
    body = calibrated.get("/state", params={"role_id": ROLE, "roi_id": ROI}).json()
    assert body["memory_fitted"] is True and body["calib_present"] is True


def test_s3_state_without_role_id_is_422(client: TestClient) -> None:
    assert client.get("/state", params={"roi_id": ROI}).status_code == 422


def test_state_reports_the_raw_model_key(client: TestClient) -> None:
    body = client.get("/state", params={"role_id": ROLE, "roi_id": ROI, "model_key": "a b"}).json()
    assert body["model_key"] == "a b"


def test_m1_manifest_after_fit_calibrate_and_upload(calibrated: TestClient) -> None:
    response = calibrated.get("/manifest", params={"role_id": ROLE, "roi_id": ROI})
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"role_id", "roi_id", "recipe_id", "model_key", "memory", "calib", "datasets",
                         "request_id", "lineage"}
    assert body["memory"] is True and body["model_key"] == ROI
    assert body["calib"]["threshold"] > 0
    assert set(body["datasets"]) == {"role_id", "roi_id", "classes"}
    assert body["datasets"]["classes"]["ok"]["count"] == 10
    assert body["datasets"]["classes"]["ng"]["count"] == 1


def test_m2_manifest_model_key_is_filesystem_sanitised(client: TestClient) -> None:
    body = client.get("/manifest", params={"role_id": ROLE, "roi_id": ROI, "model_key": "a b"}).json()
    assert body["model_key"] == "a_b" and body["memory"] is False and body["calib"] is None


def test_an_old_calibration_file_is_served_as_stored_and_still_applies(
    calibrated: TestClient, models_dir: Path
) -> None:
    """A calib.json without percentile, area or counts: /manifest passes it through, /infer scores with the
    resolved scoring config's percentile and area."""
    path = models_dir / "recipes" / "default" / ROI / f"{BASE}_calib.json"
    stored = json.loads(path.read_text())
    old = {"threshold": stored["threshold"], "memory_fingerprint": stored["memory_fingerprint"]}
    path.write_text(json.dumps(old))
    params = {"role_id": ROLE, "roi_id": ROI}
    assert calibrated.get("/manifest", params=params).json()["calib"] == old
    state = calibrated.get("/state", params=params).json()
    assert state["calib_present"] is True and state["lineage"]["threshold_source"] == "api"
    response = infer(calibrated, crop_png(seed=1))
    assert response.status_code == 200, response.text
    assert response.json()["threshold"] == old["threshold"]


# ---------------------------------------------------------------------------------------------- CD/ID


def test_cd1_calibrate_dataset(calibrated: TestClient, models_dir: Path) -> None:
    response = calibrated.post("/calibrate_dataset", json={"role_id": ROLE, "roi_id": ROI, "default_mm_per_px": 0.2})
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"status", "threshold", "score_percentile", "area_mm2_thr", "n_ok", "n_ng", "request_id",
                         "recipe_id", "role_id", "roi_id", "model_key",
                         # additive (issue 29): NG samples were calibrated on, so the OK / review / NG band is set
                         "threshold_low", "threshold_high", "band_escape_budget", "band_false_reject_budget",
                         "band_collapsed", "band_escape_rate", "band_false_reject_rate", "review_rate"}
    assert body["status"] == "ok" and isinstance(body["threshold"], float) and body["threshold"] > 0
    assert body["score_percentile"] == 99 and body["area_mm2_thr"] == 1.0
    assert body["n_ok"] == 10 and body["n_ng"] == 1 and body["model_key"] == ROI
    stored = json.loads((models_dir / "recipes" / "default" / ROI / f"{BASE}_calib.json").read_text())
    assert {"threshold", "score_percentile", "area_mm2_thr", "recipe_id", "role_id", "roi_id", "model_key",
            "created_at_utc"} <= set(stored)
    assert stored["threshold"] == body["threshold"]


def test_cd2_no_ng_samples_is_400_shape_b(fitted: TestClient) -> None:
    response = fitted.post("/calibrate_dataset", json={"role_id": ROLE, "roi_id": ROI})
    assert assert_shape_b(response) == "No NG samples available for calibration."


def test_cd3_require_ng_false_uses_ok_percentile(fitted: TestClient) -> None:
    response = fitted.post("/calibrate_dataset", json={"role_id": ROLE, "roi_id": ROI, "require_ng": False})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["n_ng"] == 0 and body["n_ok"] == 10
    items = fitted.post("/infer_dataset", json={"role_id": ROLE, "roi_id": ROI, "labels": ["ok"]}).json()["items"]
    assert body["threshold"] == pytest.approx(float(np.percentile([i["score"] for i in items], 99)))


def test_cd4_not_fitted_is_400_shape_b(client: TestClient) -> None:
    response = client.post("/calibrate_dataset", json={"role_id": ROLE, "roi_id": ROI})
    assert assert_shape_b(response).startswith("Memoria no encontrada")


def test_cd5_samples_without_mm_per_px_are_skipped(client: TestClient) -> None:
    upload(client, "ok", seeds=range(10), with_meta=False)
    upload(client, "ng", seeds=[100], defect="pit", with_meta=False)
    assert fit_from_dataset(client).status_code == 200
    response = client.post("/calibrate_dataset", json={"role_id": ROLE, "roi_id": ROI})
    assert assert_shape_b(response) == "No valid OK samples for calibration."


def test_id1_infer_dataset_items(calibrated: TestClient) -> None:
    response = calibrated.post("/infer_dataset", json={"role_id": ROLE, "roi_id": ROI, "default_mm_per_px": 0.2})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"status", "role_id", "roi_id", "recipe_id", "model_key", "request_id", "n_total",
                         "n_errors", "items"}
    assert body["n_total"] == 11 and body["n_errors"] == 0
    for item in body["items"]:
        assert set(item) == {"label", "filename", "mm_per_px", "score", "threshold", "regions", "n_regions",
                             "error",
                             "review", "threshold_low", "threshold_high"}  # the OK / review / NG band: additive
        assert item["error"] is None and item["mm_per_px"] == MM
        assert item["n_regions"] == len(item["regions"])
        assert all("x" not in region for region in item["regions"])  # raw regions
    assert [i["label"] for i in body["items"]].count("ng") == 1


def test_id1_infer_dataset_with_heatmaps(calibrated: TestClient) -> None:
    body = calibrated.post(
        "/infer_dataset", json={"role_id": ROLE, "roi_id": ROI, "labels": ["ng"], "include_heatmap": True}
    ).json()
    (item,) = body["items"]
    assert decode_heatmap(item["heatmap_png_base64"]).shape == (96, 96)


def test_id2_calibration_missing_is_400_shape_b(fitted: TestClient) -> None:
    response = fitted.post("/infer_dataset", json={"role_id": ROLE, "roi_id": ROI})
    assert assert_shape_b(response) == "calibration_missing"
