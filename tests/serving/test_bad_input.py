"""Every bad input is a 4xx with the documented body shape, never a 500 (docs/design.md "Bad input is a 4xx")."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from serving.errors import internal_error_message
from tests.helpers.synthetic import disc_png

from .conftest import ROI, ROLE, ClientFactory, calibrate_ng, fit_from_dataset, infer, upload

PNG = disc_png(seed=1)


def error_text(response: httpx.Response, *, status: int, shape: str) -> str:
    """Assert status + body shape (A/B/C/D) and return the message."""
    assert response.status_code == status, response.text
    body: Any = response.json()
    assert response.headers["x-request-id"]
    if shape == "A":
        assert set(body) == {"error", "request_id", "recipe_id"}
        return str(body["error"])
    if shape == "B":
        assert set(body) == {"detail"} and isinstance(body["detail"], str)
        return str(body["detail"])
    if shape == "C":
        assert set(body["detail"]) == {"error", "request_id", "recipe_id"}
        return str(body["detail"]["error"])
    assert shape == "D" and isinstance(body["detail"], list)
    return json.dumps(body["detail"])


def upload_raw(client: TestClient, files: list[tuple[str, bytes]], **data: Any) -> httpx.Response:
    parts = [("images", (name, content, "image/png")) for name, content in files]
    return client.post("/datasets/ok/upload", data={"role_id": ROLE, "roi_id": ROI, **data}, files=parts)


# ------------------------------------------------------------------------------------ images


@pytest.mark.parametrize("content", [b"definitely not an image", b""], ids=["garbage", "empty"])
def test_infer_with_undecodable_or_empty_image_is_400_shape_a(client: TestClient, content: bytes) -> None:
    assert error_text(infer(client, content), status=400, shape="A").startswith("No se pudo decodificar")


@pytest.mark.parametrize("content", [b"definitely not an image", b""], ids=["garbage", "empty"])
def test_upload_of_undecodable_or_empty_image_is_400_and_stores_nothing(
    client: TestClient, models_dir: Path, content: bytes
) -> None:
    response = upload_raw(client, [("good.png", PNG), ("bad.png", content)])
    assert "No se pudo decodificar" in error_text(response, status=400, shape="B")
    assert not (models_dir / "recipes").exists() or not list((models_dir / "recipes").rglob("*.png"))


def test_fit_with_undecodable_uploaded_image_is_400_shape_a(client: TestClient) -> None:
    response = client.post(
        "/fit_ok", data={"role_id": ROLE, "roi_id": ROI, "mm_per_px": "0.2"},
        files=[("images", ("a.png", PNG, "image/png")), ("images", ("b.png", b"junk", "image/png"))],
    )
    assert error_text(response, status=400, shape="A").startswith("No se pudo decodificar")


# ------------------------------------------------------------------------------------ shape / metas / label


@pytest.mark.parametrize(
    "shape", ["{bad json", "[1, 2]", '"circle"', "3"], ids=["malformed", "list", "string", "number"]
)
def test_infer_with_bad_shape_is_400_shape_a(fitted: TestClient, shape: str) -> None:
    calibrate_ng(fitted, ok_scores=[10.0])
    assert "shape" in error_text(infer(fitted, PNG, shape=shape), status=400, shape="A")


@pytest.mark.parametrize(
    "metas", ["not json", "[1]", '{"shape_json": "{bad"}', "null", '"text"', "3", "true"],
    ids=["malformed", "array", "bad-shape", "null", "string", "number", "bool"],
)
def test_upload_with_bad_metas_is_400_shape_b(client: TestClient, metas: str) -> None:
    error_text(upload_raw(client, [("a.png", PNG)], metas=[metas]), status=400, shape="B")


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/datasets/file"), ("GET", "/datasets/meta"), ("DELETE", "/datasets/file"),
     ("DELETE", "/datasets/clear")],
)
def test_wrong_label_is_400_shape_b(client: TestClient, method: str, path: str) -> None:
    (saved,) = upload(client, "ok", seeds=[1])
    params = {"role_id": ROLE, "roi_id": ROI, "label": "good", "filename": saved}
    response = client.request(method, path, params=params)
    assert "label" in error_text(response, status=400, shape="B")


def test_infer_dataset_with_wrong_label_is_400_shape_a(calibrated: TestClient) -> None:
    response = calibrated.post("/infer_dataset", json={"role_id": ROLE, "roi_id": ROI, "labels": ["bad"]})
    assert "label" in error_text(response, status=400, shape="A")


# ------------------------------------------------------------------------------------ recipe ids


RECIPE_CALLS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "health": ("GET", "/health", {}),
    "state": ("GET", "/state", {"params": {"role_id": ROLE, "roi_id": ROI}}),
    "list": ("GET", "/datasets/list", {"params": {"role_id": ROLE, "roi_id": ROI}}),
    "fit": ("POST", "/fit_ok", {"data": {"role_id": ROLE, "roi_id": ROI, "mm_per_px": "0.2"}}),
    "calibrate": ("POST", "/calibrate_ng", {"json": {"role_id": ROLE, "roi_id": ROI, "ok_scores": [1]}}),
    "infer_dataset": ("POST", "/infer_dataset", {"json": {"role_id": ROLE, "roi_id": ROI}}),
}


@pytest.mark.parametrize("call", sorted(RECIPE_CALLS))
@pytest.mark.parametrize(("recipe", "word"), [("last", "reserved"), ("bad recipe!", "invalid"), ("x" * 65, "invalid")])
def test_bad_recipe_header_is_400_shape_c_everywhere(client: TestClient, call: str, recipe: str, word: str) -> None:
    method, path, kwargs = RECIPE_CALLS[call]
    response = client.request(method, path, headers={"X-Recipe-Id": recipe}, **kwargs)
    assert word in error_text(response, status=400, shape="C")
    assert response.json()["detail"]["recipe_id"] == "default"


def test_bad_recipe_in_query_is_400_shape_c(client: TestClient) -> None:
    response = client.get("/state", params={"role_id": ROLE, "roi_id": ROI, "recipe_id": "LAST"})
    assert "reserved" in error_text(response, status=400, shape="C")


def test_empty_explicit_recipe_falls_back_to_header(client: TestClient) -> None:
    response = client.get("/state", params={"role_id": ROLE, "roi_id": ROI, "recipe_id": ""},
                          headers={"X-Recipe-Id": "Line2"})
    assert response.status_code == 200 and response.json()["recipe_id"] == "line2"


def test_non_string_json_recipe_is_ignored(client: TestClient) -> None:
    response = client.post("/calibrate_ng", json={"role_id": ROLE, "roi_id": ROI, "ok_scores": [1], "recipe_id": 5},
                           headers={"X-Recipe-Id": "hdr"})
    assert response.status_code == 200 and response.json()["recipe_id"] == "hdr"


# ------------------------------------------------------------------------------------ numbers


@pytest.mark.parametrize("mm", ["0", "-0.5", "nan", "inf", "-inf"])
def test_infer_with_bad_mm_per_px_is_400_shape_b(client: TestClient, mm: str) -> None:
    response = infer(client, PNG, mm_per_px=mm)  # type: ignore[arg-type]
    assert error_text(response, status=400, shape="B") == "mm_per_px must be > 0 and finite"


@pytest.mark.parametrize(
    "body",
    [{"score_percentile": "abc"}, {"score_percentile": 150}, {"area_mm2_thr": "x"}, {"ok_scores": 5},
     {"ok_scores": "1,2"}, {"mm_per_px": "wide"}, {"role_id": 7}],
    ids=["percentile-text", "percentile-range", "area-text", "scores-number", "scores-string", "mm-text",
         "role-number"],
)
def test_calibrate_ng_with_bad_values_is_400_shape_a(client: TestClient, body: dict[str, Any]) -> None:
    payload = {"role_id": ROLE, "roi_id": ROI, "ok_scores": [1.0, 2.0], **body}
    error_text(client.post("/calibrate_ng", json=payload), status=400, shape="A")


def test_calibrate_ng_with_nan_percentile_is_400_shape_a(client: TestClient) -> None:
    body = '{"role_id": "r", "roi_id": "x", "ok_scores": [1], "score_percentile": NaN}'
    response = client.post("/calibrate_ng", content=body, headers={"Content-Type": "application/json"})
    assert "finite" in error_text(response, status=400, shape="A")


@pytest.mark.parametrize("model_key", ["..", ".", " .. ", "   "])
def test_dot_model_keys_are_rejected(client: TestClient, model_key: str) -> None:
    response = client.post("/calibrate_ng", json={"role_id": ROLE, "roi_id": ROI, "ok_scores": [1],
                                                  "model_key": model_key})
    assert "model_key" in error_text(response, status=400, shape="A")


def test_model_keys_that_sanitised_alike_are_different_models(client: TestClient, models_dir: Path) -> None:
    """``a b`` and ``a_b`` once shared the folder ``a_b``: two clients silently shared a model."""
    for key, score in (("a b", 1.0), ("a_b", 5.0)):
        assert calibrate_ng(client, ok_scores=[score], model_key=key).status_code == 200
    params = {"role_id": ROLE, "roi_id": ROI}
    thresholds = {key: client.get("/manifest", params={**params, "model_key": key}).json()["calib"]["threshold"]
                  for key in ("a b", "a_b")}
    assert thresholds == {"a b": 1.0, "a_b": 5.0}
    assert sorted(p.name for p in (models_dir / "recipes" / "default").iterdir() if p.is_dir()) == ["a_b", "a~20b"]


# ------------------------------------------------------------------------------------ missing fields (422)


@pytest.mark.parametrize(
    ("method", "path", "kwargs"),
    [
        ("POST", "/fit_ok", {"data": {"role_id": ROLE, "roi_id": ROI}}),
        ("POST", "/infer", {"data": {"role_id": ROLE, "roi_id": ROI, "mm_per_px": "0.2"}}),
        ("POST", "/infer", {"data": {"role_id": ROLE, "mm_per_px": "0.2"},
                            "files": {"image": ("a.png", PNG, "image/png")}}),
        ("POST", "/infer", {"data": {"role_id": ROLE, "roi_id": ROI, "mm_per_px": "0.2", "include_heatmap": "maybe"},
                            "files": {"image": ("a.png", PNG, "image/png")}}),
        ("POST", "/fit_ok", {"data": {"role_id": ROLE, "roi_id": ROI, "mm_per_px": "0.2", "use_dataset": "perhaps"}}),
        ("POST", "/datasets/ng/upload",
         {"data": {"role_id": ROLE}, "files": [("images", ("a.png", PNG, "image/png"))]}),
        ("GET", "/datasets/file", {"params": {"role_id": ROLE, "roi_id": ROI, "label": "ok"}}),
        ("GET", "/datasets/meta", {"params": {"role_id": ROLE, "roi_id": ROI, "filename": "x.png"}}),
        ("DELETE", "/datasets/clear", {"params": {"role_id": ROLE, "roi_id": ROI}}),
        ("GET", "/manifest", {"params": {"roi_id": ROI}}),
    ],
    ids=["fit-mm", "infer-image", "infer-roi", "infer-bool", "fit-bool", "upload-roi", "file-filename",
         "meta-label", "clear-label", "manifest-role"],
)
def test_missing_or_unparsable_fields_are_422(
    client: TestClient, method: str, path: str, kwargs: dict[str, Any]
) -> None:
    error_text(client.request(method, path, **kwargs), status=422, shape="D")


@pytest.mark.parametrize("path", ["/calibrate_ng", "/infer_dataset", "/calibrate_dataset"])
@pytest.mark.parametrize("body", ["[1, 2]", '"text"', "42", "{not json"], ids=["array", "string", "number", "broken"])
def test_non_object_json_body_is_422(client: TestClient, path: str, body: str) -> None:
    response = client.post(path, content=body, headers={"Content-Type": "application/json"})
    error_text(response, status=422, shape="D")


HUGE = "1" + "0" * 400  # a JSON integer no float can hold
NUMERIC_FIELDS: dict[str, list[str]] = {
    "/calibrate_ng": ["score_percentile", "area_mm2_thr", "mm_per_px"],
    "/calibrate_dataset": ["score_percentile", "area_mm2_thr", "default_mm_per_px"],
    "/infer_dataset": ["default_mm_per_px"],
}
OUT_OF_RANGE: dict[str, list[str]] = {
    "score_percentile": ["150", "-1", "100.5"],
    "area_mm2_thr": ["-0.5"],
    "mm_per_px": ["0", "-1"],
    "default_mm_per_px": ["0", "-0.2"],
}
NOT_A_NUMBER = ["true", '"abc"', "[1]", "{}", "1e999", HUGE, "NaN", "-Infinity"]


@pytest.mark.parametrize(
    ("path", "key", "raw"),
    [(path, key, raw) for path, keys in NUMERIC_FIELDS.items() for key in keys
     for raw in OUT_OF_RANGE[key] + NOT_A_NUMBER],
)
def test_every_numeric_json_field_out_of_range_is_400_naming_it(
    client: TestClient, path: str, key: str, raw: str
) -> None:
    """``score_percentile: 150`` was a 500 (issue 16); every numeric key of every JSON body is checked."""
    body = f'{{"role_id": "{ROLE}", "roi_id": "{ROI}", "ok_scores": [1.0], "{key}": {raw}}}'
    response = client.post(path, content=body, headers={"Content-Type": "application/json"})
    assert error_text(response, status=400, shape="A").startswith(f"{key}: ")


@pytest.mark.parametrize("scores", [f"[1.0, {HUGE}]", "[true]", '["1"]', '"1,2"'])
@pytest.mark.parametrize("key", ["ok_scores", "ng_scores"])
def test_score_lists_holding_non_numbers_are_400(client: TestClient, key: str, scores: str) -> None:
    body = f'{{"role_id": "{ROLE}", "roi_id": "{ROI}", "ok_scores": [1.0], "{key}": {scores}}}'
    response = client.post("/calibrate_ng", content=body, headers={"Content-Type": "application/json"})
    assert error_text(response, status=400, shape="A").startswith(f"{key}")


def test_numbers_in_range_and_numeric_strings_are_accepted(client: TestClient) -> None:
    response = calibrate_ng(client, ok_scores=[1.0, 2.0], score_percentile="95", area_mm2_thr=0, mm_per_px=0.1)
    assert response.status_code == 200, response.text
    assert (response.json()["score_percentile"], response.json()["area_mm2_thr"]) == (95, 0.0)


@pytest.mark.parametrize("path", ["/infer_dataset", "/calibrate_dataset"])
def test_dataset_jobs_without_role_id_are_keyerror_text(client: TestClient, path: str) -> None:
    assert error_text(client.post(path, json={"roi_id": ROI}), status=400, shape="A") == "'role_id'"


# ------------------------------------------------------------------------------------ limits


def test_oversized_upload_is_400_with_the_limit_named(client_factory: ClientFactory, models_dir: Path) -> None:
    client = client_factory(max_upload_bytes=len(PNG) - 1)
    message = error_text(upload_raw(client, [("a.png", PNG)]), status=400, shape="B")
    assert "BDI_MAX_UPLOAD_BYTES" in message and str(len(PNG) - 1) in message
    assert "BDI_MAX_UPLOAD_BYTES" in error_text(infer(client, PNG), status=400, shape="A")
    assert not (models_dir / "recipes").exists() or not list((models_dir / "recipes").rglob("*.png"))


def test_too_many_files_is_400_and_stores_nothing(client_factory: ClientFactory, models_dir: Path) -> None:
    client = client_factory(max_files_per_request=2)
    files = [(f"{i}.png", disc_png(seed=i)) for i in range(3)]
    assert "BDI_MAX_FILES_PER_REQUEST" in error_text(upload_raw(client, files), status=400, shape="B")
    assert not list(models_dir.rglob("*.png"))
    response = client.post(
        "/fit_ok", data={"role_id": ROLE, "roi_id": ROI, "mm_per_px": "0.2"},
        files=[("images", (name, content, "image/png")) for name, content in files],
    )
    assert "BDI_MAX_FILES_PER_REQUEST" in error_text(response, status=400, shape="A")


def test_image_over_the_pixel_limit_is_400(client_factory: ClientFactory) -> None:
    client = client_factory(max_image_pixels=1000)
    assert "BDI_MAX_IMAGE_PIXELS" in error_text(upload_raw(client, [("a.png", PNG)]), status=400, shape="B")


# ------------------------------------------------------------------------------------ request ids


@pytest.mark.parametrize("raw", ["x" * 129, "has space", "semi;colon", "ünïcode".encode()],
                         ids=["too-long", "space", "semicolon", "non-ascii"])
def test_unsafe_request_id_is_replaced_by_a_uuid4(client: TestClient, raw: str | bytes) -> None:
    response = client.get("/health", headers={"X-Request-Id": raw})
    assert response.status_code == 200
    replaced = response.json()["request_id"]
    assert replaced != raw and uuid.UUID(replaced).version == 4
    assert response.headers["x-request-id"] == replaced


def test_longest_safe_request_id_is_kept(client: TestClient) -> None:
    rid = "a" * 128
    assert client.get("/health", headers={"X-Request-Id": rid}).headers["x-request-id"] == rid


# ------------------------------------------------------------------------------------ server-side failures


def test_storage_failure_is_logged_500_shape_a_with_request_id(client_factory: ClientFactory, tmp_path: Path) -> None:
    """A models dir that is a regular file: the write fails as a StorageError → JSON 500 A."""
    blocked = tmp_path / "blocked"
    blocked.write_text("not a directory")
    client = client_factory(models_dir=blocked)
    response = client.post("/calibrate_ng", json={"role_id": ROLE, "roi_id": ROI, "ok_scores": [1.0]},
                           headers={"X-Request-Id": "rid-500"})
    message = error_text(response, status=500, shape="A")
    assert message == internal_error_message("rid-500")
    assert str(tmp_path) not in response.text and "blocked" not in response.text  # no server path leaks
    assert response.headers["x-request-id"] == "rid-500" and response.json()["request_id"] == "rid-500"
    log = (tmp_path / "logs" / "backend_diagnostics.jsonl").read_text().splitlines()
    events = [json.loads(line) for line in log]
    assert any(e["event"] == "calibrate_ng.error" and e.get("trace") and e["request_id"] == "rid-500"
               and str(blocked) in e["error_message"] for e in events)


def test_unexpected_exception_is_json_500_shape_a_not_plain_text(client_factory: ClientFactory) -> None:
    """The generic handler is installed on the app: a route added here raises a non-BDI error."""
    client = client_factory(raise_server_exceptions=False)

    def explode() -> None:
        raise RuntimeError("kaboom at /srv/secret/path")

    client.app.add_api_route("/explode", explode)  # type: ignore[attr-defined]
    response = client.get("/explode", headers={"X-Request-Id": "rid-boom"})
    assert error_text(response, status=500, shape="A") == internal_error_message("rid-boom")
    assert "kaboom" not in response.text and "/srv/secret" not in response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-request-id"] == "rid-boom"


def test_fit_and_infer_stay_available_after_bad_requests(client: TestClient) -> None:
    """Bad requests leave no state behind: a normal fit/infer afterwards works."""
    infer(client, b"junk")
    fit_from_dataset(client, mm_per_px="nan")  # type: ignore[arg-type]
    upload(client, "ok", seeds=range(10))
    assert fit_from_dataset(client).status_code == 200
    calibrate_ng(client, ok_scores=[10.0])
    assert infer(client, PNG).status_code == 200
