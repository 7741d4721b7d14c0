"""The MLflow pyfunc of a model dir (a ModelStore root holding exactly one model), what it scores with.

:class:`ModelDirPredictor` rebuilds the backbone the memory records, checks its weights, and loads the
model with the server's loader (:func:`bdi.storage.loading.load_patchcore`); the pyfunc class
(``bdi.registry.BdiPyfuncModel``) only delegates to it. :func:`model_signature`,
:func:`pip_requirements`, :data:`MODEL_DIR_ARTIFACT` and :data:`PYFUNC_CONFIG_KEYS` are what
:mod:`bdi.mlops.registration` logs with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bdi.errors import InvalidInputError, NotFittedError, StorageError, WeightsError
from bdi.storage.store import ModelStore, StoredModel

if TYPE_CHECKING:  # pragma: no cover - typing only
    import pandas as pd

    from bdi.config import FeatureConfig

MODEL_DIR_ARTIFACT = "model_dir"  # the pyfunc artefact key holding the ModelStore root
# Load-time overrides a pyfunc accepts (``mlflow.pyfunc.load_model(uri, model_config={...})``); MLflow only
# lets through keys logged with the model, so they are logged with "" (= recorded value / default).
PYFUNC_CONFIG_KEYS = ("weights", "weights_cache_dir", "device", "precision", "batch_size", "runtime")


def single_model(model_dir: Path) -> StoredModel:
    """The one model of the model dir ``model_dir``; InvalidInputError when it holds none or several."""
    stored = ModelStore(model_dir).list_models()
    if len(stored) != 1:
        raise InvalidInputError(
            f"{model_dir} must be a ModelStore root holding exactly one model, found {len(stored)}"
        )
    return stored[0]


def recorded_feature_config(metadata: Mapping[str, Any], *, model_dir: Path,
                            overrides: Mapping[str, Any]) -> FeatureConfig:
    """The feature config recorded in ``metadata["features"]`` (the memory's), with the load-time
    ``overrides`` ``weights`` (a local file for pretrained weights), ``device``, ``precision`` and
    ``batch_size`` applied; empty override values keep the recorded value or the default. Without a
    ``precision`` override, a memory fitted in fp32 is served in fp32, any other with ``auto``."""
    from bdi.config import FeatureConfig
    from bdi.patchcore.memory import fitted_intensity

    features = metadata.get("features")
    if not isinstance(features, Mapping):
        raise StorageError(f"the memory in {model_dir} records no feature config (metadata['features'])")
    recorded_weights = features.get("weights")
    weights: Mapping[str, Any] = recorded_weights if isinstance(recorded_weights, Mapping) else {}
    source = str(weights.get("source", ""))
    spec = source if source in ("random", "official") else str(weights.get("path") or "")
    given = {k: v for k, v in overrides.items() if v not in ("", None)}  # "" = keep the recorded value
    try:
        return FeatureConfig(
            backbone=str(features.get("backbone")),
            weights=str(given.get("weights", spec)),
            input_size=int(features["input_size"]),
            blocks=tuple(int(b) for b in features["blocks"]),
            neighbourhood=features.get("neighbourhood"),
            intensity=fitted_intensity(metadata),
            depth=int(features["depth"]) if features.get("depth") is not None else None,
            seed=int(weights.get("seed") or 0),
            device=given.get("device", "auto"),
            # a memory fitted in fp32 is served in fp32 (its pipeline's scores, which the promotion gate's parity
            # check compares with); one fitted in a reduced precision lets BDI_PRECISION=auto decide here
            precision=given.get("precision", "fp32" if features.get("precision") == "fp32" else "auto"),
            batch_size=int(given.get("batch_size", FeatureConfig.batch_size)),
        ).resolved()
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidInputError(f"cannot rebuild the feature config of {model_dir}: {exc}") from exc


class ModelDirPredictor:
    """Scores images with the single model of a ModelStore root; what ``BdiPyfuncModel`` delegates to.

    Rebuilds the backbone recorded in the memory's metadata, checks that the weights are the recorded
    ones, and loads the model with :func:`bdi.storage.loading.load_patchcore` (the server's loader).
    """

    def __init__(self, model_dir: Path, *, overrides: Mapping[str, Any] | None = None) -> None:
        import torch

        from bdi.config import EXPORTS_DIRNAME, MemoryConfig, ScoringConfig, Settings
        from bdi.patchcore.features import FeatureExtractor
        from bdi.runtime.select import attach_runtime
        from bdi.storage.loading import load_patchcore

        self.model_dir = Path(model_dir)
        self.store = ModelStore(self.model_dir)
        self.ref = single_model(self.model_dir).ref
        memory = self.store.load_memory(self.ref)
        if memory is None:
            raise NotFittedError("predict")
        overrides = dict(overrides or {})
        unknown = sorted(set(overrides) - set(PYFUNC_CONFIG_KEYS))
        if unknown:
            raise InvalidInputError(f"unknown model_config keys {unknown}; allowed: {list(PYFUNC_CONFIG_KEYS)}")
        features = recorded_feature_config(memory.metadata, model_dir=self.model_dir, overrides=overrides)
        cache_dir = overrides.get("weights_cache_dir") or Settings.model_fields["weights_cache_dir"].default
        extractor = FeatureExtractor(features, cache_dir=Path(cache_dir))
        _check_weights(recorded=memory.metadata["features"].get("weights") or {}, got=extractor.weights.to_dict())
        # the version's own export when it carries one (register stage), else the machine's export cache
        carried = self.model_dir / EXPORTS_DIRNAME
        self.runtime = attach_runtime(
            extractor, requested=str(overrides.get("runtime") or "torch"),
            root=carried if carried.is_dir() else Path(cache_dir) / EXPORTS_DIRNAME, threads=torch.get_num_threads(),
        )
        self.model = load_patchcore(
            self.store, self.ref, extractor=extractor, scoring=ScoringConfig().resolved(features.backbone),
            memory_cfg=MemoryConfig().resolved(features.backbone), endpoint="predict",
        )
        self.max_image_pixels: int = Settings.model_fields["max_image_pixels"].default

    def predict_frame(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Rows with ``image_path`` or ``image_bytes`` (and optional ``shape`` ROI JSON) →
        a frame with ``score`` (float), ``threshold`` (float) and ``decision`` ("ok"/"ng")."""
        import pandas as pd

        from bdi.patchcore.imaging import build_roi_mask, decode_image, parse_shape

        if "image_path" not in frame.columns and "image_bytes" not in frame.columns:
            raise InvalidInputError("the input needs an 'image_path' or an 'image_bytes' column")
        images, masks, views = [], [], []
        for i, row in enumerate(frame.to_dict("records")):
            data = row.get("image_bytes")
            if not isinstance(data, (bytes, bytearray)):
                path = row.get("image_path")
                if not isinstance(path, str) or not path:
                    raise InvalidInputError(f"row {i}: no image_bytes and no image_path")
                try:
                    data = Path(path).read_bytes()
                except OSError as exc:
                    raise InvalidInputError(f"row {i}: cannot read {path}: {exc}") from exc
            crop = decode_image(bytes(data), max_pixels=self.max_image_pixels, name=f"row {i}")
            shape = row.get("shape")
            shape = parse_shape(shape) if isinstance(shape, (str, Mapping)) and shape else None
            images.append(crop)
            masks.append(build_roi_mask(shape, width=crop.shape[1], height=crop.shape[0]))
            views.append(self.model.view(shape, width=crop.shape[1], height=crop.shape[0]))
        scores = [float(r.score) for r in self.model.score(images, masks, views=views)]
        return pd.DataFrame({
            "score": scores,
            "threshold": [self.model.threshold] * len(scores),
            "decision": [self.model.decide(s) for s in scores],
        })


def _check_weights(*, recorded: Mapping[str, Any], got: Mapping[str, Any]) -> None:
    """The rebuilt backbone must carry the weights the memory was fitted with (sha256, or name+seed)."""
    want_sha, got_sha = recorded.get("sha256"), got.get("sha256")
    if want_sha and got_sha != want_sha:
        raise WeightsError(
            f"the backbone weights have sha256 {got_sha}, but the model was fitted with {want_sha}; "
            "pass model_config={'weights': '<path to that file>'} when loading the model"
        )
    if not want_sha and recorded.get("name") and recorded.get("name") != got.get("name"):
        raise WeightsError(f"the backbone is {got.get('name')}, but the model was fitted with {recorded.get('name')}")


def model_signature() -> Any:
    """The logged ``ModelSignature``: the columns :meth:`ModelDirPredictor.predict_frame` reads and writes."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    inputs = Schema([
        ColSpec("string", "image_path", required=False),
        ColSpec("binary", "image_bytes", required=False),
        ColSpec("string", "shape", required=False),
    ])
    outputs = Schema([ColSpec("double", "score"), ColSpec("double", "threshold"), ColSpec("string", "decision")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def pip_requirements() -> list[str]:
    """What a fresh environment installs to load the pyfunc: this bdi, this mlflow, pandas."""
    import mlflow

    from bdi import __version__

    return [f"bdi=={__version__}", f"mlflow=={mlflow.__version__}", "pandas"]
