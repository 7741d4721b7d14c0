"""Detector experiments with the choice made per fold on its own calibration half: ``python -m bench.experiments``
(issue 29 "Make the detector better": try, measure on the calibration halves only, keep what wins).

Each variant is BDI's default (``Settings`` with the pretrained CNN, ``bdi.backbones.PRETRAINED_CNN``) changed by a
few settings (``VARIANTS``: feature blocks, input size, neighbourhood, memory augmentation, coreset rate). Each is
fitted once on train/good and scores both test halves. The choice follows the two folds of ``bench.quality``:

* fold 1 chooses on the pipeline's calib half and reports on the eval half, fold 2 the other way round;
* a fold's choice is the variant with the best image AUROC on its calibration half (the primary metric of the
  tuning rounds, docs/quality.md "Tuning"), ties broken by pixel AUROC; the reporting half plays no part in it;
* the reported figures of the chosen variant are ``bench.quality_folds``' (threshold and band calibrated on the
  calibration half), beside the default's on the same half, with the paired bootstrap difference.

A variant replaces the default only if both folds choose it, its image AUROC is better than the default's on at
least one fold's reporting half where the paired interval says so, and no figure is worse where it says so
(``verdict``); otherwise the default stays. Every variant's figures on
both halves are listed, so what did not help is on record with its figures. Writes
``bench/results/experiments.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from bdi.backbones import PRETRAINED_CNN
from bdi.config import Settings
from bdi.data.metrics import image_auroc
from bdi.patchcore.calibration import resolved_percentile
from bdi.service import InspectionService
from bench.quality_data import BenchDataset, Sample, load_mvtec
from bench.quality_folds import FoldResamples, Half, calibrate, compare, fold_report, pixel_figures
from bench.quality_rows import MM_PER_PX, REF

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DEFAULT = "default"
FIGURES = ("image_auroc", "pixel_auroc", "aupro", "false_reject_rate", "escape_rate", "band_escape_rate",
           "band_false_reject_rate", "review_rate")

# name -> the model settings it changes from the library's defaults (Settings(model=...))
VARIANTS: dict[str, dict[str, Any]] = {
    DEFAULT: {},
    "input384": {"features": {"input_size": 384}},
    "input352": {"features": {"input_size": 352}},
    "input512": {"features": {"input_size": 512}},
    "neighbourhood1": {"features": {"neighbourhood": 1}},
    "neighbourhood5": {"features": {"neighbourhood": 5}},
    "blocks124": {"features": {"blocks": [1, 2, 4]}},
    "blocks234": {"features": {"blocks": [2, 3, 4]}},
    "blocks4": {"features": {"blocks": [4]}},
    "blocks4-input384": {"features": {"blocks": [4], "input_size": 384}},
    "blocks4-input512": {"features": {"blocks": [4], "input_size": 512}},
    "flips": {"memory": {"augment": "flips"}},
    "coreset025": {"memory": {"coreset_rate": 0.25}},
    "blur4": {"scoring": {"blur_sigma": 4.0}},  # the maps are aligned now (bdi.patchcore.alignment): a narrower blur
    "blur8": {"scoring": {"blur_sigma": 8.0}},
    "blur16": {"scoring": {"blur_sigma": 16.0}},
    "top5": {"scoring": {"score_top_k": 5}},  # the image score as the mean of the 5 highest patch scores
    "self-contrast": {"scoring": {"self_contrast": 0.15}},  # the map sharpened by the part's own contrast
    "unaligned": {"scoring": {"align_features": False}},  # the maps as drawn before the alignment
    "raw-intensity": {"features": {"intensity": "raw"}},  # the grey levels as shot, as before the standardization
}


def variant_settings(overrides: Mapping[str, Any], work: Path) -> Settings:
    """The library's defaults with the pretrained CNN, on the CPU, changed by ``overrides``."""
    model: dict[str, Any] = {key: dict(value) for key, value in overrides.items()}
    model["features"] = {"backbone": PRETRAINED_CNN, "weights": "official", "device": "cpu",
                         **model.get("features", {})}
    return Settings(model=model, models_dir=work)


@dataclass(frozen=True)
class Scored:
    """One variant fitted once and scored on both halves."""

    settings: Settings
    calib: Half
    eval: Half
    fit_s: float
    memory_size: int


def _half(service: InspectionService, samples: Sequence[Sample]) -> Half:
    results = service.score_images(ref=REF, images=[s.image for s in samples])
    return Half(labels=np.asarray([s.label for s in samples]), scores=np.asarray([r.score for r in results]),
                maps=[r.anomaly_map for r in results], masks=[s.mask for s in samples])


def run_variant(data: BenchDataset, overrides: Mapping[str, Any], work: Path) -> Scored:
    settings = variant_settings(overrides, work)
    service = InspectionService.from_settings(settings)
    started = time.perf_counter()
    fit = service.fit_images(ref=REF, mm_per_px=MM_PER_PX, images=[s.image for s in data.train])
    fit_s = time.perf_counter() - started
    return Scored(settings=settings, calib=_half(service, data.calib), eval=_half(service, data.eval), fit_s=fit_s,
                  memory_size=fit.coreset_size)


def selection_key(half: Half) -> tuple[float, float]:
    """What a fold's choice maximises on its calibration half: image AUROC, then pixel AUROC."""
    pixel = pixel_figures(half, np.arange(half.labels.size))["pixel_auroc"]
    image = image_auroc(half.labels, half.scores)
    return image if image is not None else 0.0, pixel if pixel is not None else 0.0


def choose_per_fold(keys: Mapping[str, Mapping[str, tuple[float, float]]]) -> tuple[str, str]:
    """Fold 1's choice (best on the calib half) and fold 2's (best on the eval half); the first listed wins a tie."""
    names = list(keys)
    return max(names, key=lambda n: keys[n]["calib"]), max(names, key=lambda n: keys[n]["eval"])


def verdict(chosen: Sequence[str], vs_default: Sequence[Mapping[str, Any] | None]) -> tuple[str | None, str]:
    """The variant that replaces the default (None: the default stays) and why, from each fold's choice and its
    paired differences with the default on that fold's reporting half."""
    if chosen[0] != chosen[1]:
        return None, "the folds chose differently"
    if chosen[0] == DEFAULT:
        return None, "both folds chose the default"
    diffs = [d or {} for d in vs_default]
    worse = sorted({k for d in diffs for k, v in d.items() if v["verdict"] == "worse"})
    if worse:
        return None, f"both folds chose {chosen[0]}, but it is worse where the intervals say so: {', '.join(worse)}"
    if not any(d.get("image_auroc", {}).get("verdict") == "better" for d in diffs):
        return None, (f"both folds chose {chosen[0]}, but its image AUROC is not better than the default's where "
                      "the intervals say so on either fold")
    return chosen[0], f"both folds chose {chosen[0]} and its image AUROC is better where the intervals say so"


def folds_of(scored: Scored) -> list[tuple[Half, Any]]:
    """``bench.quality``'s folds: report on eval with the calib half's operating point, then swapped."""
    percentile = resolved_percentile(scored.settings.model.scoring)
    cfg = scored.settings.calibration
    return [(scored.eval, calibrate(scored.calib, score_percentile=percentile, cfg=cfg)),
            (scored.calib, calibrate(scored.eval, score_percentile=percentile, cfg=cfg))]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.experiments", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="MVTec-layout folder")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated subset of the variants (default: all); 'default' is always run")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--bootstrap-pixel", type=int, default=20)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    names = [DEFAULT] + [n for n in args.variants.split(",") if n and n != DEFAULT]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    command = "python -m bench.experiments" + "".join(f" {shlex.quote(a)}" for a in (argv if argv is not None
                                                                                      else sys.argv[1:]))
    started = time.perf_counter()
    data = load_mvtec(args.data.name, args.data)
    scored: dict[str, Scored] = {}
    keys: dict[str, dict[str, tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="bdi-experiments-") as tmp:
        for name in names:
            scored[name] = run_variant(data, VARIANTS[name], Path(tmp) / name)
            keys[name] = {"calib": selection_key(scored[name].calib), "eval": selection_key(scored[name].eval)}
            print(name, keys[name], flush=True)
    # fold 1 chooses on the calib half (reports on eval); fold 2 chooses on the eval half (reports on calib)
    chosen = choose_per_fold(keys)
    reports = {name: fold_report(folds_of(s), n_boot=args.bootstrap, n_boot_pixel=args.bootstrap_pixel)
               for name, s in scored.items() if name in {DEFAULT, *chosen}}
    results: dict[str, Any] = {
        "command": command,
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "wall_s": round(time.perf_counter() - started, 1),
        "variants": {name: {"settings": VARIANTS[name], "fit_s": round(s.fit_s, 1), "memory_size": s.memory_size,
                            "calib": dict(zip(("image_auroc", "pixel_auroc"), keys[name]["calib"], strict=True)),
                            "eval": dict(zip(("image_auroc", "pixel_auroc"), keys[name]["eval"], strict=True))}
                     for name, s in scored.items()},
        "chosen": {"fold 1 (choose on calib, report on eval)": chosen[0],
                   "fold 2 (choose on eval, report on calib)": chosen[1]},
        "reports": {},
    }
    for fold, name in enumerate(chosen):
        report = reports[name][0]["folds"][fold]
        default = reports[DEFAULT][0]["folds"][fold]
        entry: dict[str, Any] = {"variant": name, "figures": {k: report[k] for k in FIGURES},
                                 "default": {k: default[k] for k in FIGURES}}
        if name != DEFAULT:
            diffs = compare(_one_fold(reports[name], fold), _one_fold(reports[DEFAULT], fold))
            entry["vs_default"] = {k: diffs[k] for k in FIGURES}
        results["reports"][f"fold {fold + 1}"] = entry
    results["winner"], results["verdict"] = verdict(chosen, [e.get("vs_default") for e in results["reports"].values()])
    args.out_dir.mkdir(parents=True, exist_ok=True)
    markdown = render(results)
    (args.out_dir / "experiments.md").write_text(markdown, encoding="utf-8")
    (args.out_dir / "experiments.json").write_text(json.dumps(results, indent=2, allow_nan=False) + "\n",
                                                   encoding="utf-8")
    print(markdown)
    return 0


def _one_fold(report: tuple[dict[str, Any], FoldResamples], fold: int) -> tuple[dict[str, Any], FoldResamples]:
    """A two-fold report narrowed to one fold, for a paired comparison of that fold alone."""
    figures, resamples = report
    pick = FoldResamples(image={k: [[s[fold]] for s in v] for k, v in resamples.image.items()},
                         pixel={k: [[s[fold]] for s in v] for k, v in resamples.pixel.items()})
    return {"mean": figures["folds"][fold]}, pick


def _cell(entry: Mapping[str, Any]) -> str:
    value, ci = entry["value"], entry["ci"]
    if value is None:
        return "–"
    return f"{value:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{value:.3f}"


def render(results: Mapping[str, Any]) -> str:
    lines = ["# Detector experiments, chosen per fold on its calibration half", "",
             f"`{results['command']}` ({results['created_utc']}, {results['wall_s']:.0f} s wall). Fit on "
             "train/good; each variant scores both halves. Fold 1 chooses on the calib half and reports on the eval "
             "half, fold 2 the other way round; the choice is the best image AUROC on the fold's calibration half "
             "(ties: pixel AUROC).", "",
             "Every variant, threshold-free figures on each half (a fold only ever sees its calibration half's "
             "column when it chooses):", "",
             "| variant | settings changed | calib: image AUROC | calib: pixel AUROC | eval: image AUROC | "
             "eval: pixel AUROC | fit s | memory |",
             "|---|---|---|---|---|---|---|---|"]
    for name, v in results["variants"].items():
        changed = ", ".join(f"`model.{group}.{k}={val}`" for group, d in v["settings"].items()
                            for k, val in d.items()) or "(library defaults)"
        lines.append(f"| {name} | {changed} | {v['calib']['image_auroc']:.3f} | {v['calib']['pixel_auroc']:.3f} | "
                     f"{v['eval']['image_auroc']:.3f} | {v['eval']['pixel_auroc']:.3f} | {v['fit_s']:.0f} | "
                     f"{v['memory_size']} |")
    lines += ["", "Chosen: " + "; ".join(f"{fold}: **{name}**" for fold, name in results["chosen"].items()) + ". "
              + (f"**{results['winner']} replaces the default**: " if results["winner"]
                 else "**The default stays**: ") + results["verdict"] + ".", "",
              "The chosen variant on its fold's reporting half (threshold and band calibrated on the other half), "
              "beside the default on the same half; 95 % bootstrap intervals, paired difference:", "",
              "| fold | variant | " + " | ".join(FIGURES) + " |",
              "|---|---|" + "---|" * len(FIGURES)]
    for fold, entry in results["reports"].items():
        lines.append(f"| {fold} | {entry['variant']} | "
                     + " | ".join(_cell(entry["figures"][k]) for k in FIGURES) + " |")
        if entry["variant"] != DEFAULT:
            lines.append(f"| {fold} | default | " + " | ".join(_cell(entry["default"][k]) for k in FIGURES) + " |")
            vs = entry["vs_default"]
            lines.append(f"| {fold} | difference | " + " | ".join(
                "–" if vs[k]["diff"] is None else f"{vs[k]['diff']:+.3f} ({vs[k]['verdict']})" for k in FIGURES)
                + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
