"""Unit tests for bdi.patchcore.features: a real timm DINOv2 ViT, shrunk (depth 4, 56/112 px) and randomly seeded."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from timm.layers import resample_abs_pos_embed

from bdi.backbones import BACKBONES
from bdi.config import FeatureConfig
from bdi.errors import DeviceError, InvalidInputError, WeightsError
from bdi.patchcore.features import FeatureBatch, FeatureExtractor
from bdi.patchcore.nets import create_backbone
from bdi.patchcore.weights import WeightsInfo, resolve_weights
from tests.helpers.tiny import tiny_feature_config

TINY = tiny_feature_config(input_size=56)  # the tiny model at its smallest input


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> FeatureExtractor:
    return FeatureExtractor(TINY, cache_dir=tmp_path_factory.mktemp("cache"))


def _cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a2, b2 = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    return (a2 * b2).sum(1) / (np.linalg.norm(a2, axis=1) * np.linalg.norm(b2, axis=1))


# ------------------------------------------------------------------------------------------ shapes


def test_token_grid_is_input_size_over_patch_size(tiny: FeatureExtractor) -> None:
    assert tiny.grid == (4, 4)
    assert tiny.stride == 14
    assert tiny.embed_dim == 384 * 3


def test_embeddings_shape_and_dtype(tiny: FeatureExtractor) -> None:
    batch = tiny.extract([_image(40, 60), _image(90, 30, seed=1)])
    assert isinstance(batch, FeatureBatch)
    assert batch.embeddings.shape == (2, 16, 1152)
    assert batch.embeddings.dtype == np.float32
    assert batch.grid == (4, 4)
    assert [(b.src_w, b.src_h) for b in batch.letterboxes] == [(60, 40), (30, 90)]
    assert np.isfinite(batch.embeddings).all()


def test_extract_of_no_images_is_empty(tiny: FeatureExtractor) -> None:
    batch = tiny.extract([])
    assert batch.embeddings.shape == (0, 16, 1152) and batch.letterboxes == ()


def test_extract_rejects_non_bgr_uint8(tiny: FeatureExtractor) -> None:
    with pytest.raises(InvalidInputError):
        tiny.extract([np.zeros((10, 10), np.uint8)])


def test_full_depth_vit_small_at_112(tmp_path: Path) -> None:
    cfg = FeatureConfig(weights="random", input_size=112, device="cpu")  # blocks 9, 10, 11
    extractor = FeatureExtractor(cfg, cache_dir=tmp_path)
    assert len(extractor.net.vit.blocks) == 12
    batch = extractor.extract([_image(50, 80)])
    assert batch.grid == (8, 8)
    assert batch.embeddings.shape == (1, 64, 1152)
    assert extractor.describe()["depth"] == 12


# ------------------------------------------------------------------------------------------ batching


def test_batched_extraction_equals_one_by_one(tmp_path: Path) -> None:
    extractor = FeatureExtractor(replace(TINY, batch_size=3), cache_dir=tmp_path)
    images = [_image(20 + 7 * i, 50 - 4 * i, seed=i) for i in range(5)]
    together = extractor.extract(images).embeddings
    alone = np.concatenate([extractor.extract([im]).embeddings for im in images])
    np.testing.assert_allclose(together, alone, atol=1e-4)


def test_iter_extract_streams_batches(tmp_path: Path) -> None:
    extractor = FeatureExtractor(replace(TINY, batch_size=2), cache_dir=tmp_path)
    images = (_image(30, 30, seed=i) for i in range(5))  # a generator: never materialised
    batches = list(extractor.iter_extract(images))
    assert [len(b) for b in batches] == [2, 2, 1]


# ------------------------------------------------------------------------------------------ random init


def test_random_init_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    a = create_backbone(TINY).state_dict()
    b = create_backbone(TINY).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_random_init_differs_between_seeds(tmp_path: Path, tiny: FeatureExtractor) -> None:
    other = FeatureExtractor(replace(TINY, seed=1), cache_dir=tmp_path)
    image = [_image(40, 60)]
    assert not np.allclose(tiny.extract(image).embeddings, other.extract(image).embeddings)


def test_building_leaves_global_torch_rng_untouched(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    FeatureExtractor(TINY, cache_dir=tmp_path)
    np.testing.assert_array_equal(torch.rand(4).numpy(), expected.numpy())


def test_random_weights_info_names_seed(tiny: FeatureExtractor) -> None:
    info = tiny.weights
    assert info == WeightsInfo(
        source="random", name="vit_small_patch14_dinov2(random,seed=0)", pretrained=False, seed=0
    )
    assert info.to_dict()["sha256"] is None
    assert tiny.describe()["weights"]["source"] == "random"


def test_golden_features_for_seed_0() -> None:
    """Pins architecture + preprocessing: any drift (antialias, letterbox, init, blocks) changes these."""
    extractor = FeatureExtractor(TINY, cache_dir=Path("unused-cache-dir"))
    image = np.random.default_rng(0).integers(0, 255, (40, 60, 3), np.uint8)
    emb = extractor.extract([image]).embeddings
    np.testing.assert_allclose(
        emb[0, 0, :4], [0.29142597, -0.8324596, -0.03782604, -0.56093484], atol=1e-4
    )
    assert float(emb.mean()) == pytest.approx(-0.017499901, abs=1e-4)


# ------------------------------------------------------------------------------------------ pos-embed


def test_pos_embed_resampled_once_bicubic_without_antialias(tiny: FeatureExtractor) -> None:
    native = create_backbone(TINY).pos_embed.detach()
    assert native.shape == (1, 1 + 37 * 37, 384)
    expected = resample_abs_pos_embed(native, new_size=[4, 4], old_size=[37, 37], antialias=False)
    antialiased = resample_abs_pos_embed(native, new_size=[4, 4], old_size=[37, 37], antialias=True)
    before = tiny.net.vit.pos_embed.detach().clone()
    assert before.shape == (1, 1 + 16, 384)
    torch.testing.assert_close(before, expected, rtol=0, atol=0)
    assert not torch.allclose(before, antialiased)
    tiny.extract([_image(30, 30)])
    assert torch.equal(tiny.net.vit.pos_embed.detach(), before)  # not re-resampled per call


# ------------------------------------------------------------------------------------------ precision


def test_bf16_on_cpu_is_close_to_fp32(tmp_path: Path, tiny: FeatureExtractor) -> None:
    bf16 = FeatureExtractor(replace(TINY, precision="bf16"), cache_dir=tmp_path)
    assert bf16.precision == "bf16"
    image = [_image(40, 60)]
    out = bf16.extract(image).embeddings
    assert out.dtype == np.float32
    assert _cosine_rows(out, tiny.extract(image).embeddings).min() > 0.99


def test_fp16_on_cpu_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(DeviceError, match="fp16"):
        FeatureExtractor(replace(TINY, precision="fp16"), cache_dir=tmp_path)


def test_auto_precision_on_cpu_is_fp32(tiny: FeatureExtractor) -> None:
    assert tiny.device == "cpu" and tiny.precision == "fp32"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present")
def test_cuda_requested_without_cuda_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(DeviceError, match="CUDA"):
        FeatureExtractor(replace(TINY, device="cuda"), cache_dir=tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fp16_autocast_is_close_to_cpu_fp32(tmp_path: Path, tiny: FeatureExtractor) -> None:
    gpu = FeatureExtractor(replace(TINY, device="auto"), cache_dir=tmp_path)
    assert gpu.device.startswith("cuda") and gpu.precision == "fp16"
    image = [_image(40, 60)]
    out = gpu.extract(image).embeddings
    assert out.dtype == np.float32
    assert _cosine_rows(out, tiny.extract(image).embeddings).min() > 0.99


# ------------------------------------------------------------------------------------------ weights


def test_missing_weights_path_raises_mentioning_bdi_weights(tmp_path: Path) -> None:
    cfg = replace(TINY, weights=str(tmp_path / "nope.pth"))
    with pytest.raises(WeightsError, match="BDI_WEIGHTS"):
        resolve_weights(cfg, cache_dir=tmp_path)


def test_official_offline_with_empty_cache_raises_and_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []

    def offline(url: str, dst: str, *args: object, **kwargs: object) -> None:
        calls.append(url)
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    cache = tmp_path / "cache"
    with pytest.raises(WeightsError) as info:
        FeatureExtractor(replace(TINY, weights="official"), cache_dir=cache)
    message = str(info.value)
    assert "BDI_WEIGHTS" in message and "random" in message
    assert calls == [BACKBONES["vit_small_patch14_dinov2"].official.url]
    assert list(cache.iterdir()) == []


def test_official_download_with_wrong_hash_is_rejected_naming_sha256_and_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    served = tmp_path / "served.pth"
    served.write_bytes(b"not the weights")
    spec = BACKBONES["vit_small_patch14_dinov2"]
    monkeypatch.setitem(BACKBONES, spec.name, replace(spec, official=replace(spec.official, url=served.as_uri())))
    cache = tmp_path / "cache"
    with pytest.raises(WeightsError, match="sha256") as info:
        resolve_weights(replace(TINY, weights="official"), cache_dir=cache)
    assert hashlib.sha256(b"not the weights").hexdigest() in str(info.value)
    assert list(cache.iterdir()) == []


def test_official_cache_file_with_wrong_hash_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "dinov2_vits14_pretrain.pth").write_bytes(b"not the weights")
    with pytest.raises(WeightsError, match="sha256"):
        resolve_weights(replace(TINY, weights="official"), cache_dir=tmp_path)


def test_file_with_official_name_and_wrong_hash_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(create_backbone(TINY).state_dict(), path)
    with pytest.raises(WeightsError, match="sha256"):
        resolve_weights(replace(TINY, weights=str(path)), cache_dir=tmp_path)


def test_saved_state_dict_roundtrips_with_sha256_recorded(tmp_path: Path) -> None:
    seeded = replace(TINY, seed=3)
    path = tmp_path / "vits_random.pth"
    torch.save(create_backbone(seeded).state_dict(), path)
    from_file = FeatureExtractor(replace(TINY, weights=str(path)), cache_dir=tmp_path)
    from_seed = FeatureExtractor(seeded, cache_dir=tmp_path)
    info = from_file.weights
    assert info.source == "file" and info.pretrained
    assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info.path == str(path.resolve()) and "vits_random.pth" in info.name
    image = [_image(40, 60)]
    np.testing.assert_array_equal(from_file.extract(image).embeddings, from_seed.extract(image).embeddings)


def test_safetensors_file_loads(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    seeded = replace(TINY, seed=4)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in create_backbone(seeded).state_dict().items()}, str(path))
    from_file = FeatureExtractor(replace(TINY, weights=str(path)), cache_dir=tmp_path)
    from_seed = FeatureExtractor(seeded, cache_dir=tmp_path)
    image = [_image(33, 21)]
    np.testing.assert_array_equal(from_file.extract(image).embeddings, from_seed.extract(image).embeddings)


def test_dinov2_format_full_depth_checkpoint_loads_into_shallow_model(tmp_path: Path) -> None:
    """An official-style file (``mask_token`` key, 12 blocks) goes through timm's converter and is cut."""
    full = replace(TINY, depth=None, seed=5)
    state = create_backbone(full).state_dict()
    state["mask_token"] = torch.zeros(1, 384)
    path = tmp_path / "dinov2_style.pth"
    torch.save(state, path)
    shallow = FeatureExtractor(replace(TINY, weights=str(path)), cache_dir=tmp_path)
    deep = FeatureExtractor(replace(full, weights=str(path)), cache_dir=tmp_path)
    assert len(shallow.net.vit.blocks) == 4 and len(deep.net.vit.blocks) == 12
    image = [_image(40, 60)]
    np.testing.assert_allclose(shallow.extract(image).embeddings, deep.extract(image).embeddings, atol=1e-5)


def test_checkpoint_missing_keys_is_rejected(tmp_path: Path) -> None:
    state = create_backbone(TINY).state_dict()
    del state["blocks.0.attn.qkv.weight"]
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match="missing"):
        FeatureExtractor(replace(TINY, weights=str(path)), cache_dir=tmp_path)


def test_unreadable_weights_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"\x00garbage")
    with pytest.raises(WeightsError, match="cannot read"):
        FeatureExtractor(replace(TINY, weights=str(path)), cache_dir=tmp_path)


def test_concurrent_extraction_from_threads_matches_serial(tiny: FeatureExtractor) -> None:
    from concurrent.futures import ThreadPoolExecutor

    images = [_image(30 + i, 40, seed=i) for i in range(4)]
    serial = [tiny.extract([im]).embeddings for im in images]
    with ThreadPoolExecutor(max_workers=4) as pool:
        parallel = list(pool.map(lambda im: tiny.extract([im]).embeddings, images))
    for a, b in zip(serial, parallel, strict=False):
        np.testing.assert_array_equal(a, b)
