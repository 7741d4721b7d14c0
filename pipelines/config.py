"""The pipeline configuration: Hydra structured-config schema, composition and conversion to ``bdi`` types.

``conf/`` is the configuration tree; the dataclasses below are its schema (registered in Hydra's
ConfigStore as ``bdi_schema``, first in ``conf/config.yaml``'s defaults list), so a misspelt key or a
wrongly typed value is a composition error. The algorithm sections are the library's own dataclasses
(one vocabulary, one default each, in ``bdi.config``), through their Hydra twins (:func:`schema_twin`):

* ``model.features.*`` / ``model.memory.*`` / ``model.scoring.*`` = ``bdi.config.ModelConfig`` — the same
  names as ``Settings.model`` in serving;
* ``calibration.*`` = ``bdi.config.CalibrationConfig``;
* ``tracking.*`` = ``bdi.mlops.tracking.TrackingConfig``.

``params.yaml`` (what DVC tracks) is this composition. DVC writes it itself (``hydra.enabled`` in
``.dvc/config``) on ``dvc exp run -S key=value`` / ``-S model=tiny``; ``python -m pipelines.config --write``
writes the same bytes through DVC's composer for ``dvc repro``; ``tests/pipelines/test_params_consistency.py``
checks that params.yaml is what DVC composes.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import yaml
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from pydantic import TypeAdapter

from bdi.config import CalibrationConfig, ModelConfig, Settings
from bdi.data import metrics, splits
from bdi.mlops.promotion import PromotionGate
from bdi.mlops.tracking import TrackingConfig

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = PROJECT_ROOT / "conf"
PARAMS_FILE = "params.yaml"
SCHEMA_NAME = "bdi_schema"
DATASET_KINDS = ("auto", "synthetic", "mvtec", "server")  # pipelines.sources
_T = TypeVar("_T")


class PipelineConfigError(ValueError):
    """A configuration value that cannot work; the message names the key and how to fix it."""


# --------------------------------------------------------------------------------------------- schema


@dataclass
class RoiSchema:
    """One (role, roi) model of the recipe. Empty/None fields fall back to the dataset-level value."""

    role: str = "default"
    roi: str = "default"
    model_key: str | None = None  # None = roi (ModelRef.create)
    subdir: str | None = None  # mvtec: this ROI's MVTec tree, relative to dataset.source; None = source
    roi_shape: dict[str, Any] | None = None  # the contract's shape object; None = dataset.roi_shape
    mm_per_px: float | None = None  # None = dataset.mm_per_px


@dataclass
class SplitsSchema:
    """How samples are split (see ``pipelines.ingest``): deterministic, by sha256, stratified by class."""

    calib_fraction: float = splits.CALIB_FRACTION
    train_fraction: float = splits.TRAIN_FRACTION


@dataclass
class SyntheticSchema:
    """Seeded synthetic discs (``bdi.data.synthetic.write_mvtec_dataset``) that the ingest stage generates."""

    folder: str = "data/synthetic"  # where they are written (kind synthetic: dataset.source instead)
    seed: int = 0
    n_train: int = 16  # train/good
    n_test_good: int = 8  # test/good, split into calib and eval halves
    n_test_per_defect: int = 4  # per defect kind (pit, scratch, crack), with masks
    size: int = 192  # px, square


@dataclass
class DatasetSchema:
    name: str = MISSING
    # auto: the server's samples under `source` when every model has some, else synthetic discs |
    # synthetic: discs generated into `source` | mvtec: train/good, test/<class>, ground_truth/ | server: the
    # DatasetStore folders under `source`
    kind: str = "mvtec"
    source: str = MISSING  # folder, relative to the project root
    recipe: str = "default"
    rois: list[RoiSchema] = field(default_factory=lambda: [RoiSchema()])
    mm_per_px: float = 0.2
    roi_shape: dict[str, Any] | None = None  # None = the full image
    min_size: int = 32  # px, both sides
    channels: list[int] = field(default_factory=lambda: [1, 3, 4])  # accepted channel counts as stored
    max_pixels: int = 40_000_000
    mask_threshold: int = metrics.MASK_THRESHOLD
    splits: SplitsSchema = field(default_factory=SplitsSchema)
    synthetic: SyntheticSchema = field(default_factory=SyntheticSchema)


def _schema_type(hint: Any) -> Any:
    """``hint`` as OmegaConf can check it: ``Literal`` → ``str``, tuples → lists, dataclasses → their twins."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return str
    if origin in (types.UnionType, typing.Union):
        (inner,) = [a for a in args if a is not type(None)]
        return typing.Optional[_schema_type(inner)]  # noqa: UP045 - OmegaConf needs typing.Optional
    if origin is tuple:
        return list[_schema_type(args[0])]  # type: ignore[misc]
    if dataclasses.is_dataclass(hint):
        return schema_twin(cast(type, hint))
    return hint


@functools.cache
def schema_twin(cls: type) -> type:
    """The Hydra structured-config twin of a frozen library dataclass: the same field names and defaults, so
    ``conf/`` speaks the library's vocabulary, in types OmegaConf can check; the library dataclass itself checks
    the values when :func:`model_config` builds it."""
    hints = typing.get_type_hints(cls)
    specs: list[tuple[str, Any, Any]] = []
    for f in dataclasses.fields(cls):
        kind = _schema_type(hints[f.name])
        if dataclasses.is_dataclass(hints[f.name]):
            specs.append((f.name, kind, field(default_factory=kind)))
        elif isinstance(f.default, tuple):
            specs.append((f.name, kind, field(default_factory=functools.partial(list, f.default))))
        else:
            specs.append((f.name, kind, f.default))
    return dataclasses.make_dataclass(f"{cls.__name__}Schema", specs)


if TYPE_CHECKING:  # mypy checks attribute access against the library's own dataclasses
    ModelSchema = ModelConfig
    CalibrationSchema = CalibrationConfig
    TrackingSchema = TrackingConfig
else:
    ModelSchema = schema_twin(ModelConfig)
    CalibrationSchema = schema_twin(CalibrationConfig)
    TrackingSchema = schema_twin(TrackingConfig)


@dataclass
class EvaluationSchema:
    aupro_fpr_limit: float = metrics.AUPRO_FPR_LIMIT
    gallery_size: int = 8  # worst cases shown in the heatmap gallery
    histogram_bins: int = 30
    primary_metric: str = "image_auroc"  # the registry moves the alias only when this is not worse


@dataclass
class PromotionSchema:
    """The promotion gate of the register stage (``bdi.mlops.promotion.PromotionGate``; null disables a check).
    The primary metric compared with the alias holder's is ``evaluation.primary_metric``."""

    max_false_reject_rate: float | None = PromotionGate.max_false_reject_rate  # at the calibrated threshold
    max_infer_latency_ms: float | None = PromotionGate.max_infer_latency_ms  # median /infer, golden images
    parity_eps: float | None = PromotionGate.parity_eps  # max |served score - pipeline score|
    max_review_rate: float | None = PromotionGate.max_review_rate  # share of eval parts the band sends to review
    golden_images: int = 4  # eval images per model logged with the version for the parity check


@dataclass
class PathsSchema:
    """Every file a stage writes, relative to the project root (dvc.yaml reads the same keys)."""

    manifest: str = "data/manifest.csv"
    ingest_report: str = "data/ingest_report.json"
    fit_dir: str = "artifacts/fit"  # ModelStore root: memory + index
    model_dir: str = "artifacts/model"  # ModelStore root: memory + index + calib.json (deployable)
    calib_metrics: str = "eval/calib_metrics.json"  # the calibrate stage's selection metrics (calib split)
    metrics: str = "eval/metrics.json"
    scores: str = "eval/scores.csv"
    roc: str = "eval/plots/roc.csv"
    score_hist: str = "eval/plots/score_hist.csv"
    images_dir: str = "eval/plots/images"
    registration: str = "registration.json"
    weights_cache_dir: str | None = None  # None = bdi.config.Settings default (~/.cache/bdi)


@dataclass
class PipelineConfig:
    dataset: DatasetSchema = field(default_factory=DatasetSchema)
    model: ModelSchema = field(default_factory=ModelSchema)
    calibration: CalibrationSchema = field(default_factory=CalibrationSchema)
    tracking: TrackingSchema = field(default_factory=TrackingSchema)
    evaluation: EvaluationSchema = field(default_factory=EvaluationSchema)
    promotion: PromotionSchema = field(default_factory=PromotionSchema)
    paths: PathsSchema = field(default_factory=PathsSchema)


def register_schema() -> None:
    """Store the schema in Hydra's ConfigStore (idempotent); ``conf/config.yaml`` lists it first."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=PipelineConfig)


register_schema()


# --------------------------------------------------------------------------------------------- composition


def compose_config(overrides: Sequence[str] = (), *, conf_dir: Path = CONF_DIR) -> DictConfig:
    """Compose ``conf/config.yaml`` with Hydra overrides, outside any Hydra app (tests, tools)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(Path(conf_dir).resolve()), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def to_plain(cfg: DictConfig | PipelineConfig) -> dict[str, Any]:
    """The resolved config as plain dicts/lists (the ``params.yaml`` content), without ``hydra``."""
    node = cfg if isinstance(cfg, DictConfig) else OmegaConf.structured(cfg)
    data = OmegaConf.to_container(node, resolve=True, throw_on_missing=True)
    assert isinstance(data, dict)
    data.pop("hydra", None)
    return cast(dict[str, Any], data)  # a DictConfig's keys are str


def validate(data: Mapping[str, Any] | DictConfig, *, source: str = "config") -> PipelineConfig:
    """Check ``data`` against the schema (unknown keys, types, missing values) and return it typed."""
    from omegaconf.errors import OmegaConfBaseException

    schema = OmegaConf.structured(PipelineConfig)
    try:
        merged = OmegaConf.merge(schema, data)
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise PipelineConfigError(f"{source} does not match the pipeline schema: {exc}") from exc
    assert isinstance(obj, PipelineConfig)
    check_values(obj)
    return obj


def check_values(cfg: PipelineConfig) -> None:
    """Value checks the type system cannot express; each message names the key to fix."""
    ds = cfg.dataset
    if ds.kind not in DATASET_KINDS:
        raise PipelineConfigError(f"dataset.kind must be one of {DATASET_KINDS}, got {ds.kind!r}")
    for name in ("n_train", "n_test_good", "n_test_per_defect"):
        if getattr(ds.synthetic, name) < 1:
            raise PipelineConfigError(f"dataset.synthetic.{name} must be >= 1")
    if ds.synthetic.size < ds.min_size:
        raise PipelineConfigError(f"dataset.synthetic.size must be >= dataset.min_size ({ds.min_size})")
    if not ds.rois:
        raise PipelineConfigError("dataset.rois must list at least one {role, roi}")
    pairs = [(r.role, r.roi) for r in ds.rois]
    if len(set(pairs)) != len(pairs):
        raise PipelineConfigError(f"dataset.rois lists a (role, roi) twice: {pairs}")
    for name in ("calib_fraction", "train_fraction"):
        value = getattr(ds.splits, name)
        if not 0.0 < value < 1.0:
            raise PipelineConfigError(f"dataset.splits.{name} must be in (0, 1), got {value}")
    if not 0.0 < cfg.evaluation.aupro_fpr_limit <= 1.0:
        raise PipelineConfigError("evaluation.aupro_fpr_limit must be in (0, 1]")
    for name in ("max_false_reject_rate", "max_infer_latency_ms", "parity_eps", "max_review_rate"):
        value = getattr(cfg.promotion, name)
        if value is not None and value < 0:
            raise PipelineConfigError(f"promotion.{name} must be >= 0 or null, got {value}")
    if cfg.promotion.golden_images < 0:
        raise PipelineConfigError("promotion.golden_images must be >= 0")


# --------------------------------------------------------------------------------------------- to bdi


def _library(cls: type[_T], node: object, key: str) -> _T:
    try:
        return TypeAdapter(cls).validate_python(dataclasses.asdict(node))  # type: ignore[call-overload]
    except ValueError as exc:
        raise PipelineConfigError(f"{key}.* rejected by bdi: {exc}") from exc


def model_config(cfg: PipelineConfig) -> ModelConfig:
    """``model.*`` as the library's frozen ``ModelConfig`` (resolved); invalid values name their key."""
    return _library(ModelConfig, cfg.model, "model")


def calibration_config(cfg: PipelineConfig) -> CalibrationConfig:
    return _library(CalibrationConfig, cfg.calibration, "calibration")


def tracking_config(cfg: PipelineConfig) -> TrackingConfig:
    return _library(TrackingConfig, cfg.tracking, "tracking")


def to_settings(cfg: PipelineConfig, *, models_dir: Path, project_root: Path | None = None) -> Settings:
    """The ``Settings`` of an ``InspectionService`` that runs this config's model into ``models_dir``."""
    values: dict[str, Any] = {"models_dir": Path(models_dir), "model": model_config(cfg),
                              "calibration": calibration_config(cfg), "config_file": None}
    if cfg.paths.weights_cache_dir:
        cache = Path(cfg.paths.weights_cache_dir)
        values["weights_cache_dir"] = cache if cache.is_absolute() or project_root is None else project_root / cache
    return Settings(**values)


# --------------------------------------------------------------------------------------------- helpers


def flatten(data: Mapping[str, Any], *, prefix: str = "") -> dict[str, Any]:
    """``{"model": {"memory": {"coreset_rate": 0.1}}}`` → ``{"model.memory.coreset_rate": 0.1}``; list items get
    their index."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, prefix=f"{name}."))
        elif isinstance(value, (list, tuple)) and any(isinstance(v, Mapping) for v in value):
            for i, item in enumerate(value):
                if isinstance(item, Mapping):
                    out.update(flatten(item, prefix=f"{name}.{i}."))
                else:
                    out[f"{name}.{i}"] = item
        else:
            out[name] = value
    return out


def compose_params(path: Path, *, overrides: Sequence[str] = (), conf_dir: Path = CONF_DIR,
                   project_root: Path = PROJECT_ROOT) -> None:
    """Write ``conf/`` + ``overrides`` composed to ``path`` exactly as DVC does for ``dvc exp run -S``
    (``dvc.utils.hydra.compose_and_dump``, with the Hydra plugins of ``project_root``)."""
    from dvc.utils.hydra import compose_and_dump

    compose_and_dump(Path(path), str(Path(conf_dir).resolve()), None, "config", str(Path(project_root).resolve()),
                     list(overrides))


def write_params(path: Path, *, overrides: Sequence[str] = (), conf_dir: Path = CONF_DIR) -> dict[str, Any]:
    """Compose ``conf/`` and write it as ``params.yaml`` (the file DVC tracks), byte for byte what DVC's
    own Hydra composition writes; the result is checked against the schema first."""
    data = to_plain(compose_config(overrides, conf_dir=conf_dir))
    validate(data, source="conf/")
    compose_params(Path(path), overrides=overrides, conf_dir=conf_dir)
    return data


def params_diff(expected: Mapping[str, Any], actual: Mapping[str, Any]) -> str:
    """A unified diff of two configs as YAML ("" when equal)."""
    if dict(expected) == dict(actual):
        return ""
    a = yaml.safe_dump(dict(expected), sort_keys=True).splitlines()
    b = yaml.safe_dump(dict(actual), sort_keys=True).splitlines()
    return "\n".join(difflib.unified_diff(a, b, "conf/ (composed)", PARAMS_FILE, lineterm=""))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compose conf/ and write or check params.yaml.")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", metavar="PATH", help="write the composed config to PATH")
    group.add_argument("--check", metavar="PATH", help="exit 1 when PATH differs from the composition")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=tiny")
    args = parser.parse_args(argv)
    if args.write:
        write_params(Path(args.write), overrides=args.overrides)
        return 0
    expected = to_plain(compose_config(args.overrides))
    actual = yaml.safe_load(Path(args.check).read_text(encoding="utf-8")) or {}
    diff = params_diff(expected, actual)
    if diff:
        sys.stderr.write(diff + "\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
