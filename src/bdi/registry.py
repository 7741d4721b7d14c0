"""The stable import path of the MLflow pyfunc class, ``bdi.registry.BdiPyfuncModel``; nothing else.

Every registered version pickles its python model by reference under this exact name (cloudpickle
stores ``bdi.registry.BdiPyfuncModel``, not the code), so this module keeps that name importable for
as long as such versions exist: do not rename or move it. The class holds no logic; it delegates to
:class:`bdi.mlops.pyfunc.ModelDirPredictor`. Logging and registering live in :mod:`bdi.mlops.registration`,
syncing registered versions into a models dir in :mod:`bdi.mlops.registry_sync`.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from bdi.mlops.pyfunc import MODEL_DIR_ARTIFACT, ModelDirPredictor

_PYFUNC_LOCK = threading.Lock()


def _build_pyfunc_class() -> type:
    import pandas as pd
    from mlflow.pyfunc.model import PythonModel

    def _predict(self: Any, context: Any, model_input: Any, params: Any = None) -> Any:
        return self._predictor.predict_frame(model_input)

    # Real objects, not strings (this module's annotations are postponed and pandas is imported
    # lazily): MLflow reads the hint when the class is created; a DataFrame hint means "no type-hint
    # schema, use the logged signature" (bdi.mlops.pyfunc.model_signature).
    _predict.__annotations__ = {"context": Any, "model_input": pd.DataFrame, "params": dict[str, Any] | None,
                                "return": pd.DataFrame}

    class BdiPyfuncModel(PythonModel):
        """MLflow pyfunc over a ModelStore root: no algorithm here, only the bdi loader + service.

        Input: a DataFrame with ``image_path`` or ``image_bytes`` (optional ``shape``); output: ``score``,
        ``threshold``, ``decision`` per row (see :meth:`ModelDirPredictor.predict_frame`).
        """

        def load_context(self, context: Any) -> None:
            model_dir = Path(context.artifacts[MODEL_DIR_ARTIFACT])
            self._predictor = ModelDirPredictor(model_dir, overrides=dict(context.model_config or {}))

        predict = _predict

    # Importable as bdi.registry.BdiPyfuncModel, so cloudpickle stores a reference, not the code.
    BdiPyfuncModel.__module__ = __name__
    BdiPyfuncModel.__qualname__ = "BdiPyfuncModel"
    return BdiPyfuncModel


def pyfunc_model_class() -> type:
    """The ``BdiPyfuncModel`` class (an ``mlflow.pyfunc.PythonModel``), built once on first use."""
    with _PYFUNC_LOCK:
        cls = globals().get("BdiPyfuncModel")
        if cls is None:
            cls = _build_pyfunc_class()
            globals()["BdiPyfuncModel"] = cls
    return cls


def __getattr__(name: str) -> Any:
    """``from bdi.registry import BdiPyfuncModel`` works, and imports mlflow only then."""
    if name == "BdiPyfuncModel":
        return pyfunc_model_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
