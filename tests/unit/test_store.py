"""Unit tests for bdi.storage.store: ids, layout, fallbacks, consistent model files, the mm_per_px lock."""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bdi.config import MemoryConfig, ModelConfig, ScoringConfig
from bdi.errors import (
    CalibrationMissingError,
    InvalidScaleError,
    ScaleMismatchError,
    StorageError,
)
from bdi.logging import configure_logging, disable_logging
from bdi.patchcore.calibration import Calibration
from bdi.patchcore.knn import FAISS_AVAILABLE
from bdi.patchcore.memory import Memory, build_index, fit_memory
from bdi.refs import (
    ModelRef,
    sanitize_model_key,
)
from bdi.storage.fsio import FileIdentity, atomic_write_bytes
from bdi.storage.store import ModelStore

CFG = MemoryConfig(coreset_rate=0.5, projection_dim=0)
SCORING = ModelConfig().scoring  # resolved for the default backbone
BASE = "SW5zcGVjdGlvbg__aW5zcGVjdGlvbi0x"
needs_faiss = pytest.mark.skipif(not FAISS_AVAILABLE, reason="faiss not installed")


def _memory(seed: int, rows: int = 40, dim: int = 8) -> Memory:
    features = np.random.default_rng(seed).normal(size=(rows, dim)).astype(np.float32)
    return fit_memory(features, token_shape=(2, 2), cfg=CFG, n_images=rows // 4)


def _ref(recipe: str | None = None, model_key: str | None = None) -> ModelRef:
    return ModelRef.create(recipe_id=recipe, role_id="Inspection", roi_id="inspection-1", model_key=model_key)


def _calib(threshold: float, *, memory_fingerprint: str | None = None) -> Calibration:
    return Calibration(threshold=threshold, score_percentile=95, area_mm2_thr=2.0,
                       memory_fingerprint=memory_fingerprint, created_at_utc="2024-01-01T00:00:00Z")


def _save(store: ModelStore, ref: ModelRef, memory: Memory) -> None:
    store.save_model(ref, memory, build_index(memory, CFG))


def _assert_consistent(memory: Memory, index: Any) -> None:
    """The index is built over exactly these rows: each row finds itself at distance 0."""
    assert index.size == memory.size and index.dim == memory.dim
    k = min(3, memory.size)
    dist, idx = index.search(np.asarray(memory.embeddings[:k]), k=1)
    assert idx[:, 0].tolist() == list(range(k))
    assert float(dist.max()) < 1e-5


@pytest.fixture()
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "models")


@pytest.fixture()
def log_file(tmp_path: Path) -> Iterator[Path]:
    path = configure_logging(tmp_path / "logs")
    assert path is not None
    yield path
    disable_logging()


def _events(path: Path, event: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [line for line in lines if line["event"] == event]


# ------------------------------------------------------------------------------------ layout and round trip


def test_paths_follow_the_current_layout(store: ModelStore) -> None:
    paths = store.paths(_ref(model_key="a b"))
    directory = store.root / "recipes" / "default" / "a~20b"
    assert paths.memory == directory / f"{BASE}.npz"
    assert paths.index == directory / f"{BASE}_index.faiss"
    assert paths.calib == directory / f"{BASE}_calib.json"


def test_save_then_load_model_round_trips(store: ModelStore) -> None:
    memory = _memory(0)
    _save(store, _ref(), memory)
    loaded = store.load_model(_ref())
    assert loaded is not None
    np.testing.assert_array_equal(loaded.memory.embeddings, memory.embeddings)
    assert loaded.memory.token_shape == (2, 2)
    assert dict(loaded.memory.metadata) == dict(memory.metadata)
    assert loaded.fingerprint == memory.fingerprint == loaded.memory.fingerprint
    assert loaded.memory_path == store.paths(_ref()).memory
    assert loaded.index is not None
    _assert_consistent(loaded.memory, loaded.index)


def test_saved_npz_has_the_contract_keys_and_no_pickle(store: ModelStore) -> None:
    memory = _memory(0)
    _save(store, _ref(), memory)
    with np.load(store.paths(_ref()).memory, allow_pickle=False) as npz:
        assert npz["emb"].dtype == np.float32
        assert (int(npz["token_h"]), int(npz["token_w"])) == (2, 2)
        meta = json.loads(str(npz["metadata"]))
    assert meta["coreset_rate"] == 0.5 and meta["applied_rate"] == 0.5
    assert meta["fingerprint"] == memory.fingerprint
    if FAISS_AVAILABLE:
        assert len(meta["index_sha256"]) == 64


def test_writes_leave_no_temp_files(store: ModelStore) -> None:
    for seed in range(3):
        _save(store, _ref(), _memory(seed))
        store.calibrations.save(_ref(), _calib(float(seed)))
    directory = store.paths(_ref()).memory.parent
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        [f"{BASE}.npz", f"{BASE}_calib.json"] + ([f"{BASE}_index.faiss"] if FAISS_AVAILABLE else [])
    )


def test_load_returns_none_when_nothing_is_fitted(store: ModelStore) -> None:
    assert store.load_model(_ref()) is None
    assert store.load_memory(_ref()) is None
    assert store.calibrations.load(_ref(), defaults=SCORING) is None
    assert store.calibrations.document(_ref()) is None


@needs_faiss
def test_missing_index_gives_no_index_but_memory_still_loads(store: ModelStore) -> None:
    _save(store, _ref(), _memory(0))
    store.paths(_ref()).index.unlink()
    loaded = store.load_model(_ref())
    assert loaded is not None and loaded.index is None
    assert store.load_memory(_ref()) is not None


def test_saving_without_an_index_removes_the_old_one(store: ModelStore) -> None:
    _save(store, _ref(), _memory(0))
    store.save_model(_ref(), _memory(1), None)
    assert not store.paths(_ref()).index.exists()
    loaded = store.load_model(_ref())
    assert loaded is not None and loaded.memory.fingerprint == _memory(1).fingerprint


def test_corrupt_npz_raises_storage_error(store: ModelStore) -> None:
    _save(store, _ref(), _memory(0))
    path = store.paths(_ref()).memory
    good = path.read_bytes()
    for bad in (b"not a zip at all", good[: len(good) // 2]):
        path.write_bytes(bad)
        with pytest.raises(StorageError, match="corrupt memory file"):
            store.load_model(_ref())
        with pytest.raises(StorageError, match="corrupt memory file"):
            store.load_memory(_ref())


def test_npz_without_required_keys_raises_storage_error(store: ModelStore) -> None:
    path = store.paths(_ref()).memory
    buf = io.BytesIO()
    np.savez_compressed(buf, other=np.zeros(3))
    atomic_write_bytes(path, buf.getvalue())
    with pytest.raises(StorageError, match="corrupt memory file"):
        store.load_memory(_ref())


@needs_faiss
def test_a_torn_pair_is_detected_and_the_index_rebuilt(store: ModelStore, log_file: Path) -> None:
    old, new = _memory(0, rows=40), _memory(1, rows=60)
    _save(store, _ref(), old)
    old_index_bytes = store.paths(_ref()).index.read_bytes()
    _save(store, _ref(), new)
    store.paths(_ref()).index.write_bytes(old_index_bytes)  # as if a save crashed between its writes
    loaded = store.load_model(_ref())
    assert loaded is not None and loaded.index is not None
    assert loaded.memory.fingerprint == new.fingerprint
    _assert_consistent(loaded.memory, loaded.index)
    assert _events(log_file, "storage.index_mismatch")


# ------------------------------------------------------------------------------------------ fallbacks


def test_recipe_falls_back_to_the_default_recipe(store: ModelStore) -> None:
    _save(store, _ref(), _memory(0))
    res = store.resolve(_ref("r1"), "memory")
    assert res.path == store.paths(_ref()).memory
    assert res.probed[0] == store.paths(_ref("r1")).memory
    assert store.load_model(_ref("r1")) is not None


def test_recipe_dir_matches_case_insensitively(store: ModelStore) -> None:
    _save(store, _ref("mylayout"), _memory(0))
    src = store.root / "recipes" / "mylayout"
    src.rename(store.root / "recipes" / "MyLayout")
    res = store.resolve(_ref("mylayout"), "memory")
    assert res.path == store.root / "recipes" / "MyLayout" / "inspection-1" / f"{BASE}.npz"


def test_default_recipe_does_not_match_other_cases(store: ModelStore) -> None:
    _save(store, _ref("r9"), _memory(0))
    (store.root / "recipes" / "r9").rename(store.root / "recipes" / "Default")
    assert store.resolve(_ref(), "memory").path is None


def test_legacy_flat_layout_is_read(store: ModelStore) -> None:
    _save(store, _ref("tmp"), _memory(0))
    paths = store.paths(_ref("tmp"))
    store.root.joinpath("Inspection_inspection-1.npz").write_bytes(paths.memory.read_bytes())
    store.root.joinpath("Inspection_inspection-1_calib.json").write_text('{"threshold": 1.5}')
    shutil.rmtree(store.root / "recipes")
    assert store.resolve(_ref(), "memory").path == store.root / "Inspection_inspection-1.npz"
    assert store.load_memory(_ref()) is not None
    assert store.calibrations.document(_ref()) == {"threshold": 1.5}
    calib = store.calibrations.load(_ref(), defaults=SCORING)
    assert calib is not None and calib.threshold == 1.5


def test_legacy_dir_layout_is_read(store: ModelStore) -> None:
    _save(store, _ref("tmp"), _memory(0))
    legacy = store.root / "Inspection" / "inspection-1"
    legacy.mkdir(parents=True)
    paths = store.paths(_ref("tmp"))
    (legacy / "memory.npz").write_bytes(paths.memory.read_bytes())
    if FAISS_AVAILABLE:
        (legacy / "index.faiss").write_bytes(paths.index.read_bytes())
    shutil.rmtree(store.root / "recipes")
    loaded = store.load_model(_ref())
    assert loaded is not None and loaded.memory_path == legacy / "memory.npz"
    assert loaded.index is not None
    _assert_consistent(loaded.memory, loaded.index)


def test_a_miss_logs_the_probed_paths(store: ModelStore, log_file: Path) -> None:
    res = store.resolve(_ref("r1"), "calib")
    assert res.path is None
    (event,) = _events(log_file, "storage.resolve_calib.not_found")
    assert event["probed_paths"] == [str(p) for p in res.probed]
    assert len(res.probed) == 4  # r1, default, legacy flat, legacy dir


def test_probed_paths_never_leave_the_root(store: ModelStore) -> None:
    ref = ModelRef.create(recipe_id="r1", role_id="../../etc", roi_id="/abs/../x", model_key="../..")
    root = store.root.resolve()
    for kind in ("memory", "index", "calib"):
        for path in store.resolve(ref, kind).probed:  # type: ignore[arg-type]
            assert path.resolve().is_relative_to(root), path


# ------------------------------------------------------------------------------------------ cache


def test_a_refit_is_seen_through_the_cache(store: ModelStore) -> None:
    first, second = _memory(0), _memory(1)
    _save(store, _ref(), first)
    assert store.load_model(_ref()).fingerprint == first.fingerprint  # type: ignore[union-attr]
    before = FileIdentity.of(store.paths(_ref()).memory)
    _save(store, _ref(), second)
    assert FileIdentity.of(store.paths(_ref()).memory) != before
    loaded = store.load_model(_ref())
    assert loaded is not None and loaded.fingerprint == second.fingerprint
    _assert_consistent(loaded.memory, loaded.index)
    assert store.load_memory(_ref()).fingerprint == second.fingerprint  # type: ignore[union-attr]


def test_an_unchanged_model_is_served_from_the_cache(store: ModelStore) -> None:
    _save(store, _ref(), _memory(0))
    assert store.load_model(_ref()) is store.load_model(_ref())


def test_calibration_round_trips_typed_and_a_rewrite_is_seen(store: ModelStore) -> None:
    calib = _calib(1.0, memory_fingerprint="abc")
    path = store.calibrations.save(_ref(), calib)
    assert path == store.paths(_ref()).calib
    assert path.read_text() == json.dumps(calib.to_dict(), indent=2)
    assert store.calibrations.load(_ref(), defaults=SCORING) == calib
    store.calibrations.save(_ref(), _calib(2.0))
    assert store.calibrations.load(_ref(), defaults=SCORING) == _calib(2.0)


def test_calibration_document_is_the_stored_object_and_a_copy(store: ModelStore) -> None:
    path = store.paths(_ref()).calib
    path.parent.mkdir(parents=True)
    path.write_text('{"threshold": 1.0, "legacy_key": [1]}')
    first = store.calibrations.document(_ref())
    assert first == {"threshold": 1.0, "legacy_key": [1]}
    first["legacy_key"].append(2)  # callers get a copy
    assert store.calibrations.document(_ref()) == {"threshold": 1.0, "legacy_key": [1]}


def test_an_old_calibration_without_percentile_or_area_reads_with_the_resolved_scoring(store: ModelStore) -> None:
    path = store.paths(_ref()).calib
    path.parent.mkdir(parents=True)
    path.write_text('{"threshold": 2, "memory_fingerprint": "m"}')
    defaults = ModelConfig(scoring=ScoringConfig(score_percentile=97, area_mm2_thr=3.0)).scoring
    calib = store.calibrations.load(_ref(), defaults=defaults)
    assert calib is not None
    assert (calib.threshold, calib.score_percentile, calib.area_mm2_thr) == (2.0, 97, 3.0)


def test_a_calibration_without_a_threshold_loads_as_calibration_missing(store: ModelStore) -> None:
    path = store.paths(_ref()).calib
    path.parent.mkdir(parents=True)
    path.write_text('{"score_percentile": 99}')
    with pytest.raises(CalibrationMissingError, match="threshold missing"):
        store.calibrations.load(_ref(), defaults=SCORING)
    assert store.calibrations.document(_ref()) == {"score_percentile": 99}


def test_copy_calibration_writes_the_document_as_stored_or_removes_the_target(store: ModelStore,
                                                                               tmp_path: Path) -> None:
    target = ModelStore(tmp_path / "target")
    path = store.paths(_ref()).calib
    path.parent.mkdir(parents=True)
    path.write_text('{"threshold": 1.5,"legacy_key": "kept"}')
    written = store.calibrations.copy(_ref(), target=target.calibrations)
    assert written == target.paths(_ref()).calib
    assert written.read_text() == json.dumps({"threshold": 1.5, "legacy_key": "kept"}, indent=2)
    path.unlink()
    assert store.calibrations.copy(_ref(), target=target.calibrations) is None
    assert not target.paths(_ref()).calib.exists()


def test_corrupt_calibration_reads_as_missing_and_is_logged(store: ModelStore, log_file: Path) -> None:
    path = store.calibrations.save(_ref(), _calib(1.0))
    path.write_text("{not json")
    assert store.calibrations.load(_ref(), defaults=SCORING) is None
    path.write_text("[1, 2]")
    assert store.calibrations.document(_ref()) is None
    assert len(_events(log_file, "storage.calib_corrupt")) == 2


def test_file_identity_of_a_missing_file_is_none(tmp_path: Path) -> None:
    assert FileIdentity.of(tmp_path / "nope") is None
    assert FileIdentity.of(tmp_path) is None


# ------------------------------------------------------------------------------------------ concurrency


def test_concurrent_refits_never_give_a_torn_read(tmp_path: Path) -> None:
    root = tmp_path / "models"
    memories = [_memory(seed, rows=20 + 10 * seed) for seed in range(4)]
    fingerprints = {m.fingerprint for m in memories}
    writer_store, reader_store = ModelStore(root), ModelStore(root)
    _save(writer_store, _ref(), memories[0])
    writer_store.calibrations.save(_ref(), _calib(1.0, memory_fingerprint=memories[0].fingerprint))
    done = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for i in range(1, 80):
                memory = memories[i % len(memories)]
                _save(writer_store, _ref(), memory)
                writer_store.calibrations.save(_ref(), _calib(float(i), memory_fingerprint=memory.fingerprint))
        except BaseException as exc:  # surfaced by the main thread
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    reads = 0
    try:
        while not done.is_set() or reads < 20:
            loaded = reader_store.load_model(_ref())
            assert loaded is not None and loaded.index is not None
            assert loaded.memory.fingerprint in fingerprints
            _assert_consistent(loaded.memory, loaded.index)
            calib = reader_store.calibrations.load(_ref(), defaults=SCORING)
            assert calib is not None and calib.memory_fingerprint in fingerprints
            reads += 1
    finally:
        thread.join()
    assert not errors, errors
    assert reads >= 20


# ------------------------------------------------------------------------------------------ mm_per_px lock


def test_first_mm_per_px_is_written_to_the_recipe_meta(store: ModelStore) -> None:
    store.lock_mm_per_px("r1", 0.2)
    meta = json.loads((store.root / "recipes" / "r1" / "recipe_meta.json").read_text())
    assert meta["mm_per_px"] == 0.2
    assert meta["created_at_utc"].endswith("Z")


def test_matching_mm_per_px_is_accepted_within_tolerance(store: ModelStore) -> None:
    store.lock_mm_per_px("r1", 0.2)
    store.lock_mm_per_px("r1", 0.2 + 5e-7)


def test_mismatching_mm_per_px_raises_with_the_gui_text(store: ModelStore) -> None:
    store.lock_mm_per_px("r1", 0.2)
    with pytest.raises(ScaleMismatchError) as info:
        store.lock_mm_per_px("r1", 0.25)
    assert str(info.value) == "mm_per_px mismatch for recipe 'r1': expected 0.2, got 0.25"
    store.lock_mm_per_px("r2", 0.25)  # the lock is per recipe


def test_invalid_mm_per_px_is_rejected_before_locking(store: ModelStore) -> None:
    with pytest.raises(InvalidScaleError):
        store.lock_mm_per_px("r1", float("nan"))
    assert not (store.root / "recipes" / "r1" / "recipe_meta.json").exists()


def test_recipe_meta_without_mm_per_px_gets_it_and_keeps_other_keys(store: ModelStore) -> None:
    meta_path = store.root / "recipes" / "r1" / "recipe_meta.json"
    meta_path.parent.mkdir(parents=True)
    meta_path.write_text('{"created_at_utc": "2020-01-01T00:00:00Z", "note": "x"}')
    store.lock_mm_per_px("r1", 0.3)
    assert json.loads(meta_path.read_text()) == {
        "created_at_utc": "2020-01-01T00:00:00Z", "note": "x", "mm_per_px": 0.3,
    }


def test_corrupt_recipe_meta_raises_storage_error(store: ModelStore) -> None:
    meta_path = store.root / "recipes" / "r1" / "recipe_meta.json"
    meta_path.parent.mkdir(parents=True)
    meta_path.write_text("{oops")
    with pytest.raises(StorageError, match="corrupt recipe meta"):
        store.lock_mm_per_px("r1", 0.3)


def _lock_in_process(root: str, value: float, barrier: Any, results: Any) -> None:
    store = ModelStore(Path(root))
    barrier.wait()
    try:
        store.lock_mm_per_px("shared", value)
        results.put(("ok", value, None))
    except ScaleMismatchError as exc:
        results.put(("mismatch", value, exc.expected))


def _race(root: Path, values: list[float]) -> list[tuple[str, float, float | None]]:
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(len(values)), ctx.Queue()
    procs = [ctx.Process(target=_lock_in_process, args=(str(root), v, barrier, results)) for v in values]
    for p in procs:
        p.start()
    out = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return out


def test_concurrent_first_writes_from_processes_agree_on_one_value(store: ModelStore) -> None:
    results = _race(store.root, [0.1, 0.2, 0.3, 0.4])
    stored = json.loads((store.root / "recipes" / "shared" / "recipe_meta.json").read_text())["mm_per_px"]
    winners = [value for status, value, _ in results if status == "ok"]
    assert winners == [stored]
    assert all(expected == stored for status, _, expected in results if status == "mismatch")


def test_concurrent_equal_first_writes_all_succeed(store: ModelStore) -> None:
    results = _race(store.root, [0.5] * 4)
    assert [status for status, _, _ in results] == ["ok"] * 4


# ------------------------------------------------------------------------------------------ listing


def test_list_models_decodes_ids_and_raw_model_keys(store: ModelStore) -> None:
    _save(store, _ref(model_key="a b"), _memory(0))
    store.calibrations.save(_ref(model_key="a b"), _calib(1.0))
    other = ModelRef.create(recipe_id="r1", role_id="Master", roi_id="Pattern", model_key=None)
    store.save_model(other, _memory(1), None)
    models = {m.ref: m for m in store.list_models()}
    assert set(models) == {_ref(model_key="a b"), other}
    assert models[_ref(model_key="a b")].calib_path == store.paths(_ref(model_key="a b")).calib
    assert models[other].index_path is None and models[other].calib_path is None
    assert store.model_keys("default") == ["a~20b"]
    assert store.model_keys("r1") == ["Pattern"]
    assert store.model_keys("r2") == []


# ------------------------------------------------------------------------------------------ model keys


def test_model_key_folder_mapping_is_injective(store: ModelStore) -> None:
    """``a b`` and ``a_b`` used to share ``a_b/``: two clients silently shared one model."""
    keys = ["a b", "a_b", "a~20b", "a/b", "a\\b", "é", "e\u0301", "k" * 81, "k" * 80]
    assert len({sanitize_model_key(k, roi_id="x") for k in keys}) == len(keys)
    for i, key in enumerate(keys[:2]):
        _save(store, _ref(model_key=key), _memory(i))
    loaded = [store.load_model(_ref(model_key=k)) for k in keys[:2]]
    assert [m.fingerprint for m in loaded if m] == [_memory(0).fingerprint, _memory(1).fingerprint]


def _legacy_save(store: ModelStore, ref: ModelRef, memory: Memory, *, folder: str) -> None:
    """What the legacy sanitiser wrote: the same files under the non-injective folder name."""
    paths = store.paths(ref)
    _save(store, ref, memory)
    legacy = paths.memory.parent.parent / folder
    paths.memory.parent.rename(legacy)


def test_legacy_model_key_folder_stays_readable_by_its_own_key(store: ModelStore) -> None:
    _legacy_save(store, _ref(model_key="a b"), _memory(0), folder="a_b")
    assert store.load_model(_ref(model_key="a b")).fingerprint == _memory(0).fingerprint  # type: ignore[union-attr]
    assert [m.ref.model_key for m in store.list_models()] == ["a b"]


def test_legacy_model_key_folder_is_not_read_by_another_key(store: ModelStore) -> None:
    _save(store, _ref(model_key="a_b"), _memory(1))  # a_b's own folder is also "a b"'s legacy name
    assert store.load_model(_ref(model_key="a b")) is None
    assert store.load_model(_ref(model_key="a_b")).fingerprint == _memory(1).fingerprint  # type: ignore[union-attr]


# ------------------------------------------------------------------------------------ cache events (metrics)


def test_cache_events_report_a_load_then_hits_and_a_reload_after_a_refit(tmp_path: Path) -> None:
    events: list[tuple[str, str]] = []
    store = ModelStore(tmp_path / "models", on_cache_event=lambda cache, event: events.append((cache, event)))
    _save(store, _ref(), _memory(0))
    store.load_model(_ref())
    store.load_model(_ref())
    model_events = [event for cache, event in events if cache == "model"]
    assert model_events == ["miss", "put", "hit"]
    _save(store, _ref(), _memory(1))  # a refit: new file identities, so the next read loads again
    store.load_model(_ref())
    assert [event for cache, event in events if cache == "model"][3:] == ["miss", "put"]
