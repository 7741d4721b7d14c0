"""``recipes/<recipe>/recipe_meta.json``: the per-recipe ``mm_per_px`` lock (docs/contract.md "Scale lock").

The read-modify-write runs under a file lock (docs/design.md "Atomic writes and file locks"); the first value
wins and later ones must match it. :func:`check_mm_per_px` compares without writing (a request checks first and
locks only once it succeeded: docs/design.md "Failed requests leave nothing behind"), and
:func:`unlock_mm_per_px` is the documented reset (``bdi recipe unlock-scale``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bdi.errors import InvalidScaleError, ScaleMismatchError, StorageError
from bdi.patchcore.imaging import validate_mm_per_px
from bdi.storage.fsio import ABSENT, atomic_write_json, exclusive_lock, read_json, utc_now_iso

RECIPE_META_FILE = "recipe_meta.json"
RECIPE_LOCK_FILE = ".recipe_meta.lock"
LOCK_TIMEOUT_S = 30.0


def read_recipe_meta(recipe_dir: Path) -> dict[str, Any]:
    """The recipe meta ({} when absent); a corrupt file raises :class:`StorageError`."""
    path = recipe_dir / RECIPE_META_FILE
    try:
        value = read_json(path)
    except ValueError as exc:
        raise StorageError(f"corrupt recipe meta {path}: {exc}") from exc
    if value is ABSENT:
        return {}
    if not isinstance(value, dict):
        raise StorageError(f"corrupt recipe meta {path}: not a JSON object")
    return value


def check_mm_per_px(recipe_dir: Path, *, recipe_id: str, mm_per_px: float) -> None:
    """Raise :class:`ScaleMismatchError` when another value is locked; writes nothing (no folder either)."""
    _check_locked(recipe_dir, recipe_id=recipe_id, value=validate_mm_per_px(mm_per_px))


def unlock_mm_per_px(recipe_dir: Path, *, recipe_id: str) -> float | None:
    """Remove the recipe's locked ``mm_per_px`` (under the lock); the value it held, None when none was locked.

    The next successful ``/fit_ok`` or ``/infer`` locks its own value. Existing memories keep the scale they were
    fitted at: unlock only a recipe whose scale was locked by mistake."""
    if not (recipe_dir / RECIPE_META_FILE).is_file():
        return None

    def unusable(exc: OSError) -> StorageError:
        return StorageError(f"cannot unlock mm_per_px for recipe '{recipe_id}': {exc}")

    with exclusive_lock(
        recipe_dir / RECIPE_LOCK_FILE, timeout_s=LOCK_TIMEOUT_S,
        busy=lambda: StorageError(f"timed out waiting for the recipe lock of '{recipe_id}'"), unusable=unusable,
    ):
        try:
            meta = read_recipe_meta(recipe_dir)
            if "mm_per_px" not in meta:
                return None
            previous = meta.pop("mm_per_px")
            meta["mm_per_px_unlocked_at_utc"] = utc_now_iso()
            atomic_write_json(recipe_dir / RECIPE_META_FILE, meta, indent=2)
        except OSError as exc:
            raise unusable(exc) from exc
    try:
        return float(previous)
    except (TypeError, ValueError):
        return None


def lock_mm_per_px(recipe_dir: Path, *, recipe_id: str, mm_per_px: float) -> None:
    """First value wins per recipe; later ones must match within 1e-6·max(1,|a|,|b|) (ScaleMismatchError)."""
    value = validate_mm_per_px(mm_per_px)
    if _check_locked(recipe_dir, recipe_id=recipe_id, value=value):  # fast path: already locked, no file lock
        return

    def unusable(exc: OSError) -> StorageError:
        return StorageError(f"cannot lock mm_per_px for recipe '{recipe_id}': {exc}")

    with exclusive_lock(
        recipe_dir / RECIPE_LOCK_FILE, timeout_s=LOCK_TIMEOUT_S,
        busy=lambda: StorageError(f"timed out waiting for the recipe lock of '{recipe_id}'"), unusable=unusable,
    ):
        try:
            if _check_locked(recipe_dir, recipe_id=recipe_id, value=value):
                return
            meta = read_recipe_meta(recipe_dir)
            meta["mm_per_px"] = value
            meta.setdefault("created_at_utc", utc_now_iso())
            atomic_write_json(recipe_dir / RECIPE_META_FILE, meta, indent=2)
        except OSError as exc:
            raise unusable(exc) from exc


def _check_locked(recipe_dir: Path, *, recipe_id: str, value: float) -> bool:
    """True when a valid value is stored and matches; ScaleMismatchError when it differs."""
    stored = read_recipe_meta(recipe_dir).get("mm_per_px")
    try:
        expected = validate_mm_per_px(stored)
    except InvalidScaleError:
        return False  # absent or unusable: (re)written under the lock
    if abs(expected - value) > 1e-6 * max(1.0, abs(expected), abs(value)):
        raise ScaleMismatchError(recipe_id, expected, value)
    return True
