"""What MLflow is given: nested params/metrics flattened to dotted keys, values made MLflow-safe.

Pure functions, no ``mlflow`` import: keys lose the characters MLflow rejects, values are stringified
(lists as JSON) and cut to MLflow's limits, metrics keep only finite numbers.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

PARAM_VALUE_MAX_CHARS = 500  # the historical MLflow limit; newer servers accept more
PARAM_KEY_MAX_CHARS = 250
TAG_VALUE_MAX_CHARS = 5000
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-. /]")
_TRUNCATION_MARK = "..."


def clean_key(key: str) -> str:
    """``key`` with the characters MLflow rejects replaced by ``_``, cut to MLflow's key limit."""
    return _BAD_KEY_CHARS.sub("_", key)[:PARAM_KEY_MAX_CHARS]


def stringify(value: Any) -> str:
    """A param/tag value as text: lists as JSON (sets sorted), numpy values through ``tolist``."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else list(value)
        try:
            return json.dumps(items, sort_keys=True, default=str)
        except (TypeError, ValueError):
            return str(items)
    tolist = getattr(value, "tolist", None)  # numpy scalars/arrays
    if callable(tolist) and not isinstance(value, (int, float, bool)):
        return stringify(tolist())
    return str(value)


def truncate(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, the cut marked with ``...``."""
    return text if len(text) <= limit else text[: limit - len(_TRUNCATION_MARK)] + _TRUNCATION_MARK


def tag_value(value: Any) -> str:
    """A tag value as MLflow stores it: stringified, at most ``TAG_VALUE_MAX_CHARS``."""
    return truncate(stringify(value), TAG_VALUE_MAX_CHARS)


def flatten_params(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mappings → ``{"a.b.c": "value"}``; values stringified (lists as JSON), ≤ 500 chars.

    Keys are made MLflow-safe (characters outside ``[A-Za-z0-9_-. /]`` become ``_``).
    """
    out: dict[str, str] = {}
    for key, value in mapping.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flatten_params(value, name))
        else:
            out[clean_key(name)] = truncate(stringify(value), PARAM_VALUE_MAX_CHARS)
    return out


def flatten_metrics(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested mappings → ``{"a.b": float}``, keeping only finite numbers (None, NaN, text skipped)."""
    out: dict[str, float] = {}
    for key, value in mapping.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flatten_metrics(value, name))
            continue
        if value is None or isinstance(value, str):
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            out[clean_key(name)] = number
    return out


def weights_identity(metadata: Mapping[str, Any]) -> dict[str, str]:
    """``weights_name``/``weights_sha256``/``weights_source`` from a memory's metadata (``features.weights``)."""
    features = metadata.get("features")
    weights = features.get("weights") if isinstance(features, Mapping) else None
    if not isinstance(weights, Mapping):
        return {}
    out = {"weights_name": weights.get("name"), "weights_source": weights.get("source"),
           "weights_sha256": weights.get("sha256") or ""}
    return {k: str(v) for k, v in out.items() if v is not None}
