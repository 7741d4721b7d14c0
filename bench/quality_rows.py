"""The detectors the quality benchmark puts side by side, behind one small interface.

* :class:`BdiDetector`: BDI itself, only through the public library API (``InspectionService`` built from
  ``Settings(model={"features": {"backbone": ..., "weights": ...}})``; every other setting is the library's default).
* :class:`AnomalibDetector`: anomalib's PatchCore torch model (``PatchcoreModel``) driven directly, with a
  timm backbone that carries given weights (anomalib's custom-``nn.Module`` path, torchvision FX).
* :class:`PixelKnnDetector`: a raw-pixel patch-kNN baseline (no network): the pixels of each cell of the
  letterboxed image are its feature, Euclidean 1-NN against a coreset of the training cells.

Each one fits on decoded images, scores images (an image score and an anomaly map at the image's size),
sets its threshold with BDI's calibration rule, and runs one ``/infer``-equivalent call on encoded bytes.
"""

from __future__ import annotations

import importlib
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np
import torch

from bdi.config import CalibrationConfig, Precision, RuntimeName, ScoringConfig, Settings
from bdi.patchcore.calibration import choose_threshold, resolved_percentile
from bdi.patchcore.coreset import coreset_size, greedy_k_center
from bdi.patchcore.imaging import IMAGENET_MEAN, IMAGENET_STD, decode_image, letterbox
from bdi.patchcore.inference import distance_map, gaussian_blur, masked_score
from bdi.patchcore.knn import FAISS_AVAILABLE, KnnIndex
from bdi.refs import ModelRef
from bdi.service import InspectionService
from bench.overrides import ModelOverrides, with_overrides

REF = ModelRef.create(recipe_id="default", role_id="Inspection", roi_id="inspection-1", model_key=None)
MM_PER_PX = 0.2  # any valid scale: /infer needs one; it changes region areas only, never scores
BATCH = 8


@dataclass(frozen=True)
class FitTimes:
    """Wall times of one fit, in seconds, and the memory it built."""

    features_s: float
    coreset_s: float
    other_s: float  # index, save
    n_patches: int
    memory_size: int

    @property
    def total_s(self) -> float:
        return self.features_s + self.coreset_s + self.other_s


@dataclass(frozen=True)
class Scored:
    score: float
    anomaly_map: np.ndarray  # (H, W) float, the image's size


class Detector(Protocol):
    name: str
    label: str

    def describe(self) -> dict[str, Any]: ...

    def fit(self, images: Sequence[np.ndarray]) -> FitTimes: ...

    def score(self, images: Sequence[np.ndarray]) -> list[Scored]: ...

    def calibrate(self, ok_scores: Sequence[float], ng_scores: Sequence[float]) -> float: ...

    def infer_once(self, data: bytes) -> float: ...


def bdi_threshold(ok_scores: Sequence[float], ng_scores: Sequence[float], settings: Settings) -> float:
    """BDI's calibration rule (``bdi.patchcore.calibration.choose_threshold``) with the library's default config."""
    cfg: CalibrationConfig = settings.calibration
    choice = choose_threshold(list(ok_scores), list(ng_scores) or None,
                              score_percentile=resolved_percentile(settings.model.scoring), cfg=cfg)
    return float(choice.threshold)


# --------------------------------------------------------------------------------------------- BDI


class BdiDetector:
    """BDI through ``InspectionService``: ``fit_images``, ``score_images``, ``calibrate_from_scores``, ``infer``."""

    def __init__(self, *, name: str, label: str, backbone: str, weights: str, work: Path,
                 runtime: RuntimeName = "auto", precision: Precision = "auto",
                 model_overrides: ModelOverrides | None = None) -> None:
        self.name = name
        self.label = label
        model = with_overrides({"features": {"backbone": backbone, "weights": weights, "device": "cpu",
                                             "precision": precision}}, model_overrides or {})
        self.settings = Settings(model=model, models_dir=work / name, runtime=runtime)
        self.service = InspectionService.from_settings(self.settings)
        self._threshold_set = False

    def describe(self) -> dict[str, Any]:
        features = self.service.extractor.describe()
        scoring = self.settings.model.scoring
        memory = self.settings.model.memory
        return {
            "implementation": "bdi.service.InspectionService",
            "backbone": features["backbone"],
            "weights": features["weights"]["name"],
            "weights_sha256": features["weights"]["sha256"],
            "input_size": features["input_size"],
            "preprocessing": "letterbox (aspect kept), ImageNet normalisation",
            "layers": [f"blocks.{b}" for b in features["blocks"]],
            "neighbourhood": features["neighbourhood"],
            "embed_dim": features["embed_dim"],
            "grid": features["grid"],
            "coreset_rate": memory.coreset_rate,
            "coreset_projection_dim": memory.projection_dim,
            "knn": f"faiss {memory.knn_index}, 1-NN on "
                   + ("L2-normalised features" if self.service.extractor.spec.l2_normalize else "raw features"),
            "scoring": asdict(scoring),
            "runtime": self.service.runtime.health()["runtime"],
            "precision": self.service.runtime.health()["runtime_precision"],
            "precision_choice": self.service.precision_choice(),
        }

    def fit(self, images: Sequence[np.ndarray]) -> FitTimes:
        result = self.service.fit_images(ref=REF, mm_per_px=MM_PER_PX, images=images)
        t = result.timings_ms
        return FitTimes(features_s=t.get("encode", 0.0) / 1e3, coreset_s=t.get("coreset", 0.0) / 1e3,
                        other_s=(t.get("align", 0.0) + t.get("index", 0.0) + t.get("save", 0.0)) / 1e3,
                        n_patches=result.n_embeddings, memory_size=result.coreset_size)

    def _scoring(self) -> ScoringConfig | None:
        """The calibration's scoring once calibrated; the settings' before (None)."""
        return self.service.model(REF).scoring if self._threshold_set else None

    def score(self, images: Sequence[np.ndarray]) -> list[Scored]:
        results = self.service.score_images(ref=REF, images=images, scoring=self._scoring())
        return [Scored(score=float(r.score), anomaly_map=r.anomaly_map) for r in results]

    def calibrate(self, ok_scores: Sequence[float], ng_scores: Sequence[float]) -> float:
        calib = self.service.calibrate_from_scores(ref=REF, ok_scores=list(ok_scores),
                                                   ng_scores=list(ng_scores) or None, mm_per_px=MM_PER_PX)
        self._threshold_set = True
        return calib.threshold

    def infer_once(self, data: bytes) -> float:
        return float(self.service.infer(ref=REF, mm_per_px=MM_PER_PX, image=data).result.score)


# --------------------------------------------------------------------------------------------- anomalib


def anomalib_version() -> str | None:
    """The installed anomalib version, None when it is not installed (``pip install -e '.[bench]'``)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("anomalib")
    except PackageNotFoundError:
        return None


def timm_backbone_with_weights(backbone: str, weights_path: Path) -> torch.nn.Module:
    """A timm ``backbone`` with its ImageNet head, carrying the file's weights (mapped by ``convert_by_order``)."""
    import timm

    from bdi.patchcore.weights import convert_by_order, load_state_dict_file

    model = timm.create_model(backbone, pretrained=False)
    state = convert_by_order(load_state_dict_file(weights_path), model, source=str(weights_path))
    model.load_state_dict(state, strict=True)
    return model.eval()


class AnomalibDetector:
    """anomalib 2.x ``PatchcoreModel`` on a given timm backbone; anomalib's own pre-processing and scoring.

    Pre-processing as anomalib's PatchCore ``PreProcessor``: resize to ``input_size``² (antialiased, aspect not
    kept), ImageNet normalisation. Scores: ``PatchcoreModel``'s (the paper's re-weighted max over patches,
    ``num_neighbors=9``); maps: its nearest-upsampled, σ=4 blurred map, resized back to the image (bilinear).
    """

    def __init__(self, *, name: str, label: str, backbone: str, weights_path: Path, weights_name: str,
                 input_size: int, layers: Sequence[str], coreset_ratio: float, settings: Settings) -> None:
        with warnings.catch_warnings():  # its import warns about optional packages it does not need here
            warnings.simplefilter("ignore")
            # Any: typed the same whether or not anomalib (an optional extra) is installed where mypy runs
            torch_model: Any = importlib.import_module("anomalib.models.image.patchcore.torch_model")

        self.name = name
        self.label = label
        self.settings = settings
        self.input_size = input_size
        self.coreset_ratio = coreset_ratio
        self._backbone_name = backbone
        self._weights_name = weights_name
        network = timm_backbone_with_weights(backbone, weights_path)
        self.model: Any = torch_model.PatchcoreModel(layers=list(layers), backbone=network, pre_trained=False)
        self.max_weight_diff = self._check_weights(network)

    def _check_weights(self, network: Any) -> float:
        """Largest |difference| between anomalib's first feature map and the weighted network's own: 0 = same."""
        x = torch.randn(1, 3, self.input_size, self.input_size, generator=torch.Generator().manual_seed(0))
        first = str(self.model.layers[0])
        with torch.no_grad():
            theirs = self.model.feature_extractor(x)[first]
            ours = network.bn1(network.conv_stem(x))
            for i in range(int(first.split(".")[-1]) + 1):
                ours = network.blocks[i](ours)
        return float((theirs - ours).abs().max())

    def describe(self) -> dict[str, Any]:
        import inspect

        generator = importlib.import_module("anomalib.models.image.patchcore.anomaly_map").AnomalyMapGenerator
        sigma = inspect.signature(generator).parameters["sigma"].default
        return {
            "implementation": f"anomalib {anomalib_version()} PatchcoreModel (torch model, driven directly)",
            "backbone": self._backbone_name,
            "weights": self._weights_name,
            "weights_check_max_abs_diff": self.max_weight_diff,
            "input_size": self.input_size,
            "preprocessing": "resize to input_size² (antialias, aspect not kept), ImageNet normalisation",
            "layers": list(self.model.layers),
            "neighbourhood": _plain(self.model.feature_pooler.kernel_size),
            "coreset_rate": self.coreset_ratio,
            "knn": f"torch brute force, 1-NN, score re-weighted over {self.model.num_neighbors} neighbours",
            "scoring": {"blur_sigma": sigma, "score": "re-weighted max patch distance"},
        }

    def _tensor(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as TF  # noqa: N812

        batch = []
        for image in images:
            rgb = torch.from_numpy(np.ascontiguousarray(image[:, :, ::-1])).permute(2, 0, 1).float() / 255.0
            resized = TF.resize(rgb, [self.input_size, self.input_size], antialias=True)
            batch.append(TF.normalize(resized, mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD)))
        return torch.stack(batch)

    def fit(self, images: Sequence[np.ndarray]) -> FitTimes:
        self.model.train()
        start = time.perf_counter()
        for i in range(0, len(images), BATCH):
            self.model(self._tensor(images[i:i + BATCH]))
        features_s = time.perf_counter() - start
        n_patches = sum(int(e.shape[0]) for e in self.model.embedding_store)
        torch.manual_seed(0)  # KCenterGreedy draws its first centre from torch's global RNG
        start = time.perf_counter()
        self.model.subsample_embedding(self.coreset_ratio)
        coreset_s = time.perf_counter() - start
        self.model.eval()
        return FitTimes(features_s=features_s, coreset_s=coreset_s, other_s=0.0, n_patches=n_patches,
                        memory_size=int(self.model.memory_bank.shape[0]))

    def _run(self, images: Sequence[np.ndarray]) -> list[Scored]:
        with torch.no_grad():
            out = self.model(self._tensor(images))
        scored = []
        for image, score, amap in zip(images, out.pred_score, out.anomaly_map, strict=True):
            full = cv2.resize(amap.squeeze().numpy().astype(np.float32), (image.shape[1], image.shape[0]),
                              interpolation=cv2.INTER_LINEAR)
            scored.append(Scored(score=float(score), anomaly_map=full))
        return scored

    def score(self, images: Sequence[np.ndarray]) -> list[Scored]:
        return [s for i in range(0, len(images), BATCH) for s in self._run(images[i:i + BATCH])]

    def calibrate(self, ok_scores: Sequence[float], ng_scores: Sequence[float]) -> float:
        return bdi_threshold(ok_scores, ng_scores, self.settings)

    def infer_once(self, data: bytes) -> float:
        return self._run([decode_image(data)])[0].score


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------- raw pixels


class PixelKnnDetector:
    """Raw-pixel patch-kNN: each ``cell``×``cell`` cell of the letterboxed RGB image (values in [0, 1], not
    normalised) is a feature; greedy coreset (``bdi.patchcore.coreset``), Euclidean 1-NN
    (``bdi.patchcore.knn``), then BDI's map
    and score (``bdi.patchcore.inference``: un-letterbox, blur, percentile) with the given scoring config."""

    def __init__(self, *, name: str, label: str, input_size: int, cell: int, coreset_rate: float,
                 settings: Settings, scoring: ScoringConfig) -> None:
        if input_size % cell:
            raise ValueError(f"input_size {input_size} is not a multiple of the cell size {cell}")
        self.name = name
        self.label = label
        self.input_size = input_size
        self.cell = cell
        self.coreset_rate = coreset_rate
        self.settings = settings
        self.scoring = scoring
        self.grid = (input_size // cell, input_size // cell)
        self.index: KnnIndex | None = None
        self._memory = settings.model.memory  # resolved: seed and coreset projection as the CNN row's

    def describe(self) -> dict[str, Any]:
        return {
            "implementation": "bench.quality_rows.PixelKnnDetector (no network)",
            "backbone": None,
            "weights": None,
            "input_size": self.input_size,
            "preprocessing": "letterbox (aspect kept), RGB / 255",
            "layers": [f"raw {self.cell}x{self.cell}x3 pixel cells"],
            "embed_dim": self.cell * self.cell * 3,
            "grid": list(self.grid),
            "coreset_rate": self.coreset_rate,
            "coreset_projection_dim": self._memory.projection_dim,
            "knn": "faiss Flat, 1-NN on raw (not normalised) cells",
            "scoring": asdict(self.scoring),
        }

    def _cells(self, image: np.ndarray) -> tuple[np.ndarray, Any]:
        canvas, box = letterbox(image, self.input_size)
        g, c = self.grid[0], self.cell
        x = canvas.astype(np.float32) / 255.0
        cells = x.reshape(g, c, g, c, 3).transpose(0, 2, 1, 3, 4).reshape(g * g, c * c * 3)
        return np.ascontiguousarray(cells), box

    def fit(self, images: Sequence[np.ndarray]) -> FitTimes:
        start = time.perf_counter()
        rows = np.concatenate([self._cells(image)[0] for image in images])
        features_s = time.perf_counter() - start
        start = time.perf_counter()
        size = coreset_size(rows.shape[0], self.coreset_rate)
        assert self._memory.projection_dim is not None
        selected = greedy_k_center(rows, size=size, seed=self._memory.seed, projection_dim=self._memory.projection_dim)
        coreset_s = time.perf_counter() - start
        start = time.perf_counter()
        self.index = KnnIndex.build(rows[selected], factory="Flat", use_faiss=FAISS_AVAILABLE)
        return FitTimes(features_s=features_s, coreset_s=coreset_s, other_s=time.perf_counter() - start,
                        n_patches=int(rows.shape[0]), memory_size=int(size))

    def _score_one(self, image: np.ndarray) -> Scored:
        assert self.index is not None, "fit first"
        cells, box = self._cells(image)
        squared, _ = self.index.search(cells, k=1)
        distances = np.sqrt(np.maximum(squared[:, 0], 0.0)).astype(np.float32)
        assert self.scoring.blur_sigma is not None and self.scoring.score_percentile is not None
        amap = gaussian_blur(distance_map(distances, grid=self.grid, letterbox=box,
                                          remove_letterbox=self.scoring.remove_letterbox), self.scoring.blur_sigma)
        full = np.full(amap.shape, 255, dtype=np.uint8)
        return Scored(score=masked_score(amap, full, self.scoring.score_percentile), anomaly_map=amap)

    def score(self, images: Sequence[np.ndarray]) -> list[Scored]:
        return [self._score_one(image) for image in images]

    def calibrate(self, ok_scores: Sequence[float], ng_scores: Sequence[float]) -> float:
        return bdi_threshold(ok_scores, ng_scores, self.settings)

    def infer_once(self, data: bytes) -> float:
        return self._score_one(decode_image(data)).score
