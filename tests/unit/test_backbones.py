"""The backbone registry and the pretrained CNN: weights that map tensor for tensor, pinned by sha256,
features of the right shape, a clear error when its package is missing, and real detection."""

from __future__ import annotations

import hashlib
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from bdi import backbones
from bdi.backbones import BACKBONES, EFFICIENTNET_LITE0, EFFICIENTNET_LITE2, backbone_spec
from bdi.config import FeatureConfig
from bdi.errors import WeightsError
from bdi.patchcore.features import FeatureExtractor
from bdi.patchcore.nets import create_backbone
from bdi.patchcore.weights import convert_by_order, load_state_dict_file, resolve_weights

LITE0 = FeatureConfig(backbone=EFFICIENTNET_LITE0, weights="official", input_size=64, device="cpu")


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)


def test_every_registered_backbone_names_pinned_official_weights() -> None:
    for name, spec in BACKBONES.items():
        assert spec.name == name
        assert len(spec.official.sha256) == 64
        assert spec.official.url or spec.official.package  # somewhere to get them from
        assert spec.input_size % spec.size_multiple == 0


def test_unknown_backbone_is_rejected_naming_the_known_ones() -> None:
    with pytest.raises(WeightsError, match="BDI_BACKBONE"):
        backbone_spec("resnet_nonexistent")
    with pytest.raises(ValueError, match=EFFICIENTNET_LITE0):
        FeatureConfig(backbone="resnet_nonexistent")


PIP_CNNS = [EFFICIENTNET_LITE0, EFFICIENTNET_LITE2]


@pytest.mark.parametrize("backbone", PIP_CNNS)
def test_official_cnn_weights_come_from_the_installed_package_with_their_sha256(backbone: str, tmp_path: Path) -> None:
    config = FeatureConfig(backbone=backbone, weights="official", input_size=64, device="cpu")
    info = resolve_weights(config, cache_dir=tmp_path)
    assert info.source == "official" and info.pretrained
    assert info.sha256 == BACKBONES[backbone].official.sha256
    assert info.name == f"{backbone}.in1k"
    assert list(tmp_path.iterdir()) == []  # nothing downloaded, nothing cached: it works offline


@pytest.mark.parametrize("backbone", PIP_CNNS)
def test_efficientnet_pytorch_checkpoint_maps_every_tensor_onto_timm_by_order(backbone: str, tmp_path: Path) -> None:
    config = FeatureConfig(backbone=backbone, weights="official", input_size=64, device="cpu")
    path = Path(str(resolve_weights(config, cache_dir=tmp_path).path))
    theirs = load_state_dict_file(path)
    assert next(iter(theirs)) == "_conv_stem.weight"  # EfficientNet-PyTorch names, not timm's
    model = create_backbone(config)
    converted = convert_by_order(theirs, model, source=str(path))
    assert list(converted) == list(model.state_dict())
    model.load_state_dict(converted, strict=True)
    for (_, tensor), (_, loaded) in zip(theirs.items(), model.state_dict().items(), strict=True):
        assert torch.equal(tensor, loaded)


def test_checkpoint_of_another_network_is_refused(tmp_path: Path) -> None:
    vit = create_backbone(FeatureConfig(weights="random", depth=2, blocks=(1,)))
    with pytest.raises(WeightsError, match="not this network|does not fit"):
        convert_by_order(vit.state_dict(), create_backbone(LITE0), source="vit.pth")


def _flip_one_byte(path: Path) -> None:
    with path.open("r+b") as fh:  # flip one byte in the middle of the tensors
        fh.seek(path.stat().st_size // 2)
        byte = fh.read(1)[0]
        fh.seek(-1, 1)
        fh.write(bytes([byte ^ 0xFF]))


def test_changed_official_cnn_file_fails_its_sha256(tmp_path: Path) -> None:
    official = Path(str(resolve_weights(LITE0, cache_dir=tmp_path).path))
    tampered = tmp_path / official.name
    shutil.copyfile(official, tampered)
    _flip_one_byte(tampered)
    with pytest.raises(WeightsError, match="sha256"):
        resolve_weights(replace(LITE0, weights=str(tampered)), cache_dir=tmp_path)


def test_tampered_file_shipped_by_the_weights_package_fails_its_sha256(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A package of the same name first on sys.path, shipping a copy with one byte flipped; site-packages untouched.
    official = BACKBONES[EFFICIENTNET_LITE0].official
    assert official.package is not None and official.package_path is not None
    real = Path(str(resolve_weights(LITE0, cache_dir=tmp_path).path))
    package = tmp_path / "site" / official.package
    tampered = package / official.package_path
    tampered.parent.mkdir(parents=True)
    (package / "__init__.py").write_text("", encoding="utf-8")
    shutil.copyfile(real, tampered)
    _flip_one_byte(tampered)
    monkeypatch.delitem(sys.modules, official.package, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(WeightsError, match="sha256") as info:
        FeatureExtractor(LITE0, cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert str(tampered) in message  # the package's file was the one checked ...
    assert hashlib.sha256(tampered.read_bytes()).hexdigest() in message and official.sha256 in message
    assert "BDI_WEIGHTS" in message


def test_missing_weights_package_gives_an_error_naming_bdi_backbone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = BACKBONES[EFFICIENTNET_LITE0]
    gone = replace(spec, official=replace(spec.official, package="bdi_no_such_weights_package"))
    monkeypatch.setitem(backbones.BACKBONES, EFFICIENTNET_LITE0, gone)  # type: ignore[index]
    with pytest.raises(WeightsError) as info:
        FeatureExtractor(LITE0, cache_dir=tmp_path)
    message = str(info.value)
    assert "BDI_BACKBONE" in message and "pip install" in message and "BDI_WEIGHTS" in message


def test_cnn_features_are_stride_8_and_152_wide(tmp_path: Path) -> None:
    extractor = FeatureExtractor(LITE0, cache_dir=tmp_path)
    batch = extractor.extract([_image(40, 90), _image(64, 64, seed=1)])
    assert extractor.grid == (8, 8) and extractor.stride == 8
    assert batch.embeddings.shape == (2, 64, 152) and batch.embeddings.dtype == np.float32
    assert extractor.describe()["family"] == "cnn"
    assert extractor.describe()["blocks"] == [2, 4] and extractor.describe()["neighbourhood"] == 3


def test_unset_feature_settings_take_the_backbones_defaults() -> None:
    resolved = FeatureConfig(backbone=EFFICIENTNET_LITE0).resolved()
    spec = BACKBONES[EFFICIENTNET_LITE0]
    assert (resolved.input_size, resolved.blocks, resolved.neighbourhood) == (
        spec.input_size, spec.blocks, spec.neighbourhood,
    )
    assert FeatureConfig().resolved().blocks == (9, 10, 11)  # the DINOv2 default is unchanged


def test_cnn_input_size_must_be_a_multiple_of_32() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        FeatureConfig(backbone=EFFICIENTNET_LITE0, input_size=100)


def test_pretrained_weights_change_the_features(tmp_path: Path) -> None:
    pretrained = FeatureExtractor(LITE0, cache_dir=tmp_path)
    random = FeatureExtractor(replace(LITE0, weights="random"), cache_dir=tmp_path)
    image = [_image(64, 64)]
    assert not np.allclose(pretrained.extract(image).embeddings, random.extract(image).embeddings, atol=1e-3)
    assert pretrained.signature()["weights_sha256"] != random.signature()["weights_sha256"]
