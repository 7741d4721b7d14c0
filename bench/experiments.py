"""Detector experiments measured on the calibration half only: `python -m bench.experiments` (issue 29 "Make the
detector better": try, measure on the calibration halves only, keep what wins).

Each variant is BDI's default row (``bench.quality_rows.BdiDetector``, the pretrained CNN) changed in one way, fitted
on train/good and scored on the pipeline's calib half (never the eval half): image AUROC, pixel AUROC and AUPRO with
95 % stratified bootstrap intervals, and the paired difference with the default (``bench.quality_folds``).
Variants: ``default``; ``augment`` (memory augmentation: each good image also flipped left-right, up-down and
turned 180°, so the memory holds 4× the patches; 90° turns change a non-square tile's shape and are left out).
Writes ``bench/results/experiments.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from bdi.backbones import PRETRAINED_CNN
from bench.quality_data import load_mvtec
from bench.quality_folds import Half, Operating, compare, fold_report
from bench.quality_rows import BdiDetector

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def flips(images: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Each image, flipped left-right, flipped up-down and turned 180°."""
    out: list[np.ndarray] = []
    for image in images:
        out += [image, np.ascontiguousarray(image[:, ::-1]), np.ascontiguousarray(image[::-1]),
                np.ascontiguousarray(image[::-1, ::-1])]
    return out


VARIANTS: dict[str, Callable[[Sequence[np.ndarray]], Sequence[np.ndarray]]] = {
    "default": lambda images: list(images),
    "augment": flips,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.experiments", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="MVTec-layout folder")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--bootstrap-pixel", type=int, default=20)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    command = "python -m bench.experiments" + "".join(f" {shlex.quote(a)}" for a in (argv if argv is not None
                                                                                      else sys.argv[1:]))
    data = load_mvtec(args.data.name, args.data)
    half_labels = np.asarray([s.label for s in data.calib])
    results: dict[str, Any] = {"command": command,
                               "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                               "variants": {}}
    reports: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bdi-experiments-") as tmp:
        for name in args.variants.split(","):
            detector = BdiDetector(name=name, label=name, backbone=PRETRAINED_CNN, weights="official",
                                   work=Path(tmp))
            started = time.perf_counter()
            fit = detector.fit(VARIANTS[name]([s.image for s in data.train]))
            fit_s = time.perf_counter() - started
            scored = detector.score([s.image for s in data.calib])
            half = Half(labels=half_labels, scores=np.asarray([r.score for r in scored]),
                        maps=[r.anomaly_map for r in scored], masks=[s.mask for s in data.calib])
            op = Operating(threshold=float("inf"), band_low=None, band_high=None)  # threshold-free figures only
            reports[name] = fold_report([(half, op)], n_boot=args.bootstrap, n_boot_pixel=args.bootstrap_pixel)
            figures = reports[name][0]["mean"]
            results["variants"][name] = {"fit_s": fit_s, "memory_size": fit.memory_size,
                                         **{k: figures[k] for k in ("image_auroc", "pixel_auroc", "aupro")}}
            print(name, results["variants"][name], flush=True)
    for name in reports:
        if name != "default" and "default" in reports:
            diffs = compare(reports[name], reports["default"])
            results["variants"][name]["vs_default"] = {k: diffs[k] for k in ("image_auroc", "pixel_auroc", "aupro")}
    lines = ["# Detector experiments on the calibration half", "",
             f"`{command}` ({results['created_utc']}); figures on the pipeline's calib half only, 95 % bootstrap "
             "intervals; 'vs default' is the paired difference.", "",
             "| variant | image AUROC | pixel AUROC | AUPRO | fit s | memory | vs default (image / pixel / AUPRO) |",
             "|---|---|---|---|---|---|---|"]
    for name, v in results["variants"].items():
        def cell(k: str, v: dict[str, Any] = v) -> str:
            e = v[k]
            ci = e["ci"]
            return "–" if e["value"] is None else (f"{e['value']:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci
                                                   else f"{e['value']:.3f}")
        vs = v.get("vs_default")
        versus = " / ".join(f"{vs[k]['diff']:+.3f} ({vs[k]['verdict']})" for k in ("image_auroc", "pixel_auroc",
                                                                                     "aupro")) if vs else ""
        lines.append(f"| {name} | {cell('image_auroc')} | {cell('pixel_auroc')} | {cell('aupro')} | "
                     f"{v['fit_s']:.0f} | {v['memory_size']} | {versus} |")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "experiments.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (args.out_dir / "experiments.json").write_text(json.dumps(results, indent=2, allow_nan=False) + "\n",
                                                   encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
