"""BDI: PatchCore visual inspection over the patch features of a registered backbone (``bdi.backbones``).

The library owns every algorithm and every byte on disk; HTTP (``serving/``) and Hydra/DVC (``pipelines/``) are
thin layers over :mod:`bdi.service`. The public API is importable from here in one line
(``from bdi import InspectionService, ModelRef, Settings, decode_image``); each name is imported on first use, so
``import bdi`` stays light (no torch, no MLflow). The packages and their import rules: docs/architecture.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover - the names below, for type checkers and editors
    from bdi.config import Settings
    from bdi.errors import BDIError
    from bdi.patchcore.imaging import decode_image
    from bdi.refs import DatasetRef, ModelRef
    from bdi.service import InspectionService

# public name -> the module that defines it
_PUBLIC_API = {
    "BDIError": "bdi.errors",
    "DatasetRef": "bdi.refs",
    "InspectionService": "bdi.service",
    "ModelRef": "bdi.refs",
    "Settings": "bdi.config",
    "decode_image": "bdi.patchcore.imaging",
}

__all__ = ["BDIError", "DatasetRef", "InspectionService", "ModelRef", "Settings", "__version__", "decode_image"]


def __getattr__(name: str) -> Any:
    module = _PUBLIC_API.get(name)
    if module is None:
        raise AttributeError(f"module 'bdi' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
