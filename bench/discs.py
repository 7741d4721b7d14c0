"""Disc benchmark, one command: ``python -m bench.discs`` (issue 29, "Discs, not only tiles").

For each seed it draws hard synthetic discs (``bdi.data.disc_scenes``: hub with bore and bolt holes, vent slots,
machined friction ring, lighting gradients, pose jitter, small defects next to holes and edges) and measures BDI
through ``bdi.service.InspectionService`` per ROI (``ring``, ``vents``, ``hub``): held-out good discs and discs with a
defect in that ROI, scored with the ROI's own ``shape`` (the annulus the GUI would send, about each disc's centre).
Two protocols (``--protocol``):

* ``crop`` (default): what the GUI does. ``/infer`` takes "the canonical ROI crop" (docs/contract.md) and each ROI
  has its own model, so per ROI a model is fitted on the good training discs' crops of that ROI
  (``HardDisc.roi_crop``: the annulus's bounding square) and scores the test discs' crops of it;
* ``whole``: one model fitted on the whole good discs scores the whole test discs with each ROI's mask (the
  protocol of the first disc figures; a hub or vent defect is then seen at the whole disc's scale).

The fit and the scoring get each crop's ROI shape, as ``/fit_ok`` from the dataset and ``/infer`` do, so
``--set memory.unwrap=annulus`` measures the library's polar view (``bdi.patchcore.polar``: the ring's and the vents'
annuli unwrapped into strips, the hub's small-bore annulus kept a crop).

It reports image AUROC and pixel AUROC (over the pixels inside the ROI) per ROI as mean ± sample standard deviation
over the seeds, with the worst seed, and writes ``bench/results/discs.{json,md}`` (``discs-quick.*`` with
``--quick``; ``--stem`` names other runs).

The detector is the library's default model with the pretrained CNN (``bdi.backbones.PRETRAINED_CNN``, its
official ImageNet weights) on torch; ``--set`` changes any ``model.*`` field for a before/after comparison, e.g.
``--set scoring.roi_erode_px=0``. BDI_* environment variables are ignored.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as bench.quality: sane timings on a shared CPU

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from bdi.backbones import PRETRAINED_CNN
from bdi.config import Settings
from bdi.data.disc_scenes import HARD_DEFECT_KINDS, ROIS, HardDisc, RoiCrop, make_hard_disc
from bdi.data.metrics import image_auroc, pixel_auroc
from bdi.patchcore.imaging import build_roi_mask
from bdi.patchcore.polar import VIEW_CROP
from bdi.refs import ModelRef
from bdi.service import InspectionService
from bench.overrides import ModelOverrides, parse_overrides, with_overrides

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
REF = ModelRef.create(recipe_id="discs", role_id="Inspection", roi_id="disc", model_key=None)
MM_PER_PX = 0.2  # any valid scale: it changes region areas only, never scores
FULL = {"seeds": (0, 1, 2), "size": 256, "n_train": 30, "n_test": 20}
QUICK = {"seeds": (0,), "size": 128, "n_train": 4, "n_test": 2}
RUNTIME_FACTS = ("runtime", "runtime_precision", "runtime_fallback")  # what ran the feature net (service.health())


@dataclass(frozen=True)
class DiscSplit:
    """One seed's discs: good training discs, and per ROI held-out good discs and discs with a defect there."""

    seed: int
    train: list[HardDisc]
    good: dict[str, list[HardDisc]]
    defective: dict[str, list[HardDisc]]


@dataclass(frozen=True)
class RoiMetrics:
    image_auroc: float | None
    pixel_auroc: float | None
    good_scores: list[float]
    defect_scores: list[float]
    view: str = VIEW_CROP  # what the ROI's model saw of its crops (bdi.patchcore.polar)


def draw_split(*, seed: int, size: int, n_train: int, n_test: int) -> DiscSplit:
    """The discs of one seed: ``n_train`` good, then per ROI ``n_test`` good and ``n_test`` defective (the
    defect kinds taking turns)."""
    rng = np.random.default_rng(seed)
    train = [make_hard_disc(size=size, rng=rng) for _ in range(n_train)]
    good = {roi: [make_hard_disc(size=size, rng=rng) for _ in range(n_test)] for roi in ROIS}
    defective = {roi: [make_hard_disc(size=size, defect=HARD_DEFECT_KINDS[i % len(HARD_DEFECT_KINDS)], roi=roi,
                                      rng=rng) for i in range(n_test)] for roi in ROIS}
    return DiscSplit(seed=seed, train=train, good=good, defective=defective)


PROTOCOLS = {  # --protocol: what each one fits and scores (the --help text and the results' line)
    "crop": "a model per ROI, fitted on and scoring the ROI's crops, as the GUI sends them",
    "whole": "one model on the whole discs, each ROI by its mask",
}
def roi_view(disc: HardDisc, roi: str, protocol: str) -> RoiCrop:
    """What the detector is sent of ``disc`` for ``roi``: its ROI crop, or the whole image, with the ROI's shape."""
    if protocol == "crop":
        return disc.roi_crop(roi)
    return RoiCrop(image=disc.image, mask=disc.mask, shape=disc.roi_shape(roi), origin=(0, 0))


def measure_roi(service: InspectionService, *, ref: ModelRef, good: Sequence[HardDisc],
                defective: Sequence[HardDisc], roi: str, protocol: str) -> RoiMetrics:
    """Score good and defective discs inside ``roi``: image AUROC, and pixel AUROC over the ROI's pixels."""
    views = [roi_view(d, roi, protocol) for d in [*good, *defective]]
    masks = [build_roi_mask(v.shape, width=v.image.shape[1], height=v.image.shape[0]) for v in views]
    results = service.score_images(ref=ref, images=[v.image for v in views], masks=masks,
                                   shapes=[v.shape for v in views])
    scores = [float(r.score) for r in results]
    labels = [0] * len(good) + [1] * len(defective)
    inside = [m > 0 for m in masks]
    maps = [r.anomaly_map[keep][None, :] for r, keep in zip(results, inside, strict=True)]
    truths = [(v.mask > 0)[keep][None, :] for v, keep in zip(views, inside, strict=True)]
    memory = service.store.load_memory(ref)
    view = str(memory.metadata.get("view", VIEW_CROP)) if memory is not None else VIEW_CROP
    return RoiMetrics(image_auroc=image_auroc(labels, scores), pixel_auroc=pixel_auroc(maps, truths),
                      good_scores=scores[: len(good)], defect_scores=scores[len(good):], view=view)


def build_service(*, work: Path, backbone: str, weights: str, model_overrides: ModelOverrides,
                  threads: int) -> InspectionService:
    model = with_overrides({"features": {"backbone": backbone, "weights": weights, "device": "cpu"}}, model_overrides)
    settings = Settings(model=model, models_dir=work, runtime="torch", threads=threads)
    return InspectionService.from_settings(settings)


def measure_seed(split: DiscSplit, service: InspectionService, *, protocol: str = "crop") -> dict[str, RoiMetrics]:
    """Fit on the split's good training discs (per ROI on its crops, or once on the whole images), then measure
    every ROI."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose from {tuple(PROTOCOLS)}")
    if protocol == "whole":
        service.fit_images(ref=REF, mm_per_px=MM_PER_PX, images=[d.image for d in split.train])
    metrics = {}
    for roi in ROIS:
        ref = REF
        if protocol != "whole":
            ref = ModelRef.create(recipe_id="discs", role_id="Inspection", roi_id=roi, model_key=None)
            crops = [roi_view(d, roi, protocol) for d in split.train]
            service.fit_images(ref=ref, mm_per_px=MM_PER_PX, images=[c.image for c in crops],
                               shapes=[c.shape for c in crops])
        metrics[roi] = measure_roi(service, ref=ref, good=split.good[roi], defective=split.defective[roi], roi=roi,
                                   protocol=protocol)
    return metrics


def summarise(values: Sequence[float | None]) -> dict[str, float | None]:
    """Mean, sample standard deviation (0 for one value) and minimum of the measured values."""
    measured = [v for v in values if v is not None]
    if not measured:
        return {"mean": None, "std": None, "min": None}
    std = statistics.stdev(measured) if len(measured) > 1 else 0.0
    return {"mean": statistics.fmean(measured), "std": std, "min": min(measured)}


def _cell(summary: dict[str, float | None]) -> str:
    if summary["mean"] is None:
        return "n/a"
    return f"{summary['mean']:.3f} ± {summary['std']:.3f} (min {summary['min']:.3f})"


def markdown(results: dict[str, Any]) -> str:
    params = results["params"]
    protocol = params.get("protocol", "whole")  # results written before --protocol existed were all "whole"
    lines = [
        "# Disc benchmark",
        "",
        f"`{results['command']}`, {results['finished_utc']}, {results['wall_s']:.0f} s wall, "
        f"{params['threads']} thread(s). Seeds {', '.join(map(str, params['seeds']))}; per seed "
        f"{params['n_train']} good training discs of {params['size']} px, and per ROI {params['n_test']} good "
        f"and {params['n_test']} defective held-out discs ({', '.join(HARD_DEFECT_KINDS)} in turn). "
        f"Protocol `{protocol}` ({PROTOCOLS[protocol]}). "
        f"Model: `{params['backbone']}` ({params['weights']} weights), "
        f"model overrides {params['model_overrides'] or 'none'}; feature net on "
        f"{params['runtime'].get('runtime')} {params['runtime'].get('runtime_precision')}.",
        "",
        "| ROI | seen as | image AUROC (mean ± sd, worst seed) | pixel AUROC in the ROI (mean ± sd, worst seed) |",
        "|---|---|---|---|",
    ]
    for roi in ROIS:
        row = results["rois"][roi]
        views = sorted({seed[roi].get("view", VIEW_CROP) for seed in results["per_seed"].values()})
        lines.append(f"| {roi} | {', '.join(views)} | {_cell(row['image_auroc'])} | {_cell(row['pixel_auroc'])} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="one seed, 4 small training discs, 2 per class")
    parser.add_argument("--seeds", type=lambda s: tuple(int(v) for v in s.split(",")), default=None)
    parser.add_argument("--size", type=int, default=None, help="disc image side in px")
    parser.add_argument("--n-train", type=int, default=None, help="good training discs per seed")
    parser.add_argument("--n-test", type=int, default=None, help="held-out good and defective discs per ROI")
    parser.add_argument("--backbone", default=PRETRAINED_CNN)
    parser.add_argument("--weights", default="official")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="a model.* setting, e.g. scoring.blur_sigma=8 (repeatable)")
    parser.add_argument("--protocol", choices=tuple(PROTOCOLS), default="crop",
                        help="; ".join(f"{name}: {what}" for name, what in PROTOCOLS.items()) + " (default crop)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--stem", default=None, help="output file stem (default discs, or discs-quick)")
    args = parser.parse_args(argv)
    preset = dict(QUICK if args.quick else FULL)
    for key in ("seeds", "size", "n_train", "n_test"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    overrides = parse_overrides(args.overrides)
    hidden = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith(("BDI_", "BRAKEDISC_"))}
    start = time.perf_counter()
    per_seed: dict[int, dict[str, RoiMetrics]] = {}
    runtime: dict[str, Any] = {}
    try:
        for seed in preset["seeds"]:
            split = draw_split(seed=seed, size=preset["size"], n_train=preset["n_train"], n_test=preset["n_test"])
            with tempfile.TemporaryDirectory(prefix="bdi-discs-") as work:
                service = build_service(work=Path(work), backbone=args.backbone, weights=args.weights,
                                        model_overrides=overrides, threads=args.threads)
                per_seed[seed] = measure_seed(split, service, protocol=args.protocol)
                runtime = {k: v for k, v in service.runtime.health().items() if k in RUNTIME_FACTS}
            print(f"seed {seed}: " + ", ".join(f"{roi} {m.image_auroc:.3f}/{m.pixel_auroc:.3f}"
                                               for roi, m in per_seed[seed].items()), flush=True)
    finally:
        os.environ.update(hidden)
    results = {
        "command": "python -m bench.discs" + ("" if argv is None else " " + shlex.join(argv)),
        "finished_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_s": time.perf_counter() - start,
        "ignored_env": sorted(hidden),
        "params": {**preset, "seeds": list(preset["seeds"]), "backbone": args.backbone, "weights": args.weights,
                   "model_overrides": overrides, "threads": args.threads, "runtime": runtime,
                   "protocol": args.protocol},
        "rois": {roi: {"image_auroc": summarise([per_seed[s][roi].image_auroc for s in per_seed]),
                       "pixel_auroc": summarise([per_seed[s][roi].pixel_auroc for s in per_seed])}
                 for roi in ROIS},
        "per_seed": {str(s): {roi: asdict(m) for roi, m in rois.items()} for s, rois in per_seed.items()},
    }
    stem = args.stem or ("discs-quick" if args.quick else "discs")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (args.out_dir / f"{stem}.md").write_text(markdown(results), encoding="utf-8")
    print(markdown(results))
    print(f"wrote {args.out_dir / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] if len(sys.argv) > 1 else None))
