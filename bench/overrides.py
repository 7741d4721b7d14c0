"""``--set section.field=value``: a benchmark's change to the library's ``model.*`` defaults, for a before/after run."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

ModelOverrides = dict[str, dict[str, Any]]


def parse_overrides(items: Sequence[str]) -> ModelOverrides:
    """``section.field=value`` (value as JSON, else a string) → ``{section: {field: value}}``."""
    out: ModelOverrides = {}
    for item in items:
        key, sep, raw = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot:
            raise SystemExit(f"--set wants section.field=value, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(section, {})[name] = value
    return out


def with_overrides(model: Mapping[str, Mapping[str, Any]], overrides: ModelOverrides) -> ModelOverrides:
    """``model`` (a ``Settings(model=...)`` mapping) with ``overrides`` merged in, section by section."""
    merged: ModelOverrides = {section: dict(values) for section, values in model.items()}
    for section, values in overrides.items():
        merged.setdefault(section, {}).update(values)
    return merged
