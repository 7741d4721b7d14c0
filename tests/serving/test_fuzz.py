"""schemathesis fuzzing of the app's OpenAPI schema: every route, a bounded number of examples.

No generated request may get a 5xx, and every response must match its documented schema (status
code, content type, body). The app is the real one around the tiny ViT, with a fitted and
calibrated model so /infer and the dataset routes do real work for well-formed requests.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from bdi.patchcore.features import FeatureExtractor
from bdi.service import InspectionService
from serving.app import create_app
from tests.helpers.synthetic import disc_png
from tests.helpers.tiny import tiny_settings

pytestmark = pytest.mark.slow

MAX_EXAMPLES = 12
ROLE, ROI = "Inspection", "inspection-1"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def fuzzed_app(tmp_path_factory: pytest.TempPathFactory, tiny_extractor: FeatureExtractor) -> Iterator[Any]:
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    settings_ = tiny_settings(tmp / "models", log_dir=tmp / "logs", min_ok_samples=2, max_dataset_images=20,
                              fit_lock_timeout_s=0)
    app = create_app(service=InspectionService(settings=settings_, extractor=tiny_extractor))
    with TestClient(app) as client:  # runs the lifespan, then keeps the app's state for the fuzzer
        for seed in range(3):
            response = client.post("/datasets/ok/upload", data={"role_id": ROLE, "roi_id": ROI},
                                   files=[("images", (f"{seed}.png", disc_png(seed=seed), "image/png"))])
            assert response.status_code == 200, response.text
        assert client.post("/fit_ok", data={"role_id": ROLE, "roi_id": ROI, "mm_per_px": "0.2",
                                            "use_dataset": "true"}).status_code == 200
        assert client.post("/calibrate_ng", json={"role_id": ROLE, "roi_id": ROI,
                                                  "ok_scores": [10.0]}).status_code == 200
        yield app


def test_every_route_answers_generated_requests_within_its_schema(fuzzed_app: Any) -> None:
    """Each operation of the schema, fuzzed on its own with hypothesis (bounded, derandomized), with
    data that fits the schema and data that does not (out-of-range numbers, wrong types, ...)."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzzed_app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15  # the contract's routes (docs/contract.md "Routes"), each fuzzed
    for operation, mode in itertools.product(operations, GenerationMode):

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case: Any) -> None:
            case.call_and_validate(checks=CHECKS)

        try:
            fuzz()
        except Unsatisfiable:
            assert mode is GenerationMode.NEGATIVE  # e.g. /health: nothing there can be made invalid
