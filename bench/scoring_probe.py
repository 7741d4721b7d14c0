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
from bench.quality_data import load_mvtec
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
    print("| probe (calib half) | image AUROC | pixel AUROC | AUPRO |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['probe']} | {row['image_auroc']:.3f} | " + " | ".join(
            f"{row[k]:.3f}" if k in row else "–" for k in ("pixel_auroc", "aupro")) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
