"""The feature nets: a registered timm backbone whose intermediate feature maps are the PatchCore features.

Two families (``bdi.backbones``):

* ``vit`` (DINOv2 ViT-S/14, the default; docs/contract.md "Feature extractor"): built at its native 518 px,
  weights loaded (official file, local file or seeded random init, :mod:`bdi.patchcore.weights`), the position
  embedding resampled **once** to ``input_size // 14`` tokens per side, bicubic *without* antialias (as the
  legacy backend did), and the patch tokens of ``blocks`` (no final norm) concatenated on the channel axis
  (:class:`VitPatchFeatures`).
* ``cnn`` (EfficientNet-Lite0): PatchCore's usual path: the outputs of mid-level stages ``blocks``, each
  averaged over a ``neighbourhood``×``neighbourhood`` window, upsampled (bilinear) to the finest of them
  and concatenated (:class:`CnnPatchFeatures`).

Either way :func:`build_feature_net` returns a plain, frozen ``nn.Module`` mapping a normalised
``(B, 3, S, S)`` batch to ``(B, Ht*Wt, D)`` patch features, so it can be exported as it is.
Nothing is built at import time.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, cast

import timm
import torch
import torch.nn.functional as F  # noqa: N812 - the torch convention
from timm.layers.pos_embed import resample_abs_pos_embed
from timm.models.efficientnet import EfficientNet
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from bdi.backbones import backbone_spec
from bdi.config import FeatureConfig
from bdi.errors import WeightsError
from bdi.patchcore.weights import WeightsInfo, load_state_dict_file, load_weights_into

NATIVE_IMG_SIZE = 518  # DINOv2's pretraining resolution: a 37×37 grid of 14 px patches

_BUILD_LOCK = threading.Lock()  # fork_rng swaps the process RNG state; two builds must not interleave


def create_backbone(cfg: FeatureConfig) -> nn.Module:
    """The timm model of ``cfg.backbone``, randomly initialised from ``cfg.seed``, on the CPU.

    A ViT is built at its native 518 px (resized to ``input_size`` later, see :func:`_resize_to_grid`);
    a CNN with its ImageNet head, so an official checkpoint maps tensor for tensor. The init runs inside
    ``torch.random.fork_rng`` so the caller's global RNG is left untouched, and the same seed gives
    bitwise-identical weights.
    """
    spec = backbone_spec(cfg.backbone)
    kwargs: dict[str, Any] = {"pretrained": False}
    if spec.family == "vit":
        kwargs.update(num_classes=0, img_size=NATIVE_IMG_SIZE, dynamic_img_size=False)
    if cfg.depth is not None:
        if spec.family != "vit":
            raise WeightsError(f"depth applies to ViT backbones only, not to {cfg.backbone!r}")
        kwargs["depth"] = cfg.depth
    with _BUILD_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        try:
            model = timm.create_model(cfg.backbone, **kwargs)
        except RuntimeError as exc:  # unknown model name
            raise WeightsError(f"cannot build backbone {cfg.backbone!r}: {exc}") from exc
    expected = VisionTransformer if spec.family == "vit" else EfficientNet
    if not isinstance(model, expected):
        raise WeightsError(f"backbone {cfg.backbone!r} is not a timm {expected.__name__}")
    return cast(nn.Module, model)


def _resize_to_grid(model: VisionTransformer, *, input_size: int) -> None:
    """Set the model's input to ``input_size`` and resample its position embedding once.

    Bicubic, ``align_corners=False``, **no antialias** (timm's ``set_input_size`` would antialias).
    """
    old_grid = tuple(model.patch_embed.grid_size)
    model.patch_embed.set_input_size(img_size=(input_size, input_size))
    new_grid = tuple(model.patch_embed.grid_size)
    if model.pos_embed is None or new_grid == old_grid:
        return
    num_prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    with torch.no_grad():
        resampled = resample_abs_pos_embed(
            model.pos_embed.data,
            new_size=list(new_grid),
            old_size=list(old_grid),
            num_prefix_tokens=num_prefix,
            interpolation="bicubic",
            antialias=False,
        )
    model.pos_embed = torch.nn.Parameter(resampled.contiguous(), requires_grad=False)


class VitPatchFeatures(nn.Module):
    """ViT patch tokens of ``blocks`` (no final norm), concatenated: ``(B, 3, S, S)`` → ``(B, Ht*Wt, D)``."""

    def __init__(self, model: VisionTransformer, *, blocks: tuple[int, ...]) -> None:
        super().__init__()
        if max(blocks) >= len(model.blocks):
            raise WeightsError(f"blocks {blocks} do not exist in a ViT of depth {len(model.blocks)}")
        self.vit = model
        self.blocks = blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # intermediates_only=True returns just the list of block outputs; timm annotates the
        # union of every return mode (list, (final, list) tuple, dict).
        outs = cast(list[torch.Tensor], self.vit.forward_intermediates(
            x, indices=list(self.blocks), norm=False, stop_early=True, output_fmt="NLC", intermediates_only=True,
        ))
        return torch.cat(outs, dim=-1)


class CnnPatchFeatures(nn.Module):
    """PatchCore's CNN features: stage outputs ``blocks``, each averaged over a ``neighbourhood`` window
    (stride 1, zero padding counted, as PatchCore and anomalib do), upsampled bilinearly to the grid of the
    finest one and concatenated: ``(B, 3, S, S)`` → ``(B, Ht*Wt, D)``. Stages after the last one are dropped.
    """

    def __init__(self, model: EfficientNet, *, blocks: tuple[int, ...], neighbourhood: int) -> None:
        super().__init__()
        if max(blocks) >= len(model.blocks):
            raise WeightsError(f"blocks {blocks} do not exist in a CNN of {len(model.blocks)} stages")
        self.stem = nn.Sequential(model.conv_stem, model.bn1)
        self.stages = nn.ModuleList(list(model.blocks)[: max(blocks) + 1])
        self.blocks = tuple(sorted(blocks))
        self.pool: nn.Module = (
            nn.AvgPool2d(neighbourhood, stride=1, padding=neighbourhood // 2) if neighbourhood > 1 else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps: list[torch.Tensor] = []
        h = self.stem(x)
        for i, stage in enumerate(self.stages):
            h = stage(h)
            if i in self.blocks:
                maps.append(self.pool(h))
        size = maps[0].shape[-2:]
        upsampled = [maps[0]] + [F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps[1:]]
        return torch.cat(upsampled, dim=1).flatten(2).transpose(1, 2)


def build_feature_net(cfg: FeatureConfig, *, weights: WeightsInfo) -> nn.Module:
    """The eval-mode, frozen :class:`VitPatchFeatures` or :class:`CnnPatchFeatures` of a resolved ``cfg``."""
    spec = backbone_spec(cfg.backbone)
    model = create_backbone(cfg)
    if weights.path is not None:
        path = Path(weights.path)
        load_weights_into(model, load_state_dict_file(path), source=str(path))
    assert cfg.blocks is not None and cfg.input_size is not None and cfg.neighbourhood is not None
    net: nn.Module
    if spec.family == "vit":
        assert isinstance(model, VisionTransformer)
        _resize_to_grid(model, input_size=cfg.input_size)
        net = VitPatchFeatures(model, blocks=cfg.blocks)
    else:
        assert isinstance(model, EfficientNet)
        net = CnnPatchFeatures(model, blocks=cfg.blocks, neighbourhood=cfg.neighbourhood)
    net.eval()
    for param in net.parameters():
        param.requires_grad_(False)
    return net
