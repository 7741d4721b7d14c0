"""Patch features: images in, PatchCore features out (:class:`FeatureExtractor`).

The extractor letterboxes and normalises images, runs the feature net of :mod:`bdi.patchcore.nets`
(a timm ViT or CNN, ``(B, 3, S, S)`` → ``(B, Ht*Wt, D)``; weights resolved by :mod:`bdi.patchcore.weights`)
in torch on the configured device and precision, or through a :class:`ForwardRuntime` (an exported graph,
``bdi.runtime``), and returns the features as :class:`FeatureBatch`. torch, timm and the weights live in
the ``bdi.patchcore`` modules (``nets``, ``weights`` and this one); nothing is built at import time.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from bdi.backbones import BackboneSpec, Intensity, backbone_spec
from bdi.config import FeatureConfig
from bdi.errors import DeviceError, InvalidInputError
from bdi.patchcore.alignment import measure_map_offset
from bdi.patchcore.imaging import Letterbox, letterbox, normalize_imagenet, standardize_intensity
from bdi.patchcore.inference import NO_OFFSET, Offset
from bdi.patchcore.nets import VitPatchFeatures, build_feature_net
from bdi.patchcore.weights import WeightsInfo, resolve_weights

_log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------- runtime hook


class ForwardRuntime(Protocol):
    """What runs the feature net instead of torch (``bdi.runtime``: an exported graph in ONNX Runtime or
    OpenVINO): normalised ``(B, 3, S, S)`` float32 → ``(B, Ht*Wt, D)`` float32, as :attr:`FeatureExtractor.net`."""

    @property
    def name(self) -> str: ...

    def run(self, batch: np.ndarray) -> np.ndarray: ...


StageClock = Callable[[str], AbstractContextManager[Any]]  # e.g. ``bdi.patchcore.inference.StageTimer().stage``


def _no_clock(name: str) -> AbstractContextManager[Any]:
    return nullcontext()


def cuda_available() -> bool:
    """Whether this process can use CUDA (cheap after the first call)."""
    return bool(torch.cuda.is_available())


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if cuda_available() else "cpu")
    if name == "cuda" and not cuda_available():
        raise DeviceError("device 'cuda' was requested (BDI_DEVICE) but CUDA is not available")
    return torch.device(name)


CPUINFO = Path("/proc/cpuinfo")
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 CPU flags of a bf16 matmul in hardware


def cpu_flags(path: Path = CPUINFO) -> frozenset[str]:
    """The CPU feature flags of ``path`` (``/proc/cpuinfo``'s first ``flags`` line); empty where unreadable."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def native_bf16_flags(flags: Iterable[str]) -> tuple[str, ...]:
    """The flags of ``flags`` that say the CPU computes bf16 natively (empty: it does not)."""
    have = set(flags)
    return tuple(flag for flag in NATIVE_BF16_FLAGS if flag in have)


def resolve_precision(name: str, device: torch.device, *, cpu_flags_seen: Iterable[str] | None = None
                      ) -> tuple[str, str]:
    """The precision ``name`` runs at on ``device`` and why: ``auto`` is fp16 on CUDA, bf16 on a CPU with native
    bf16 (``cpu_flags_seen``, default this machine's :func:`cpu_flags`), else fp32. A reduced precision still runs
    only if it passes the parity check where the runtime is attached (``bdi.runtime.select``: fp32 otherwise)."""
    if name == "auto":
        if device.type == "cuda":
            return "fp16", "auto: fp16 on CUDA"
        native = native_bf16_flags(cpu_flags() if cpu_flags_seen is None else cpu_flags_seen)
        if native:
            return "bf16", f"auto: bf16, this CPU computes bf16 natively ({', '.join(native)})"
        return "fp32", "auto: fp32, this CPU has no native bf16"
    if name == "fp16" and device.type != "cuda":
        raise DeviceError("precision 'fp16' needs CUDA; use 'fp32' or 'bf16' on the CPU (BDI_PRECISION)")
    return name, f"BDI_PRECISION={name}"


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


class FeatureExtractor:
    """A registered backbone as a feature extractor: BGR images → ``(B, Ht*Wt, D)`` float32 patch features.

    Build one per process (server lifespan / pipeline main) and share it; ``extract`` is thread-safe.
    ``cfg`` may leave blocks, input size and neighbourhood unset: the backbone's defaults fill them.
    """

    def __init__(self, cfg: FeatureConfig, *, cache_dir: Path, cpu_flags_seen: Iterable[str] | None = None) -> None:
        cfg = cfg.resolved()
        self._cfg = cfg
        self._spec = backbone_spec(cfg.backbone)
        self._device = _resolve_device(cfg.device)
        # cpu_flags_seen: the CPU flags ``auto`` decides on (None: this machine's /proc/cpuinfo)
        self._precision, self._precision_reason = resolve_precision(cfg.precision, self._device,
                                                                    cpu_flags_seen=cpu_flags_seen)
        self._weights = resolve_weights(cfg, cache_dir=cache_dir)
        self._net = build_feature_net(cfg, weights=self._weights).to(self._device)
        assert cfg.input_size is not None
        self._input_size: int = cfg.input_size
        with torch.inference_mode():  # one dry pass: the grid and width follow from the network itself
            probe = self._net(torch.zeros(1, 3, cfg.input_size, cfg.input_size, device=self._device))
        self._depth = len(self._net.vit.blocks) if isinstance(self._net, VitPatchFeatures) else None
        side = round(float(np.sqrt(probe.shape[1])))
        self._grid = (side, side)
        self._embed_dim = int(probe.shape[2])
        self._lock = threading.Lock()
        self._runtime: ForwardRuntime | None = None  # None: the torch net (see use_runtime)
        self._map_offset: Offset | None = None  # measured on first use (map_offset)

    def map_offset(self) -> Offset:
        """Where this net's patch features sit from their cells' centres, (down, right) input px
        (``bdi.patchcore.alignment``): measured once, with the fp32 torch net, so every runtime agrees; (0, 0) for a
        ViT, whose tokens are their patches."""
        if self._map_offset is None:
            self._map_offset = NO_OFFSET if self._spec.family == "vit" else measure_map_offset(
                lambda images: self.forward_torch(self.prepare(images)[0], precision="fp32"),
                input_size=self._input_size, grid=self._grid)
        return self._map_offset

    # ------------------------------------------------------------------ properties

    @property
    def config(self) -> FeatureConfig:
        """The resolved config (no unset fields)."""
        return self._cfg

    @property
    def spec(self) -> BackboneSpec:
        return self._spec

    @property
    def net(self) -> nn.Module:
        """The frozen ``nn.Module``: normalised ``(B, 3, S, S)`` float32 → ``(B, Ht*Wt, D)`` features."""
        return self._net

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
    def precision_reason(self) -> str:
        """Why :attr:`precision` was chosen (``BDI_PRECISION=auto``: the device and the CPU's native bf16)."""
        return self._precision_reason

    @property
    def grid(self) -> tuple[int, int]:
        """``(Ht, Wt)``: ``input_size`` over the stride of the finest feature block."""
        return self._grid

    @property
    def num_tokens(self) -> int:
        return self._grid[0] * self._grid[1]

    @property
    def embed_dim(self) -> int:
        """Feature width D (1152 for ViT-S and 3 blocks; 152 for EfficientNet-Lite0 blocks 2 and 4)."""
        return self._embed_dim

    @property
    def stride(self) -> int:
        """Input pixels per feature cell (14 for ViT-S/14)."""
        return self._input_size // self._grid[0]

    def signature(self) -> dict[str, Any]:
        """What must be equal for two feature sets to be comparable (stored with every memory)."""
        return {
            "backbone": self._cfg.backbone,
            "input_size": self._cfg.input_size,
            "blocks": list(self._cfg.blocks or ()),
            "neighbourhood": self._cfg.neighbourhood,
            "depth": self._depth,
            "embed_dim": self._embed_dim,
            "weights": self._weights.name,
            "weights_sha256": self._weights.sha256,
        }

    def describe(self) -> dict[str, Any]:
        """What decides the features, for manifests, MLflow params and ``/health``."""
        return {
            "backbone": self._cfg.backbone,
            "family": self._spec.family,
            "input_size": self._cfg.input_size,
            "blocks": list(self._cfg.blocks or ()),
            "neighbourhood": self._cfg.neighbourhood,
            "intensity": self._cfg.intensity,
            "depth": self._depth,
            "stride": self.stride,
            "grid": list(self._grid),
            "embed_dim": self._embed_dim,
            "device": self.device,
            "precision": getattr(self._runtime, "precision", self._precision),  # what runs, not what was asked
            "runtime": self.runtime,
            "weights": self._weights.to_dict(),
        }

    # ------------------------------------------------------------------ extraction

    def _autocast(self, precision: str) -> AbstractContextManager[Any]:
        if precision == "fp16":
            return torch.autocast(device_type=self._device.type, dtype=torch.float16)
        if precision == "bf16":
            return torch.autocast(device_type=self._device.type, dtype=torch.bfloat16)
        return nullcontext()

    @property
    def runtime(self) -> str:
        """What runs the net: ``torch``, or the name of the runtime set by :meth:`use_runtime`."""
        runtime = self._runtime
        return "torch" if runtime is None else runtime.name

    def use_runtime(self, runtime: ForwardRuntime | None) -> None:
        """Run the net with ``runtime`` from now on (``None``: back to torch). The caller has checked that
        it gives the torch features (``bdi.runtime.parity``); the signature is unchanged, so memories stay valid."""
        with self._lock:
            self._runtime = runtime

    def forward_torch(self, batch: np.ndarray, *, precision: str | None = None) -> np.ndarray:
        """The torch net on ``(B, 3, S, S)`` float32 normalised → ``(B, Ht*Wt, D)`` float32, whatever runtime is set,
        at ``precision`` (default: the configured one; ``fp32`` is the parity check's reference)."""
        with self._lock:
            return self._torch_forward(batch, precision or self._precision)

    def _torch_forward(self, batch: np.ndarray, precision: str) -> np.ndarray:
        """:meth:`forward_torch` for a caller that holds the lock (or has the extractor to itself)."""
        x = torch.from_numpy(batch).to(self._device, non_blocking=True)
        with torch.inference_mode(), self._autocast(precision):
            result = self._net(x).float().cpu().numpy()
        return np.ascontiguousarray(result, dtype=np.float32)

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        """``(B, 3, S, S)`` float32 normalised → ``(B, Ht*Wt, D)`` float32, on the runtime in use."""
        runtime = self._runtime
        if runtime is None:
            return self.forward_torch(batch)
        with self._lock:  # one forward at a time per process, as on torch (an OpenVINO request is not reentrant)
            result = runtime.run(batch)
        return np.ascontiguousarray(result, dtype=np.float32)

    def prepare(
        self, images: Sequence[np.ndarray], *, clock: StageClock = _no_clock, intensity: Intensity | None = None
    ) -> tuple[np.ndarray, tuple[Letterbox, ...]]:
        """Letterbox and normalise BGR images: the ``(B, 3, S, S)`` float32 batch the net takes, and the boxes.

        ``intensity`` (default: the config's) ``standardize`` sets each canvas's grey levels to a fixed mean and
        spread (:func:`~bdi.patchcore.imaging.standardize_intensity`, timed as part of ``normalise``); a scorer
        passes its memory's (``bdi.patchcore.memory.fitted_intensity``)."""
        standardize = (intensity or self._cfg.intensity) == "standardize"
        boxes: list[Letterbox] = []
        canvases: list[np.ndarray] = []
        with clock("letterbox"):
            for image in images:
                canvas, box = letterbox(image, self._input_size)
                canvases.append(canvas)
                boxes.append(box)
        with clock("normalise"):
            if standardize:
                canvases = [standardize_intensity(canvas, box) for canvas, box in zip(canvases, boxes, strict=True)]
            batch = normalize_imagenet(canvases[0][None] if len(canvases) == 1 else np.stack(canvases))
        return batch, tuple(boxes)

    def _extract_chunk(self, images: Sequence[np.ndarray], *, clock: StageClock = _no_clock,
                       intensity: Intensity | None = None) -> FeatureBatch:
        batch, boxes = self.prepare(images, clock=clock, intensity=intensity)
        with clock("forward"):
            embeddings = self._forward(batch)
        return FeatureBatch(embeddings=embeddings, grid=self._grid, letterboxes=boxes)

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

    def iter_extract(self, images: Iterable[np.ndarray], *, clock: StageClock = _no_clock,
                     intensity: Intensity | None = None) -> Iterator[FeatureBatch]:
        """Stream features of many images, one ``FeatureBatch`` per ``cfg.batch_size`` images.

        ``clock(stage)`` times ``letterbox``, ``normalise`` and ``forward`` (``StageTimer().stage``); ``intensity``
        as :meth:`prepare`.
        """
        if isinstance(images, np.ndarray) and images.ndim != 4:
            raise InvalidInputError(
                f"pass a sequence of (H, W, 3) images or a (B, H, W, 3) array, got shape {images.shape}"
            )
        chunk: list[np.ndarray] = []
        for image in images:
            chunk.append(image)
            if len(chunk) == self._cfg.batch_size:
                yield self._extract_chunk(chunk, clock=clock, intensity=intensity)
                chunk = []
        if chunk:
            yield self._extract_chunk(chunk, clock=clock, intensity=intensity)


class TorchRunner:
    """The extractor's own torch net at a fixed ``precision``, as a :class:`ForwardRuntime`: what the runtime
    choice attaches when reduced precision (``bf16``/``fp16`` autocast) passed the parity check, or ``fp32`` when
    it did not. ``run`` is called under the extractor's lock (``FeatureExtractor._forward``)."""

    def __init__(self, extractor: FeatureExtractor, precision: str) -> None:
        self._extractor = extractor
        self.precision = precision

    @property
    def name(self) -> str:
        return "torch"

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self._extractor._torch_forward(batch, self.precision)

    def describe(self) -> dict[str, Any]:
        return {"device": self._extractor.device, "precision": self.precision}
