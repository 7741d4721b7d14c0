"""The backbone: a timm DINOv2 ViT whose intermediate patch tokens are the PatchCore features.

API_CONTRACT §3.1 / DESIGN.md: ``vit_small_patch14_dinov2`` built at its native 518 px (37×37 grid), its
weights loaded (official file, local file or seeded random init), then its position embedding resampled
**once** to ``input_size // 14`` tokens per side, bicubic *without* antialias (as the legacy backend did),
and the patch tokens of ``cfg.blocks`` (no final norm) concatenated on the channel axis.

Only this module imports torch/timm. Nothing is built at import time.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import timm
import torch
from timm.layers.pos_embed import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from bdi.config import DINOV2_PRETRAINED_TAG, FeatureConfig
from bdi.errors import InvalidInputError, WeightsError
from bdi.imaging import Letterbox, letterbox, normalize_imagenet

_log = logging.getLogger(__name__)

NATIVE_IMG_SIZE = 518  # DINOv2's pretraining resolution: a 37×37 grid of 14 px patches


@dataclass(frozen=True)
class _OfficialWeights:
    filename: str
    url: str
    sha256: str


# The one place that knows where each backbone's official weights live (name → file, URL, hash).
OFFICIAL_WEIGHTS: Mapping[str, _OfficialWeights] = {
    "vit_small_patch14_dinov2": _OfficialWeights(
        filename="dinov2_vits14_pretrain.pth",
        url="https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth",
        sha256="b938bf1bc15cd2ec0feacfe3a1bb553fe8ea9ca46a7e1d8d00217f29aef60cd9",
    ),
}

WeightsSource = Literal["random", "file", "official"]


# --------------------------------------------------------------------------------------------- weights


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


# Speed only: the sha256 of a file keyed by its fingerprint (path, mtime_ns, size). A changed file gets a
# new key, so a stale entry can never be returned for it.
_SHA256_CACHE: dict[tuple[str, int, int], str] = {}
_SHA256_LOCK = threading.Lock()


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, streamed in 1 MiB chunks (memoised on path + mtime_ns + size)."""
    resolved = path.resolve()
    stat = resolved.stat()
    key = (str(resolved), stat.st_mtime_ns, stat.st_size)
    with _SHA256_LOCK:
        cached = _SHA256_CACHE.get(key)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    with resolved.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    value = digest.hexdigest()
    with _SHA256_LOCK:
        _SHA256_CACHE[key] = value
    return value


def _pretrained_name(backbone: str) -> str:
    return f"{backbone}.{DINOV2_PRETRAINED_TAG}"


def _download_official(official: _OfficialWeights, *, target: Path) -> None:
    """Download the official file to ``target`` atomically (temp file in the same folder + rename)."""
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")
    try:
        torch.hub.download_url_to_file(official.url, str(tmp), hash_prefix=None, progress=False)
        got = file_sha256(tmp)
        if got != official.sha256:
            raise WeightsError(
                f"downloaded {official.url} has sha256 {got}, expected {official.sha256}; "
                "set BDI_WEIGHTS to a local weights file path or to `random`"
            )
        os.replace(tmp, target)
    except WeightsError:
        raise
    except Exception as exc:  # noqa: BLE001 - any network/disk failure means "not available offline"
        raise WeightsError(
            f"could not download the official weights from {official.url} ({type(exc).__name__}: {exc}). "
            f"Set BDI_WEIGHTS to a local weights file path (e.g. {official.filename}) or to `random`"
        ) from exc
    finally:
        tmp.unlink(missing_ok=True)


def resolve_weights(cfg: FeatureConfig, *, cache_dir: Path) -> WeightsInfo:
    """Decide which weights ``cfg.weights`` names, fetching/verifying files; never falls back silently.

    * ``"random"``: deterministic random init with ``cfg.seed``.
    * ``"official"``: ``cache_dir/<official file>`` (sha256-checked), downloaded there when missing.
    * anything else: a local file path (``.pth``/``.pt``/``.bin``/``.safetensors``), whose sha256 is
      recorded; a file with the official name must have the official hash.

    Raises:
        WeightsError: missing file, hash mismatch, download impossible (offline).
    """
    spec = cfg.weights.strip()
    if spec.lower() == "random":
        return WeightsInfo(
            source="random",
            name=f"{cfg.backbone}(random,seed={cfg.seed})",
            pretrained=False,
            seed=cfg.seed,
        )
    official = OFFICIAL_WEIGHTS.get(cfg.backbone)
    if spec.lower() == "official":
        if official is None:
            raise WeightsError(
                f"no official weights are known for backbone {cfg.backbone!r}; "
                "set BDI_WEIGHTS to a local weights file path or to `random`"
            )
        target = Path(cache_dir).expanduser() / official.filename
        if not target.is_file():
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise WeightsError(
                    f"cannot create the weights cache dir {target.parent} ({exc}); "
                    "set BDI_WEIGHTS_CACHE_DIR, or BDI_WEIGHTS to a local file path or to `random`"
                ) from exc
            _download_official(official, target=target)
        got = file_sha256(target)
        if got != official.sha256:
            raise WeightsError(
                f"cached weights {target} have sha256 {got}, expected {official.sha256}; delete the file "
                "or set BDI_WEIGHTS to a local weights file path or to `random`"
            )
        return WeightsInfo(
            source="official",
            name=_pretrained_name(cfg.backbone),
            pretrained=True,
            path=str(target),
            sha256=got,
        )
    path = Path(spec).expanduser()
    if not path.is_file():
        raise WeightsError(
            f"weights file {str(path)!r} does not exist; set BDI_WEIGHTS to an existing weights file path, "
            "to `official` or to `random`"
        )
    got = file_sha256(path)
    if official is not None and path.name == official.filename and got != official.sha256:
        raise WeightsError(
            f"weights file {path} has sha256 {got}, expected the official {official.sha256}; "
            "the file is corrupt or not the official DINOv2 checkpoint (check BDI_WEIGHTS)"
        )
    is_official = official is not None and got == official.sha256
    return WeightsInfo(
        source="file",
        name=_pretrained_name(cfg.backbone) if is_official else f"{cfg.backbone}(file={path.name})",
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


# --------------------------------------------------------------------------------------------- model


_BUILD_LOCK = threading.Lock()  # fork_rng swaps the process RNG state; two builds must not interleave


def create_backbone(cfg: FeatureConfig) -> VisionTransformer:
    """The timm ViT at its native 518 px, randomly initialised from ``cfg.seed``, on the CPU.

    The init runs inside ``torch.random.fork_rng`` so the caller's global RNG is left untouched, and the
    same seed gives bitwise-identical weights. Loading weights and resizing happen in ``DinoV2Features``.
    """
    kwargs: dict[str, Any] = {
        "pretrained": False,
        "num_classes": 0,
        "img_size": NATIVE_IMG_SIZE,
        "dynamic_img_size": False,
    }
    if cfg.depth is not None:
        kwargs["depth"] = cfg.depth
    with _BUILD_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        try:
            model = timm.create_model(cfg.backbone, **kwargs)
        except RuntimeError as exc:  # unknown model name
            raise WeightsError(f"cannot build backbone {cfg.backbone!r}: {exc}") from exc
    if not isinstance(model, VisionTransformer):
        raise WeightsError(f"backbone {cfg.backbone!r} is not a timm VisionTransformer")
    return model


def _load_weights(model: VisionTransformer, state_dict: dict[str, torch.Tensor], *, source: str) -> None:
    """Convert (DINOv2 → timm keys via ``checkpoint_filter_fn``) and load strictly.

    Blocks beyond a reduced ``depth`` are dropped from the checkpoint; anything else missing or extra
    is an error.
    """
    converted = checkpoint_filter_fn(dict(state_dict), model)
    depth = len(model.blocks)
    block_key = re.compile(r"^blocks\.(\d+)\.")
    kept: dict[str, torch.Tensor] = {}
    for key, value in converted.items():
        match = block_key.match(key)
        if match and int(match.group(1)) >= depth:
            continue
        kept[key] = value
    try:
        result = model.load_state_dict(kept, strict=False)
    except RuntimeError as exc:  # shape mismatch
        raise WeightsError(f"weights {source} do not fit backbone: {exc}") from exc
    if result.missing_keys or result.unexpected_keys:
        raise WeightsError(
            f"weights {source} do not match the backbone: missing {list(result.missing_keys)[:5]}, "
            f"unexpected {list(result.unexpected_keys)[:5]}"
        )


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


def cuda_available() -> bool:
    """Whether this process can use CUDA (cheap after the first call)."""
    return bool(torch.cuda.is_available())


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if cuda_available() else "cpu")
    if name == "cuda" and not cuda_available():
        raise ValueError("device 'cuda' was requested (BDI_DEVICE) but CUDA is not available")
    return torch.device(name)


def _resolve_precision(name: str, device: torch.device) -> str:
    if name == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise ValueError("precision 'fp16' needs CUDA; use 'fp32' or 'bf16' on the CPU (BDI_PRECISION)")
    return name


@dataclass(frozen=True)
class FeatureBatch:
    """Patch features of a batch of images.

    Attributes:
        embeddings: ``(B, Ht*Wt, D)`` float32, raw (not L2-normalised), rows in row-major token order.
        grid: ``(Ht, Wt)`` token grid.
        letterboxes: one ``Letterbox`` per image, to map tokens back to the source image.
    """

    embeddings: np.ndarray
    grid: tuple[int, int]
    letterboxes: tuple[Letterbox, ...]

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])


class DinoV2Features:
    """A DINOv2 ViT feature extractor: BGR images → ``(B, Ht*Wt, D)`` float32 patch features.

    Build one per process (server lifespan / pipeline main) and share it; ``extract`` is thread-safe.
    """

    def __init__(self, cfg: FeatureConfig, *, cache_dir: Path) -> None:
        self._cfg = cfg
        self._device = _resolve_device(cfg.device)
        self._precision = _resolve_precision(cfg.precision, self._device)
        self._weights = resolve_weights(cfg, cache_dir=cache_dir)
        model = create_backbone(cfg)
        if self._weights.path is not None:
            path = Path(self._weights.path)
            _load_weights(model, load_state_dict_file(path), source=str(path))
        if max(cfg.blocks) >= len(model.blocks):
            raise ValueError(f"blocks {cfg.blocks} do not exist in a ViT of depth {len(model.blocks)}")
        _resize_to_grid(model, input_size=cfg.input_size)
        model.eval()
        for param in model.parameters():
            param.requires_grad_(False)
        self._model = model.to(self._device)
        self._grid = (int(model.patch_embed.grid_size[0]), int(model.patch_embed.grid_size[1]))
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ properties

    @property
    def config(self) -> FeatureConfig:
        return self._cfg

    @property
    def model(self) -> VisionTransformer:
        return self._model

    @property
    def weights(self) -> WeightsInfo:
        return self._weights

    @property
    def device(self) -> str:
        return str(self._device)

    @property
    def precision(self) -> str:
        """The effective precision: ``fp32``, ``fp16`` (CUDA autocast) or ``bf16`` (autocast)."""
        return self._precision

    @property
    def grid(self) -> tuple[int, int]:
        """``(Ht, Wt)`` = ``(input_size // 14, input_size // 14)``."""
        return self._grid

    @property
    def num_tokens(self) -> int:
        return self._grid[0] * self._grid[1]

    @property
    def embed_dim(self) -> int:
        """Feature width D = backbone width × number of blocks (1152 for ViT-S and 3 blocks)."""
        return int(self._model.embed_dim) * len(self._cfg.blocks)

    @property
    def patch_size(self) -> int:
        return int(self._model.patch_embed.patch_size[0])

    def describe(self) -> dict[str, Any]:
        """What decides the features, for manifests, MLflow params and ``/health``."""
        return {
            "backbone": self._cfg.backbone,
            "input_size": self._cfg.input_size,
            "blocks": list(self._cfg.blocks),
            "depth": len(self._model.blocks),
            "patch_size": self.patch_size,
            "grid": list(self._grid),
            "embed_dim": self.embed_dim,
            "device": self.device,
            "precision": self._precision,
            "weights": self._weights.to_dict(),
        }

    # ------------------------------------------------------------------ extraction

    def _autocast(self) -> AbstractContextManager[Any]:
        if self._precision == "fp16":
            return torch.autocast(device_type=self._device.type, dtype=torch.float16)
        if self._precision == "bf16":
            return torch.autocast(device_type=self._device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        """``(B, 3, S, S)`` float32 normalised → ``(B, Ht*Wt, D)`` float32."""
        x = torch.from_numpy(batch).to(self._device, non_blocking=True)
        with self._lock, torch.inference_mode(), self._autocast():
            # intermediates_only=True returns just the list of block outputs; timm annotates the
            # union of every return mode (list, (final, list) tuple, dict).
            outs = cast(list[torch.Tensor], self._model.forward_intermediates(
                x,
                indices=list(self._cfg.blocks),
                norm=False,
                stop_early=True,
                output_fmt="NLC",
                intermediates_only=True,
            ))
            feats = torch.cat([o.float() for o in outs], dim=-1)
            result = feats.cpu().numpy()
        expected = (batch.shape[0], self.num_tokens, self.embed_dim)
        if result.shape != expected:  # prefix/register tokens must have been stripped by timm
            raise RuntimeError(f"backbone returned {result.shape}, expected {expected}")
        return np.ascontiguousarray(result, dtype=np.float32)

    def _extract_chunk(self, images: Sequence[np.ndarray]) -> FeatureBatch:
        boxes: list[Letterbox] = []
        canvases: list[np.ndarray] = []
        for image in images:
            canvas, box = letterbox(image, self._cfg.input_size)
            canvases.append(canvas)
            boxes.append(box)
        batch = normalize_imagenet(np.stack(canvases))
        return FeatureBatch(embeddings=self._forward(batch), grid=self._grid, letterboxes=tuple(boxes))

    def _empty(self) -> FeatureBatch:
        empty = np.zeros((0, self.num_tokens, self.embed_dim), dtype=np.float32)
        return FeatureBatch(embeddings=empty, grid=self._grid, letterboxes=())

    def extract(self, images: Sequence[np.ndarray]) -> FeatureBatch:
        """Features of BGR ``uint8`` ``(H, W, 3)`` images (any sizes), batched by ``cfg.batch_size``.

        Returns:
            ``FeatureBatch`` with embeddings ``(len(images), Ht*Wt, D)`` float32.

        Raises:
            InvalidInputError: an image that is not BGR ``uint8`` ``(H, W, 3)``.
        """
        parts = list(self.iter_extract(images))
        if not parts:
            return self._empty()
        if len(parts) == 1:
            return parts[0]
        return FeatureBatch(
            embeddings=np.concatenate([p.embeddings for p in parts], axis=0),
            grid=self._grid,
            letterboxes=tuple(box for p in parts for box in p.letterboxes),
        )

    def iter_extract(
        self,
        images: Iterable[np.ndarray],
        *,
        on_batch: Callable[[int], None] | None = None,
    ) -> Iterator[FeatureBatch]:
        """Stream features of many images, one ``FeatureBatch`` per ``cfg.batch_size`` images.

        ``on_batch(n_done)`` is called after each batch with the number of images done so far (to drive
        a progress bar outside the library).
        """
        if isinstance(images, np.ndarray) and images.ndim != 4:
            raise InvalidInputError(
                f"pass a sequence of (H, W, 3) images or a (B, H, W, 3) array, got shape {images.shape}"
            )
        chunk: list[np.ndarray] = []
        done = 0
        for image in images:
            chunk.append(image)
            if len(chunk) == self._cfg.batch_size:
                out = self._extract_chunk(chunk)
                done += len(chunk)
                chunk = []
                if on_batch is not None:
                    on_batch(done)
                yield out
        if chunk:
            out = self._extract_chunk(chunk)
            done += len(chunk)
            if on_batch is not None:
                on_batch(done)
            yield out
