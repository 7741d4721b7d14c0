"""Scoring probes on the calibration half: ``python -m bench.scoring_probe --data ../shared/data/magnetic_tile``
(issue 29 "Make the detector better", scoring and ensembles).

What the library does not offer as a setting is probed here before it earns one: the default model (the pretrained
CNN, ``bdi.backbones.PRETRAINED_CNN``) is fitted once on train/good, and the calib half is scored with each patch
distance rule in turn, swapped in for ``bdi.patchcore.inference.patch_distances`` (the rest of the path, map, blur
and image score, is the library's):

* ``nearest``: the library's rule, the distance to the nearest memory row;
* ``mean-knn:k``: the mean distance to the k nearest rows;
* ``local-density:k``: the nearest distance divided by that row's mean distance to its own k nearest rows in the
  memory (a local-outlier-factor-like normalisation: a query near a sparse part of the memory counts less);
* ``reweighted:b``: PatchCore's re-weighting applied per patch, ``(1 - softmax weight) · distance`` over the nearest
  row and its b neighbours in the memory.

For the library's rule it also says where each map peaks (the image score is the blurred map's maximum): inside
the defect's mask, or on the crop's outermost pixel row or column; and it prints pixel AUROC per defect class
(that class's images with the good ones) and the share of the class's pixels inside its masks: which class the
pooled pixel AUROC rests on.

``--ensemble`` also fits ``efficientnet_lite0`` and averages the two models' image scores, each divided by its median
over the half (score averaging of the pip-installed CNNs). Figures on the calib half only; nothing is written.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import bdi.patchcore.inference as inference
from bdi.backbones import EFFICIENTNET_LITE0, PRETRAINED_CNN
from bdi.config import Settings
from bdi.data.metrics import aupro, image_auroc, pixel_auroc
from bdi.patchcore.knn import KnnIndex
from bdi.patchcore.memory import l2_normalize
from bdi.service import InspectionService
from bench.quality_data import Sample, load_mvtec
from bench.quality_rows import MM_PER_PX, REF

DistanceRule = Callable[[KnnIndex, np.ndarray, np.ndarray], np.ndarray]
RULES = ("nearest", "mean-knn:3", "local-density:5", "local-density:20", "reweighted:9")


class MemoryNeighbours:
    """Each memory row's k nearest other rows (and their distances), computed once per index."""

    def __init__(self) -> None:
        self._cache: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def __call__(self, index: KnnIndex, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        key = (id(index), k)
        if key not in self._cache:
            rows = index._faiss_index.reconstruct_n(0, index.size)
            squared, ids = index.search(rows, k=k + 1)
            self._cache[key] = rows, np.sqrt(np.maximum(squared[:, 1:], 0.0)), ids[:, 1:]
        return self._cache[key]


def distances_by(rule: str, neighbours: MemoryNeighbours) -> Callable[..., np.ndarray]:
    """A drop-in for ``patch_distances`` applying ``rule``."""
    original = inference.patch_distances
    name, _, arg = rule.partition(":")
    k = int(arg or 1)

    def patched(index: KnnIndex, embeddings: np.ndarray, *, normalize: bool = True) -> np.ndarray:
        if name == "nearest":
            return original(index, embeddings, normalize=normalize)
        queries = l2_normalize(embeddings) if normalize else np.ascontiguousarray(embeddings, dtype=np.float32)
        squared, ids = index.search(queries, k=k)
        d = np.sqrt(np.maximum(squared, 0.0))
        out: np.ndarray
        if name == "mean-knn":
            out = d.mean(axis=1)
        elif name == "local-density":
            _, row_d, _ = neighbours(index, k)
            out = d[:, 0] / (row_d[ids[:, 0]].mean(axis=1) + 1e-6)
        elif name == "reweighted":
            rows, _, row_ids = neighbours(index, k)
            around = np.linalg.norm(queries[:, None, :] - rows[row_ids[ids[:, 0]]], axis=2)
            weights = 1.0 - np.exp(d[:, 0]) / np.exp(np.concatenate([d[:, :1], around], axis=1)).sum(axis=1)
            out = weights * d[:, 0]
        else:
            raise ValueError(f"unknown rule {rule!r}")
        return out.astype(np.float32)

    return patched


def pixel_auroc_per_class(samples: Sequence[Sample], maps: Sequence[np.ndarray]) -> dict[str, tuple[float, float]]:
    """Per defect class: pixel AUROC over its images and the good ones, and the share of its pixels in its masks."""
    out: dict[str, tuple[float, float]] = {}
    for name in sorted({s.defect_class for s in samples} - {"good"}):
        idx = [i for i, s in enumerate(samples) if s.defect_class in (name, "good")]
        auroc = pixel_auroc([maps[i] for i in idx], [samples[i].mask for i in idx])
        shares = [float(np.mean(s.mask)) for s in samples if s.defect_class == name and s.mask is not None]
        out[name] = (float("nan") if auroc is None else auroc, float(np.mean(shares)) if shares else float("nan"))
    return out


def peak_places(samples: Sequence[Sample], maps: Sequence[np.ndarray]) -> dict[str, int]:
    """How many maps peak inside the defect's mask, and how many on the crop's outermost rows or columns."""
    out = {"ok": 0, "ng": 0, "ng_in_mask": 0, "ok_on_border": 0, "ng_on_border": 0}
    for sample, anomaly_map in zip(samples, maps, strict=True):
        y, x = np.unravel_index(int(np.argmax(anomaly_map)), anomaly_map.shape)
        on_border = min(y, x, anomaly_map.shape[0] - 1 - y, anomaly_map.shape[1] - 1 - x) == 0
        kind = "ng" if sample.label else "ok"
        out[kind] += 1
        out[f"{kind}_on_border"] += int(on_border)
        out["ng_in_mask"] += int(bool(sample.label and sample.mask is not None and sample.mask[y, x]))
    return out


def fitted(backbone: str, train: Sequence[np.ndarray], work: Path) -> InspectionService:
    settings = Settings(model={"features": {"backbone": backbone, "weights": "official", "device": "cpu"}},
                        models_dir=work / backbone)
    service = InspectionService.from_settings(settings)
    service.fit_images(ref=REF, mm_per_px=MM_PER_PX, images=train)
    return service


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scoring_probe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="MVTec-layout folder")
    parser.add_argument("--rules", default=",".join(RULES))
    parser.add_argument("--ensemble", action="store_true")
    args = parser.parse_args(argv)
    data = load_mvtec(args.data.name, args.data)
    labels = np.asarray([s.label for s in data.calib])
    images, masks = [s.image for s in data.calib], [s.mask for s in data.calib]
    neighbours = MemoryNeighbours()
    original = inference.patch_distances
    rows: list[dict[str, Any]] = []
    per_class: dict[str, tuple[float, float]] = {}
    peaks: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="bdi-scoring-probe-") as tmp:
        service = fitted(PRETRAINED_CNN, [s.image for s in data.train], Path(tmp))
        scores: dict[str, np.ndarray] = {}
        try:
            for rule in args.rules.split(","):
                inference.patch_distances = distances_by(rule, neighbours)
                results = service.score_images(ref=REF, images=images)
                maps = [r.anomaly_map for r in results]
                scores[rule] = np.asarray([r.score for r in results])
                rows.append({"probe": rule, "image_auroc": image_auroc(labels, scores[rule]),
                             "pixel_auroc": pixel_auroc(maps, masks), "aupro": aupro(maps, masks)})
                print(json.dumps(rows[-1]), flush=True)
                if rule == "nearest":
                    per_class = pixel_auroc_per_class(data.calib, maps)
                    peaks = peak_places(data.calib, maps)
        finally:
            inference.patch_distances = original
        if args.ensemble:
            other = fitted(EFFICIENTNET_LITE0, [s.image for s in data.train], Path(tmp))
            lite0 = np.asarray([r.score for r in other.score_images(ref=REF, images=images)])
            base = scores.get("nearest", np.asarray([r.score for r in service.score_images(ref=REF, images=images)]))
            averaged = base / np.median(base) + lite0 / np.median(lite0)
            for name, s in ((EFFICIENTNET_LITE0, lite0), (f"{PRETRAINED_CNN} + {EFFICIENTNET_LITE0}", averaged)):
                rows.append({"probe": name, "image_auroc": image_auroc(labels, s)})
                print(json.dumps(rows[-1]), flush=True)
    if peaks:
        print(f"map peaks (nearest rule): inside the defect mask for {peaks['ng_in_mask']} of {peaks['ng']} NG "
              f"images; on the crop's border for {peaks['ok_on_border']} of {peaks['ok']} OK and "
              f"{peaks['ng_on_border']} of {peaks['ng']} NG images")
    if per_class:
        print("| defect class (calib half) | pixel AUROC (with the good images) | mask share |\n|---|---|---|")
        for name, (auroc, share) in per_class.items():
            print(f"| {name} | {auroc:.3f} | {share:.3f} |")
    print("| probe (calib half) | image AUROC | pixel AUROC | AUPRO |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['probe']} | {row['image_auroc']:.3f} | " + " | ".join(
            f"{row[k]:.3f}" if k in row else "–" for k in ("pixel_auroc", "aupro")) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
