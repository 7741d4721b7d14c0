"""A /fit_ok of a model whose fit lock is held elsewhere is a 409 that says so (issue 16).

The two-process behaviour is tested in ``tests/unit/test_fit_lock.py``; here the lock is held by
the test itself and the request comes through the app.
"""

from __future__ import annotations

from bdi.refs import ModelRef
from bdi.service import InspectionService
from bdi.storage.store import ModelStore

from .conftest import MM, ROI, ROLE, ClientFactory, fit_from_dataset, upload


def test_fit_of_a_model_being_fitted_is_409_shape_a_after_the_bounded_wait(client_factory: ClientFactory) -> None:
    client = client_factory(fit_lock_timeout_s=0.2)
    upload(client, "ok", seeds=range(10))
    service: InspectionService = client.app.state.service  # type: ignore[attr-defined]
    ref = ModelRef.create(recipe_id="default", role_id=ROLE, roi_id=ROI, model_key=None)
    with ModelStore(service.settings.models_dir).fit_lock(ref, timeout_s=0):
        response = fit_from_dataset(client)
        other = fit_from_dataset(client, model_key="another-key")
    assert response.status_code == 409
    body = response.json()
    assert set(body) == {"error", "request_id", "recipe_id"}
    assert "another fit of model_key 'inspection-1'" in body["error"] and "retry" in body["error"]
    assert other.status_code == 200  # only the same model is serialised
    assert fit_from_dataset(client, mm_per_px=MM).status_code == 200  # released: fits again
