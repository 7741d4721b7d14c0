"""The tiny test model, defined once: a real DINOv2 ViT-S/14 shrunk to depth 4, random init (seed 0), blocks 1,2,3,
112 px input on CPU. Fast on 2 cores and still the whole real pipeline. ``TINY_ENV`` is the same model as
``BDI_*`` variables (for servers and CLI subprocesses), ``TINY_FEATURES`` as ``model.features`` fields."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bdi.config import FeatureConfig, Settings

# precision fp32: the tiny model's scores are the tests' exact references on any CPU (BDI_PRECISION=auto would pick
# bf16 on a CPU with native bf16; tests/unit/test_precision_auto.py tests that choice on its own)
TINY_FEATURES: dict[str, Any] = {"weights": "random", "input_size": 112, "blocks": (1, 2, 3), "depth": 4,
                                  "device": "cpu", "precision": "fp32"}

# Everything a test server / service / CLI process needs to run this model fast on 2 CPU cores.
TINY_ENV: dict[str, str] = {
    "BDI_WEIGHTS": str(TINY_FEATURES["weights"]),
    "BDI_INPUT_SIZE": str(TINY_FEATURES["input_size"]),
    "BDI_FEATURE_BLOCKS": ",".join(str(b) for b in TINY_FEATURES["blocks"]),
    "BDI_BACKBONE_DEPTH": str(TINY_FEATURES["depth"]),
    "BDI_DEVICE": str(TINY_FEATURES["device"]),
    "BDI_PRECISION": str(TINY_FEATURES["precision"]),
}


def tiny_feature_config(**overrides: Any) -> FeatureConfig:
    """The tiny model's ``FeatureConfig`` (seed 0); ``overrides`` replace fields (e.g. ``input_size=56``)."""
    return FeatureConfig(**{**TINY_FEATURES, "seed": 0, **overrides})


def tiny_settings(models_dir: Path, *, features: Mapping[str, Any] | None = None, **overrides: Any) -> Settings:
    """Settings of the tiny random ViT; ``features`` overrides ``model.features`` fields, the rest top-level ones."""
    values: dict[str, Any] = {
        "models_dir": models_dir,
        "model": {"features": {**TINY_FEATURES, **(features or {})}},
        "min_ok_samples": 10,
        "weights_cache_dir": models_dir.parent / "weights-cache",
    }
    values.update(overrides)
    return Settings(**values)
