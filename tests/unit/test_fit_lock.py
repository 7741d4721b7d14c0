"""One writer per model across processes (issue 16): the fit lock, tested with two real processes.

The child process builds its own service (spawned: a fresh interpreter, like a uvicorn worker) and
holds a real fit open from its progress callback until the parent says go.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bdi.data.synthetic import make_disc
from bdi.errors import FitInProgressError
from bdi.patchcore.features import FeatureExtractor
from bdi.refs import ModelRef
from bdi.service import InspectionService
from bdi.storage.store import ModelStore
from tests.helpers.tiny import tiny_settings

pytestmark = pytest.mark.slow  # each test spawns a fresh interpreter that builds its own ViT

REF = ModelRef.create(recipe_id="default", role_id="Inspection", roi_id="inspection-1", model_key=None)


def _discs(seed: int, n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [make_disc(size=96, rng=rng).image for _ in range(n)]


def _fit_in_child(models_dir: str, started: Any, release: Any, results: Any) -> None:
    settings = tiny_settings(Path(models_dir))
    service = InspectionService.from_settings(settings)

    def hold(stage: str, done: int, total: int) -> None:
        if stage == "encode" and not started.is_set():
            started.set()  # the fit lock is held from here on
            release.wait(120)

    result = service.fit_images(ref=REF, mm_per_px=0.2, images=_discs(7, 4), progress=hold)
    results.put(result.fingerprint)


class ChildFit:
    """A real fit in another process, paused inside the fit until :meth:`release`."""

    def __init__(self, models_dir: Path) -> None:
        ctx = mp.get_context("spawn")
        self.started, self._release, self._results = ctx.Event(), ctx.Event(), ctx.Queue()
        self._proc = ctx.Process(target=_fit_in_child,
                                 args=(str(models_dir), self.started, self._release, self._results))
        self._proc.start()
        assert self.started.wait(120), "the child fit never started"

    def release(self) -> str:
        self._release.set()
        fingerprint = str(self._results.get(timeout=120))
        self._proc.join(timeout=60)
        assert self._proc.exitcode == 0
        return fingerprint

    def kill(self) -> None:
        self._release.set()
        self._proc.join(timeout=60)


def _parent_service(models_dir: Path, tiny_extractor: FeatureExtractor, **overrides: Any) -> InspectionService:
    return InspectionService(settings=tiny_settings(models_dir, **overrides), extractor=tiny_extractor)


def test_second_fit_of_the_same_model_from_another_process_gets_fit_in_progress(
    tmp_path: Path, tiny_extractor: FeatureExtractor
) -> None:
    models_dir = tmp_path / "models"
    child = ChildFit(models_dir)
    try:
        parent = _parent_service(models_dir, tiny_extractor, fit_lock_timeout_s=0.3)
        started = time.monotonic()
        with pytest.raises(FitInProgressError, match="another fit of model_key 'inspection-1'.*BDI_FIT_LOCK_TIMEOUT_S"):
            parent.fit_images(ref=REF, mm_per_px=0.2, images=_discs(1, 2))
        assert 0.25 < time.monotonic() - started < 10  # it waited its bounded time, then gave up
        other = ModelRef.create(recipe_id="default", role_id="Inspection", roi_id="inspection-2", model_key=None)
        parent.fit_images(ref=other, mm_per_px=0.2, images=_discs(1, 2))  # another model is not blocked
    finally:
        child_fingerprint = child.release()
    assert ModelStore(parent.settings.models_dir).load_model(REF).fingerprint == child_fingerprint  # type: ignore[union-attr]
    parent.fit_images(ref=REF, mm_per_px=0.2, images=_discs(1, 2))  # free again once the child is done


def test_second_fit_waits_for_the_first_and_the_last_writer_wins_whole(
    tmp_path: Path, tiny_extractor: FeatureExtractor
) -> None:
    models_dir = tmp_path / "models"
    child = ChildFit(models_dir)
    parent = _parent_service(models_dir, tiny_extractor, fit_lock_timeout_s=60)
    outcome: dict[str, Any] = {}

    def fit() -> None:
        outcome["result"] = parent.fit_images(ref=REF, mm_per_px=0.2, images=_discs(1, 2))

    thread = threading.Thread(target=fit)
    thread.start()
    time.sleep(0.5)
    assert thread.is_alive() and "result" not in outcome  # waiting on the child's lock
    child.release()
    thread.join(timeout=120)
    loaded = ModelStore(parent.settings.models_dir).load_model(REF)
    assert loaded is not None and loaded.fingerprint == outcome["result"].fingerprint
    assert loaded.index is not None and loaded.index.size == loaded.memory.size  # a whole pair, never torn


def test_a_lock_left_by_a_dead_process_does_not_block(tmp_path: Path, tiny_extractor: FeatureExtractor) -> None:
    models_dir = tmp_path / "models"
    child = ChildFit(models_dir)
    child._proc.kill()  # SIGKILL while it holds the lock
    child._proc.join(timeout=30)
    parent = _parent_service(models_dir, tiny_extractor, fit_lock_timeout_s=5)
    parent.fit_images(ref=REF, mm_per_px=0.2, images=_discs(1, 2))
    assert list(models_dir.rglob(".*.fit.lock"))  # the file stays; the kernel dropped the lock
