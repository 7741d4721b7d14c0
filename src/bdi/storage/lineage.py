"""Where a served model came from: a lineage sidecar next to the model, and the view every answer carries.

The sidecar is ``<model dir>/<base>_lineage.json`` (beside ``<base>.npz``, ``_index.faiss`` and
``_calib.json`` in the ModelStore layout). It is written by the registry sync (``source: registry``) and
by API fits (``source: api``), and records the memory fingerprint it describes, so a sidecar left
behind by an older memory is never shown for a newer one. Every worker reads it from disk.

:func:`lineage_view` joins the sidecar with what the loaded files say themselves (backbone and weights
from the memory's metadata, the calibration's memory fingerprint) into the flat ``lineage`` object of
``/infer``, ``/manifest`` and ``/state``. ``threshold_source`` is

* ``calibration_run``: the calibration that came with the registered version (its run is named);
* ``api``: a calibration made through ``/calibrate_ng`` or ``/calibrate_dataset``;
* ``manual``: a threshold an operator set through ``/calibrate_manual`` (the calibration's ``source``);
* ``stale``: a calibration computed for another memory (``/infer`` answers ``calibration_missing``);
* ``None``: no calibration.

Conflict rule (docs/registry.md "Conflict rule (API vs registry)"): a model whose sidecar says the registry manages
it is refused to API writes (:func:`ensure_api_writable` → :class:`RegistryManagedError`, HTTP 409);
the registry, in turn, always replaces an API-fitted model when an alias holder exists for it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from bdi.errors import RegistryManagedError
from bdi.logging import slog
from bdi.patchcore.calibration import Calibration
from bdi.patchcore.memory import Memory
from bdi.refs import ModelRef
from bdi.storage.fsio import atomic_write_json, utc_now_iso
from bdi.storage.store import ModelStore

LINEAGE_SUFFIX = "_lineage.json"
SOURCE_REGISTRY = "registry"
SOURCE_API = "api"
SOURCE_UNKNOWN = "unknown"  # no sidecar for this memory (legacy folders, files copied by hand, pipeline outputs)
THRESHOLD_CALIBRATION_RUN = "calibration_run"
THRESHOLD_API = "api"
THRESHOLD_STALE = "stale"
THRESHOLD_MANUAL = "manual"


@dataclass(frozen=True)
class Lineage:
    """The sidecar's content. ``registered_*`` are set for registry models; ``calibration_*`` name the
    calibration that came with the model (its threshold and time identify it)."""

    source: str
    memory_fingerprint: str
    recorded_at_utc: str = field(default_factory=utc_now_iso)
    managed: bool = False  # True while a registry alias holds this model: API writes are refused
    registered_model: str | None = None
    registered_version: int | None = None
    registered_alias: str | None = None
    mlflow_run_id: str | None = None
    git_commit: str | None = None
    data_hash: str | None = None
    data_source: str | None = None
    calibration_run_id: str | None = None
    calibration_threshold: float | None = None
    calibration_created_at_utc: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Lineage | None:
        """The sidecar as read from disk; None when it lacks the two keys every sidecar has."""
        source, fingerprint = data.get("source"), data.get("memory_fingerprint")
        if not isinstance(source, str) or not isinstance(fingerprint, str):
            return None
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in data.items() if k in known}
        version = values.get("registered_version")
        values["registered_version"] = int(version) if isinstance(version, (int, str)) and str(version).isdigit() \
            else None
        threshold = values.get("calibration_threshold")
        values["calibration_threshold"] = float(threshold) if isinstance(threshold, (int, float)) else None
        values["managed"] = bool(values.get("managed", False))
        return cls(**values)

    def released(self) -> Lineage:
        """The same record, no longer managed (the alias was removed from the registered model)."""
        return replace(self, managed=False)

    def describes_calibration(self, calib: Calibration) -> bool:
        """True when ``calib`` is the calibration that came with this model (same threshold and time)."""
        return (self.calibration_created_at_utc is not None
                and calib.created_at_utc == self.calibration_created_at_utc
                and calib.threshold == self.calibration_threshold)


def lineage_path(store: ModelStore, ref: ModelRef) -> Path:
    """``<model dir>/<base>_lineage.json``, beside the memory (current layout only)."""
    return store.paths(ref).memory.with_name(f"{ref.base}{LINEAGE_SUFFIX}")


def read_lineage(store: ModelStore, ref: ModelRef) -> Lineage | None:
    """The sidecar, or None when absent or unreadable (a broken sidecar never fails a request)."""
    path = lineage_path(store, ref)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        slog("lineage.unreadable", path=str(path), error=str(exc))
        return None
    return Lineage.from_dict(data) if isinstance(data, dict) else None


def write_lineage(store: ModelStore, ref: ModelRef, lineage: Lineage) -> Path:
    """Atomically write the sidecar of ``ref``."""
    path = lineage_path(store, ref)
    atomic_write_json(path, lineage.to_dict(), indent=2)
    return path


def api_lineage(*, memory_fingerprint: str, data_hash: str | None, data_source: str) -> Lineage:
    """The sidecar of a model fitted through ``/fit_ok``: no registry, the images' hash as data."""
    return Lineage(source=SOURCE_API, memory_fingerprint=memory_fingerprint, data_hash=data_hash,
                   data_source=data_source)


def ensure_api_writable(store: ModelStore, ref: ModelRef) -> None:
    """Refuse an API fit or calibration of a model the registry manages (the conflict rule).

    Raises:
        RegistryManagedError: the sidecar says a registry alias holds this model; the message names
            the registered model, its version and alias.
    """
    lineage = read_lineage(store, ref)
    if lineage is None or lineage.source != SOURCE_REGISTRY or not lineage.managed:
        return
    raise RegistryManagedError(
        f"model_key '{ref.model_key}' is managed by the model registry: {lineage.registered_model} "
        f"version {lineage.registered_version} (alias '{lineage.registered_alias}') is served here and "
        "is not overwritten through the API; register and promote a new version, or fit under another model_key"
    )


def threshold_source(calib: Calibration | None, *, memory: Memory, lineage: Lineage | None) -> str | None:
    """Where the threshold in ``calib`` comes from (see the module docstring)."""
    if calib is None:
        return None
    recorded = calib.memory_fingerprint
    if recorded is not None and recorded != memory.fingerprint:
        return THRESHOLD_STALE
    if lineage is not None and lineage.describes_calibration(calib):
        return THRESHOLD_CALIBRATION_RUN
    return THRESHOLD_MANUAL if calib.source == THRESHOLD_MANUAL else THRESHOLD_API


def lineage_view(
    *, memory: Memory | None, calib: Calibration | None, lineage: Lineage | None
) -> dict[str, Any] | None:
    """The flat ``lineage`` object of the HTTP answers; None when there is no memory.

    A sidecar recorded for another memory is ignored (the memory was replaced since).
    """
    if memory is None:
        return None
    if lineage is not None and lineage.memory_fingerprint != memory.fingerprint:
        lineage = None
    features = memory.metadata.get("features")
    features = features if isinstance(features, Mapping) else {}
    weights = features.get("weights")
    weights = weights if isinstance(weights, Mapping) else {}
    source = threshold_source(calib, memory=memory, lineage=lineage)
    return {
        "source": lineage.source if lineage is not None else SOURCE_UNKNOWN,
        "registry_managed": bool(lineage is not None and lineage.managed),
        "registered_model": lineage.registered_model if lineage else None,
        "registered_version": lineage.registered_version if lineage else None,
        "registered_alias": lineage.registered_alias if lineage else None,
        "mlflow_run_id": lineage.mlflow_run_id if lineage else None,
        "git_commit": lineage.git_commit if lineage else None,
        "data_hash": lineage.data_hash if lineage else None,
        "data_source": lineage.data_source if lineage else None,
        "backbone": features.get("backbone"),
        "weights_name": weights.get("name"),
        "weights_sha256": weights.get("sha256"),
        "memory_fingerprint": memory.fingerprint,
        "threshold_source": source,
        "calibration_run_id": lineage.calibration_run_id if lineage and source == THRESHOLD_CALIBRATION_RUN
        else None,
        "calibrated_at_utc": calib.created_at_utc if calib is not None else None,
    }


def images_digest(images: Iterable[bytes]) -> str:
    """sha256 over the images' own sha256s, in fit order: the data hash of an API fit."""
    return hashes_digest(hashlib.sha256(data).hexdigest() for data in images)


def hashes_digest(image_sha256s: Iterable[str]) -> str:
    """:func:`images_digest` from the images' hex sha256s (for fits that stream their images)."""
    outer = hashlib.sha256()
    for digest in image_sha256s:
        outer.update(digest.encode("ascii"))
    return outer.hexdigest()
