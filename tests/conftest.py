"""Shared fixtures around the tiny model of :mod:`tests.helpers.tiny` (a real but shrunk DINOv2 ViT, random init)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bdi.data.synthetic import make_disc
from bdi.patchcore.features import FeatureExtractor
from bdi.service import InspectionService
from tests.helpers.tiny import tiny_settings


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
