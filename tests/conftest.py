"""Shared fixtures: a real but shrunk DINOv2 ViT (random init, depth 4, 112 px input)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bdi.config import Settings
from bdi.data.synthetic import make_disc
from bdi.patchcore.features import FeatureExtractor
from bdi.service import InspectionService

# Everything a test server / service needs to run fast on 2 CPU cores.
TINY_ENV: dict[str, str] = {
    "BDI_WEIGHTS": "random",
    "BDI_INPUT_SIZE": "112",
    "BDI_FEATURE_BLOCKS": "1,2,3",
    "BDI_BACKBONE_DEPTH": "4",
    "BDI_DEVICE": "cpu",
}


TINY_FEATURES: dict[str, Any] = {"weights": "random", "input_size": 112, "blocks": (1, 2, 3), "depth": 4,
                                  "device": "cpu"}


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


@pytest.fixture(scope="session")
def tiny_extractor(tmp_path_factory: pytest.TempPathFactory) -> FeatureExtractor:
    settings = tiny_settings(tmp_path_factory.mktemp("extractor") / "models")
    return FeatureExtractor(settings.model.features, cache_dir=settings.weights_cache_dir)


@pytest.fixture()
def service(tmp_path: Path, tiny_extractor: FeatureExtractor) -> InspectionService:
    return InspectionService(settings=tiny_settings(tmp_path / "models"), extractor=tiny_extractor)


@pytest.fixture(scope="session")
def good_discs() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [make_disc(size=96, rng=rng).image for _ in range(12)]


@pytest.fixture(scope="session")
def defect_discs() -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [make_disc(size=96, defect=kind, rng=rng).image for kind in ("pit", "scratch", "crack")]
