"""What to fix when a command-line override names a key the pipeline schema lacks ("did you mean ...?").

``pipelines.stage.run_cli`` prints :func:`override_hint` under Hydra's own error; the keys come from the schema
of ``pipelines.config``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any, cast

from omegaconf import OmegaConf

from pipelines.config import PipelineConfig, flatten


def schema_keys() -> set[str]:
    """Every dotted key of the schema (list items as ``rois.0.role``), for typo hints."""
    keys = set(flatten(_schema_dict()))
    for key in list(keys):
        parts = key.split(".")
        keys.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return keys


def _schema_dict() -> dict[str, Any]:
    data = OmegaConf.to_container(OmegaConf.structured(PipelineConfig), resolve=False)
    assert isinstance(data, dict)
    return cast(dict[str, Any], data)  # a DictConfig's keys are str


def override_hint(overrides: Iterable[str]) -> str:
    """What to fix for overrides naming keys the schema lacks ("did you mean ...?"); "" when all known."""
    known = schema_keys()
    known_no_index = {k for k in known if not any(p.isdigit() for p in k.split("."))}
    hints: list[str] = []
    for text in overrides:
        if "=" not in text or text.startswith(("hydra.", "hydra/", "+", "~", "--")):
            continue
        key = text.split("=", 1)[0].strip().lstrip("+~")
        if "." not in key or key in known or key.split(".")[0] in ("hydra",):
            continue
        if any(key.startswith(f"{dict_key}.") for dict_key in _dict_valued_keys()):
            continue
        close = difflib.get_close_matches(key, sorted(known_no_index), n=3, cutoff=0.75)
        section = key.split(".")[0]
        options = sorted(k[len(section) + 1:] for k in known_no_index if k.startswith(f"{section}.") and
                         k.count(".") == 1)
        hint = f"Unknown config key '{key}'."
        if close:
            hint += f" Did you mean {' or '.join(repr(c) for c in close)}?"
        if options:
            hint += f" Keys of '{section}': {', '.join(options)}."
        hint += " Keys are defined in pipelines/config.py (schema) and conf/; see params.yaml for values."
        hints.append(hint)
    return "\n".join(hints)


def _dict_valued_keys() -> set[str]:
    return {"dataset.roi_shape"} | {f"dataset.rois.{i}.roi_shape" for i in range(64)}


