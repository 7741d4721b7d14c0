"""Where ``bdi.config.Settings`` values come from: the contract's env names (``BDI_*``, legacy
``BRAKEDISC_*``, read exactly as spelt), its flat algorithm names (:data:`FLAT_NAMES`) and the YAML
file named by ``BDI_CONFIG``. No defaults live here (they are in :mod:`bdi.config`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import AliasChoices
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource


def truthy(value: object) -> bool:
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in {"1", "true", "yes", "on", "t", "y"}


def optional(value: object) -> object:
    return None if value in ("", None) else value


def _whole(value: object) -> object:
    """``"99"`` and ``"99.0"`` → 99; anything else is left for the field's validation to reject."""
    try:
        number = float(str(value))
    except ValueError:
        return value
    return int(number) if number.is_integer() else value


def _optional_whole(value: object) -> object:
    return optional(_whole(value))


def _blocks(value: object) -> object:
    if isinstance(value, str):
        parts = [p for p in value.replace(" ", "").split(",") if p]
        return [int(p) for p in parts] if parts else None  # "" = the backbone's default
    return value


@dataclass(frozen=True)
class FlatName:
    """A legacy flat setting name (env ``BDI_<NAME>``/``BRAKEDISC_<NAME>``, a flat key of the ``BDI_CONFIG``
    YAML in lower case) and the nested ``Settings`` field it sets."""

    path: tuple[str, ...]
    parse: Any = None  # str -> value, for env text that pydantic would not read the same way


# The one map from the contract's flat names (docs/contract.md "Algorithm settings") to the nested algorithm settings.
FLAT_NAMES: dict[str, FlatName] = {
    "BACKBONE": FlatName(("model", "features", "backbone")),
    "WEIGHTS": FlatName(("model", "features", "weights")),
    "INPUT_SIZE": FlatName(("model", "features", "input_size"), optional),
    "FEATURE_BLOCKS": FlatName(("model", "features", "blocks"), _blocks),
    "FEATURE_NEIGHBOURHOOD": FlatName(("model", "features", "neighbourhood"), optional),
    "BACKBONE_DEPTH": FlatName(("model", "features", "depth"), optional),
    "WEIGHTS_SEED": FlatName(("model", "features", "seed")),
    "DEVICE": FlatName(("model", "features", "device")),
    "PRECISION": FlatName(("model", "features", "precision")),
    "BATCH_SIZE": FlatName(("model", "features", "batch_size")),
    "CORESET_RATE": FlatName(("model", "memory", "coreset_rate")),
    "CORESET_PROJECTION_DIM": FlatName(("model", "memory", "projection_dim"), optional),
    "CORESET_SEED": FlatName(("model", "memory", "seed")),
    "KNN_INDEX": FlatName(("model", "memory", "knn_index")),
    "FAISS_PREFER_GPU": FlatName(("model", "memory", "prefer_gpu"), truthy),
    "FAISS_GPU_DEVICE": FlatName(("model", "memory", "gpu_device")),
    "SCORE_PERCENTILE": FlatName(("model", "scoring", "score_percentile"), _optional_whole),
    "AREA_MM2_THR": FlatName(("model", "scoring", "area_mm2_thr")),
    "BLUR_SIGMA": FlatName(("model", "scoring", "blur_sigma"), optional),
    "REMOVE_LETTERBOX": FlatName(("model", "scoring", "remove_letterbox"), truthy),
    "SELF_CONTRAST": FlatName(("model", "scoring", "self_contrast")),
    "CALIBRATION_NG_PERCENTILE": FlatName(("calibration", "ng_percentile")),
    "CALIBRATION_OVERLAP_FACTOR": FlatName(("calibration", "overlap_factor")),
    "CALIBRATION_BAND": FlatName(("calibration", "band"), truthy),
    "CALIBRATION_ESCAPE_BUDGET": FlatName(("calibration", "escape_budget")),
    "CALIBRATION_FALSE_REJECT_BUDGET": FlatName(("calibration", "false_reject_budget")),
    "REVIEW_DECISION": FlatName(("calibration", "review_decision")),
}


NESTED_SECTIONS = ("model", "calibration")


def _nest(flat: Mapping[str, object], *, parse: bool) -> dict[str, Any]:
    """``{"CORESET_RATE": "0.2"}`` → ``{"model": {"memory": {"coreset_rate": "0.2"}}}``."""
    nested: dict[str, Any] = {}
    for name, value in flat.items():
        target = FLAT_NAMES[name]
        node = nested
        for key in target.path[:-1]:
            node = node.setdefault(key, {})
        node[target.path[-1]] = target.parse(value) if parse and target.parse else value
    return nested


def _merged(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` merged in, section by section (a nested ``model:`` section of the YAML and the flat
    keys that land in it both count; a flat key wins on the same field)."""
    out = dict(base)
    for key, value in extra.items():
        both = isinstance(value, Mapping) and isinstance(out.get(key), Mapping)
        out[key] = _merged(out[key], value) if both else value
    return out


def env_aliases(name: str, *legacy: str) -> AliasChoices:
    """Accept ``BDI_<NAME>`` and the legacy ``BRAKEDISC_<NAME>`` spellings (plus the contract's own
    legacy names, e.g. ``HOST``), exactly as spelt: init kwargs use the field name instead."""
    return AliasChoices(f"BDI_{name}", f"BRAKEDISC_{name}", *legacy)


class ContractEnvSource(EnvSettingsSource):
    """The environment, read case-sensitively and only under the names the contract allows.

    pydantic-settings would also read a field's bare name (``device``, or ``DEVICE`` when not
    case-sensitive) because init kwargs may use field names; here only the aliases count, so a
    stray ``DEVICE=cuda`` can never override ``BDI_DEVICE`` (docs/contract.md "Configuration"). The first alias
    set wins (``BDI_*`` before ``BRAKEDISC_*`` before the contract's bare legacy names). The flat
    names of the nested algorithm settings (:data:`FLAT_NAMES`) are read the same way.
    """

    def _extract_field_info(
        self, field: Any, field_name: str, model_config: Mapping[str, Any] | None = None
    ) -> list[tuple[str, str, bool]]:
        infos = super()._extract_field_info(field, field_name, model_config)
        # keyed by the field name, so the sources merge (env over YAML) on one key
        return [(field_name, env_name, is_complex) for _, env_name, is_complex in infos if env_name != field_name]

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        if field_name in NESTED_SECTIONS:  # read through FLAT_NAMES below, never as one env variable
            return None, field_name, False
        return super().get_field_value(field, field_name)

    def __call__(self) -> dict[str, Any]:
        values = super().__call__()
        flat: dict[str, object] = {}
        for name in FLAT_NAMES:
            for spelt in (f"BDI_{name}", f"BRAKEDISC_{name}"):
                if spelt in os.environ:
                    flat[name] = os.environ[spelt]
                    break
        return {**values, **_nest(flat, parse=True)}


# keys of the BDI_CONFIG file that the HTTP server reads from it (serving.settings.ServingSettings), not Settings
SERVING_CONFIG_KEYS = frozenset({"cors_origins", "backend_host", "backend_port", "limit_concurrency",
                                 "timeout_keep_alive_s", "body_read_timeout_s", "metrics_dir", "auth",
                                 "auth_max_failures", "trusted_proxies"})


# sections of the BDI_CONFIG YAML kept nested: the algorithm configs (``model: {memory: {augment: flips}}``), which
# the legacy app.yaml never had, so every field without a flat env name can be set on a server
NESTED_SECTIONS = ("model", "calibration")


def read_config_file(path: Path) -> dict[str, Any]:
    """The YAML file named by ``BDI_CONFIG`` as one flat mapping (sections one level deep flattened, but for
    :data:`NESTED_SECTIONS`, kept as they are)."""
    if not path.is_file():
        raise ValueError(f"config file {path} (BDI_CONFIG) does not exist")
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"config file {path} must hold a mapping")
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict) and key not in NESTED_SECTIONS:
            flat.update(value)
        else:
            flat[key] = value
    return flat


class YamlSource(PydanticBaseSettingsSource):
    """Reads the YAML file named by ``BDI_CONFIG`` (or ``config_file=`` at init).

    Sections one level deep (``inference: {coreset_rate: 0.1}``) are flattened, so the legacy
    ``configs/app.yaml`` shape and a flat file both work; keys are field names or the lower-case
    flat names of :data:`FLAT_NAMES`.
    """

    def __init__(self, settings_cls: type[BaseSettings], path: str | None) -> None:
        super().__init__(settings_cls)
        self._path = path

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        if not self._path:
            return {}
        flat = read_config_file(Path(self._path))
        fields_ = {k: v for k, v in flat.items() if k in self.settings_cls.model_fields}
        nested = {k.upper(): v for k, v in flat.items() if k.upper() in FLAT_NAMES and k not in fields_}
        unknown = sorted(set(flat) - set(fields_) - {k.lower() for k in nested} - SERVING_CONFIG_KEYS)
        if unknown:
            raise ValueError(f"unknown keys in {self._path}: {unknown}")
        return _merged(fields_, _nest(nested, parse=False))
