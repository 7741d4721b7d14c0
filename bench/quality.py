"""Quality benchmark, one command, one run: `make bench-quality` (or `python -m bench.quality`).

Rows, measured side by side on the same splits, threads and machine:
  * ``bdi-effnet``: BDI with the pretrained CNN (``--cnn``, default ``bdi.backbones.PRETRAINED_CNN``) and its
    official ImageNet weights (the pip package's file),
    every other setting the library's default (registry defaults for input size, blocks, neighbourhood, blur);
  * ``bdi-dinov2-random``: BDI with DINOv2 ViT-S/14 in random init, to show what weights bring;
  * ``anomalib``: anomalib 2.x ``PatchcoreModel`` driven directly, on timm's model of that CNN carrying the
    SAME weights, the same input size and layers as ``bdi-effnet``, coreset ratio 0.1 (needs the ``bench``
    extra; the row is skipped without it);
  * ``pixel-knn``: a raw-pixel patch-kNN baseline.
Datasets: magnetic tile (``../shared/data/magnetic_tile``; skipped when absent) and the seeded synthetic discs.
Each row fits on train/good, sets its threshold on the calib half with BDI's calibration rule, and is measured
on the eval half: image AUROC, pixel AUROC, AUPRO, false-reject and escape rates, per defect class AUROC, fit
time (features and coreset apart) and the p50 of a single-image ``/infer`` (``InspectionService.infer``, or the
same decode → forward → score path for the other rows). Writes ``bench/results/quality.{md,json}``
(``quality-quick.*`` with ``--quick``). BDI_* environment variables are ignored: rows use the defaults.

``--swap-halves`` exchanges the halves (threshold from the eval half, every figure on the calib half, written to
``quality-swapped.*``): how far the figures move from one half of 40 images to the other. The calib half is the
one the defaults were tuned on, so those figures are not held out; the report says so.
"""

from __future__ import annotations

import os

# On a shared CPU, OpenMP's default spin-waiting makes 2 torch threads several times slower than 1 whenever other
# processes compete for the cores (measured here: 2.8 s vs 0.4 s per EfficientNet forward); passive waiting keeps
# every row's timings sane. It must be set before torch loads OpenMP, so before the imports below.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import contextlib
import platform
import shlex
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from bdi.backbones import BACKBONES, DINOV2_VITS14, PRETRAINED_CNN
from bdi.config import FeatureConfig, Settings
from bdi.data.metrics import AUPRO_FPR_LIMIT, evaluate_scores
from bdi.data.splits import CALIB_FRACTION
from bdi.patchcore.calibration import resolved_percentile
from bdi.patchcore.weights import resolve_weights
from bench.overrides import ModelOverrides, parse_overrides
from bench.quality_data import BenchDataset, load_mvtec, synthetic_dataset
from bench.quality_folds import N_BOOT, N_BOOT_PIXEL, FoldResamples, Half, calibrate, compare, fold_report
from bench.quality_report import write_results
from bench.quality_rows import (
    AnomalibDetector,
    BdiDetector,
    Detector,
    PixelKnnDetector,
    anomalib_version,
)

ROOT = Path(__file__).resolve().parents[1]
MAGNETIC_TILE = ROOT.parent / "shared" / "data" / "magnetic_tile"
RESULTS = ROOT / "bench" / "results"
CNN_BACKBONES = tuple(name for name, spec in BACKBONES.items() if spec.family == "cnn")
VIT = DINOV2_VITS14
ROWS = ("bdi-effnet", "bdi-effnet-fp32", "bdi-dinov2-random", "anomalib", "pixel-knn")
DATASETS = ("magnetic_tile", "synthetic")
ANOMALIB_CORESET_RATIO = 0.1
PIXEL_CELL = 8  # px: the raw-pixel baseline's cell on the letterboxed image
AUROC_EPS = 1e-9  # an AUROC is a ratio of pair counts: 270/300 computes as 0.8999999999999999


class RowSkipped(Exception):
    """A row that cannot run here (e.g. anomalib not installed); reported, not an error."""


@contextlib.contextmanager
def without_bdi_env() -> Iterator[list[str]]:
    """Hide ``BDI_*`` / ``BRAKEDISC_*`` variables so every row runs on the library's defaults."""
    hidden = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith(("BDI_", "BRAKEDISC_"))}
    try:
        yield sorted(hidden)
    finally:
        os.environ.update(hidden)


def set_threads(n: int) -> None:
    torch.set_num_threads(n)
    cv2.setNumThreads(n)
    with contextlib.suppress(ImportError):
        import faiss

        faiss.omp_set_num_threads(n)


def load_average() -> float | None:
    """The 1-minute load average, None where the OS has none."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return None


def machine_facts(threads: int, *, load_before: float | None) -> dict[str, Any]:
    import timm

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        import faiss

        faiss_version = str(faiss.__version__)
    except ImportError:
        faiss_version = "not installed"
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cpus_total": os.cpu_count(), "cpus_usable": usable, "threads": threads,
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "timm": timm.__version__,
            "faiss": faiss_version, "anomalib": anomalib_version(), "numpy": np.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "load_before": load_before,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "load_after": load_average()}


# --------------------------------------------------------------------------------------------- rows


def build_row(name: str, work: Path, *, cnn: str = PRETRAINED_CNN,
              model_overrides: ModelOverrides | None = None) -> Detector:
    """A fresh, unfitted detector for the row ``name``; ``cnn`` is the pretrained CNN of the CNN rows;
    ``model_overrides`` change the BDI rows' library defaults (``--set``)."""
    if name == "bdi-effnet":
        return BdiDetector(name=name, label=f"BDI {cnn} (ImageNet)", backbone=cnn, weights="official", work=work,
                           model_overrides=model_overrides)
    if name == "bdi-effnet-fp32":
        return BdiDetector(name=name, label=f"BDI {cnn} (ImageNet), fp32", backbone=cnn, weights="official",
                           work=work, precision="fp32", model_overrides=model_overrides)
    if name == "bdi-dinov2-random":
        return BdiDetector(name=name, label="BDI DINOv2 ViT-S/14 (random init)", backbone=VIT, weights="random",
                           work=work, model_overrides=model_overrides)
    settings = Settings(model={"features": {"backbone": cnn, "weights": "official", "device": "cpu"}},
                        models_dir=work / name)
    features: FeatureConfig = settings.model.features  # resolved: the registry's defaults
    assert features.input_size is not None and features.blocks is not None
    if name == "anomalib":
        if anomalib_version() is None:
            raise RowSkipped("anomalib is not installed (pip install -e '.[bench]', as make bench-quality does)")
        weights = resolve_weights(features, cache_dir=settings.weights_cache_dir)
        assert weights.path is not None
        return AnomalibDetector(
            name=name, label=f"anomalib {anomalib_version()} PatchCore, {cnn} (same weights)", backbone=cnn,
            weights_path=Path(weights.path), weights_name=f"{weights.name} sha256 {weights.sha256}",
            input_size=features.input_size, layers=[f"blocks.{b}" for b in features.blocks],
            coreset_ratio=ANOMALIB_CORESET_RATIO, settings=settings,
        )
    if name == "pixel-knn":
        return PixelKnnDetector(name=name, label="raw-pixel patch kNN", input_size=features.input_size,
                                cell=PIXEL_CELL, coreset_rate=settings.model.memory.coreset_rate,
                                settings=settings, scoring=settings.model.scoring)
    raise ValueError(f"unknown row {name!r}; known: {', '.join(ROWS)}")


def p50_ms(call: Callable[[bytes], object], payloads: Sequence[bytes], *, repeats: int, warmup: int) -> dict[str, Any]:
    """Median wall time of ``call`` on one payload, cycling through ``payloads``, after ``warmup`` calls."""
    for i in range(warmup):
        call(payloads[i % len(payloads)])
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        call(payloads[i % len(payloads)])
        times.append((time.perf_counter() - start) * 1e3)
    return {"p50": statistics.median(times), "min": min(times), "max": max(times), "n": repeats}


def _half(samples: Sequence[Any], scored: Sequence[Any]) -> Half:
    return Half(labels=np.asarray([s.label for s in samples]), scores=np.asarray([r.score for r in scored]),
                maps=[r.anomaly_map for r in scored], masks=[s.mask for s in samples])


def measure_folds(detector: Detector, data: BenchDataset, calib: Sequence[Any], scored: Sequence[Any], *,
                  n_boot: int, n_boot_pixel: int) -> tuple[dict[str, Any], FoldResamples]:
    """Both folds from the two halves' scores (fit once): fold 1 calibrates on the calib half and reports on the
    eval half, fold 2 the other way round (``bench.quality_folds``)."""
    settings: Settings = detector.settings  # type: ignore[attr-defined]  # every row carries its settings
    percentile = resolved_percentile(settings.model.scoring)
    a, b = _half(data.calib, calib), _half(data.eval, scored)
    folds = [(b, calibrate(a, score_percentile=percentile, cfg=settings.calibration)),
             (a, calibrate(b, score_percentile=percentile, cfg=settings.calibration))]
    return fold_report(folds, n_boot=n_boot, n_boot_pixel=n_boot_pixel)


def measure_row(detector: Detector, data: BenchDataset, *, latency_repeats: int, warmup: int,
                n_boot: int = N_BOOT, n_boot_pixel: int = N_BOOT_PIXEL) -> dict[str, Any]:
    """Fit, calibrate on the calib half, evaluate on the eval half, time single-image inference; then both folds
    with their intervals (``folds``; the resamples under ``_resamples``, dropped before writing)."""
    start = time.perf_counter()
    fit = detector.fit([s.image for s in data.train])
    fit_wall = time.perf_counter() - start
    calib = detector.score([s.image for s in data.calib])
    ok = [c.score for c, s in zip(calib, data.calib, strict=True) if s.label == 0]
    ng = [c.score for c, s in zip(calib, data.calib, strict=True) if s.label == 1]
    threshold = detector.calibrate(ok, ng)
    scored = detector.score([s.image for s in data.eval])
    report = evaluate_scores(
        labels=[s.label for s in data.eval], scores=[r.score for r in scored], threshold=threshold,
        defect_classes=[s.defect_class for s in data.eval], maps=[r.anomaly_map for r in scored],
        masks=[s.mask for s in data.eval], fpr_limit=AUPRO_FPR_LIMIT,
    )
    # the calib half's per-class figures that need no threshold (image and pixel AUROC, AUPRO): fold 2's side
    calib_report = evaluate_scores(
        labels=[s.label for s in data.calib], scores=[r.score for r in calib], threshold=threshold,
        defect_classes=[s.defect_class for s in data.calib], maps=[r.anomaly_map for r in calib],
        masks=[s.mask for s in data.calib], fpr_limit=AUPRO_FPR_LIMIT,
    )
    latency = p50_ms(detector.infer_once, [s.data for s in data.eval], repeats=latency_repeats, warmup=warmup)
    folds, resamples = measure_folds(detector, data, calib, scored, n_boot=n_boot, n_boot_pixel=n_boot_pixel)
    return {
        "folds": folds,
        "_resamples": resamples,
        "fit": {**asdict(fit), "total_s": fit.total_s, "wall_s": fit_wall},
        "threshold": threshold,
        "calib": {"n_ok": len(ok), "n_ng": len(ng)},
        "metrics": dict(report.overall),
        "per_class": {k: dict(v) for k, v in report.per_class.items()},
        "per_class_calib": {k: {m: v[m] for m in ("image_auroc", "pixel_auroc", "aupro", "n") if m in v}
                            for k, v in calib_report.per_class.items()},  # not recall: at the half's own threshold
        "latency_ms": latency,
        "eval_scores": [{"file": s.name, "defect_class": s.defect_class, "score": r.score}
                        for s, r in zip(data.eval, scored, strict=True)],
    }


def run_rows(data: BenchDataset, rows: Sequence[str], work: Path, *, latency_repeats: int, warmup: int,
             cnn: str = PRETRAINED_CNN, n_boot: int = N_BOOT, n_boot_pixel: int = N_BOOT_PIXEL,
             model_overrides: ModelOverrides | None = None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for name in rows:
        print(f"[{data.name}] {name} ...", flush=True)
        entry: dict[str, Any] = {"name": name, "label": name}
        start = time.perf_counter()
        try:
            torch.manual_seed(0)
            detector = build_row(name, work / data.name, cnn=cnn, model_overrides=model_overrides)
            entry.update(label=detector.label, config=detector.describe())
            entry.update(measure_row(detector, data, latency_repeats=latency_repeats, warmup=warmup, n_boot=n_boot,
                                     n_boot_pixel=n_boot_pixel), status="ok")
        except RowSkipped as exc:
            entry.update(status="skipped", reason=str(exc))
        except Exception as exc:  # noqa: BLE001 - one broken row must not hide the others; reported, exit 1
            traceback.print_exc()
            entry.update(status="failed", reason=f"{type(exc).__name__}: {exc}")
        entry["row_wall_s"] = time.perf_counter() - start
        summary = entry.get("metrics", {})
        print(f"[{data.name}] {name}: {entry['status']} in {entry['row_wall_s']:.1f} s  image AUROC "
              f"{summary.get('image_auroc')}  pixel AUROC {summary.get('pixel_auroc')}", flush=True)
        out.append(entry)
    add_comparisons(out)
    for entry in out:
        entry.pop("_resamples", None)
    return out


def add_comparisons(rows: list[dict[str, Any]]) -> None:
    """Each measured row's paired difference with the BDI row (fold means; ``comparison_vs_bdi``): better / worse
    only where the interval says so."""
    by = {r["name"]: r for r in rows if r["status"] == "ok" and "_resamples" in r}
    ours = by.get("bdi-effnet")
    if ours is None:
        return
    for name, row in by.items():
        if name != "bdi-effnet":
            ours["comparisons"] = {**ours.get("comparisons", {}),
                                   name: compare((ours["folds"], ours["_resamples"]),
                                                 (row["folds"], row["_resamples"]))}


# --------------------------------------------------------------------------------------------- targets


def targets(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 14's targets, as far as this dataset's rows measure them."""
    by = {r["name"]: r for r in rows if r["status"] == "ok"}
    bdi, ano = by.get("bdi-effnet"), by.get("anomalib")
    out: list[dict[str, Any]] = []
    if bdi is None:
        return out
    for key, label in (("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC")):
        value = bdi["metrics"][key]
        out.append({"target": f"BDI {label} >= 0.90", "measured": f"{value:.3f}" if value is not None else "–",
                    "met": value is not None and value >= 0.90 - AUROC_EPS})
        if ano is not None:
            theirs = ano["metrics"][key]
            both = value is not None and theirs is not None
            out.append({"target": f"BDI {label} >= anomalib's (same backbone and weights)",
                        "measured": f"{value:.3f} vs {theirs:.3f}" if both else "–",
                        "met": both and value >= theirs - AUROC_EPS})
    if ano is not None:
        ours = bdi["fit"]["features_s"] + bdi["fit"]["coreset_s"]
        theirs = ano["fit"]["features_s"] + ano["fit"]["coreset_s"]
        out.append({"target": "BDI fit (features + coreset) <= 1/10 of anomalib's",
                    "measured": f"{ours:.1f} s vs {theirs:.1f} s (1/{theirs / ours:.1f})" if ours > 0 else "–",
                    "met": ours * 10 <= theirs})
    return out


# --------------------------------------------------------------------------------------------- main


SWAPPED_NOTE = ("--swap-halves: the halves are EXCHANGED. In this report 'calib' is the pipeline's eval half and "
                "'eval' is the pipeline's calib half, the one the defaults were tuned on: these figures are not "
                "held out.")


def _csv(value: str, known: Sequence[str], what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in items if v not in known]
    if unknown or not items:
        raise argparse.ArgumentTypeError(f"{what}: unknown {unknown or value!r}; choose from {', '.join(known)}")
    return items


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="small subsets and few latency repeats (a smoke run, seconds to a minute)")
    parser.add_argument("--rows", type=lambda v: _csv(v, ROWS, "--rows"), default=list(ROWS),
                        help=f"comma-separated subset of {','.join(ROWS)}")
    parser.add_argument("--datasets", type=lambda v: _csv(v, DATASETS, "--datasets"), default=list(DATASETS),
                        help=f"comma-separated subset of {','.join(DATASETS)}")
    parser.add_argument("--cnn", choices=CNN_BACKBONES, default=PRETRAINED_CNN,
                        help="the pretrained CNN of the bdi-effnet, anomalib and pixel-knn rows (default: %(default)s)")
    parser.add_argument("--magnetic-tile", type=Path, default=MAGNETIC_TILE, help="MVTec-layout folder")
    parser.add_argument("--threads", type=int, default=2, help="torch/faiss/OpenCV threads for every row")
    parser.add_argument("--latency-repeats", type=int, default=None, help="single-image /infer calls timed")
    parser.add_argument("--swap-halves", action="store_true",
                        help="threshold from the eval half, figures on the calib half (not held out: see above)")
    parser.add_argument("--bootstrap", type=int, default=None,
                        help=f"bootstrap resamples of the image figures (default {N_BOOT}; --quick 100)")
    parser.add_argument("--bootstrap-pixel", type=int, default=None,
                        help=f"bootstrap resamples of pixel AUROC / AUPRO (default {N_BOOT_PIXEL}; --quick 0: none)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="a model.* setting of the BDI rows, e.g. scoring.self_contrast=0.15 (repeatable)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python -m bench.quality" + "".join(f" {shlex.quote(a)}" for a in (argv if argv is not None
                                                                                  else sys.argv[1:]))
    set_threads(args.threads)
    repeats = args.latency_repeats or (3 if args.quick else 20)
    warmup = 1 if args.quick else 3
    notes: list[str] = []
    load_before = load_average()
    started = time.perf_counter()
    datasets: list[dict[str, Any]] = []
    with without_bdi_env() as hidden, tempfile.TemporaryDirectory(prefix="bdi-quality-") as tmp:
        if hidden:
            notes.append(f"ignored environment variables (rows use the library defaults): {', '.join(hidden)}")
        overrides = parse_overrides(args.overrides)
        if overrides:
            notes.append(f"the BDI rows' library defaults changed by --set: {overrides}")
        work = Path(tmp)
        for name in args.datasets:
            if name == "magnetic_tile":
                if not args.magnetic_tile.is_dir():
                    notes.append(f"magnetic_tile skipped: {args.magnetic_tile} does not exist")
                    print(notes[-1], flush=True)
                    continue
                data = load_mvtec("magnetic_tile", args.magnetic_tile, quick=args.quick)
            else:
                data = synthetic_dataset(work, quick=args.quick)
            if args.swap_halves:
                data = data.swapped()
            print(f"[{data.name}] {data.counts()}", flush=True)
            rows = run_rows(data, args.rows, work, cnn=args.cnn, latency_repeats=repeats, warmup=warmup,
                            model_overrides=overrides,
                            n_boot=args.bootstrap if args.bootstrap is not None else (100 if args.quick else N_BOOT),
                            n_boot_pixel=(args.bootstrap_pixel if args.bootstrap_pixel is not None
                                          else (0 if args.quick else N_BOOT_PIXEL)))
            source = (os.path.relpath(data.source, ROOT) if Path(data.source).is_absolute() else data.source)
            datasets.append({"name": data.name, "source": source, "counts": data.counts(), "rows": rows,
                             "targets": targets(rows)})
    notes += [
        "Both folds (issue 29): every row is fitted once on train/good and scores both test halves; fold 1 "
        "calibrates on the calib half and reports on the eval half, fold 2 the other way round; 'mean' is their "
        "mean. Intervals: 95 % percentile bootstrap over images, OK and NG resampled apart (seeded); a row is "
        "'better' than another only where the paired bootstrap interval of the difference excludes 0. The "
        "registry defaults (input size, blocks, blur, percentile) were tuned once on the pipeline's calib half, "
        "so fold 2's reporting half is the half they were chosen on: fold 1 is the held-out figure.",
        "Operating points: false reject / escape at the threshold calibrated on the other half (the contract "
        "rule); 'FRR @ 0 % / 5 % escapes' is the lowest false-reject rate of any threshold letting at most that "
        "share of the reporting half's NG images through; band: the OK / review / NG band calibrated on the "
        "other half (escape budget 0, false-reject budget 0.05, the library defaults).",
        "Every row fits on train/good, takes its threshold from the calib half with BDI's calibration rule "
        "(bdi.patchcore.calibration.choose_threshold, library defaults) and is measured on the eval half; "
        "the false-reject "
        "and escape rates are at that threshold.",
        "Pixel AUROC and AUPRO (FPR limit "
        f"{AUPRO_FPR_LIMIT}) are computed at each image's own size: anomalib's input_size² map is resized back.",
        "/infer p50: BDI rows time InspectionService.infer (decode, features, 1-NN, map, score, regions, heatmap "
        "PNG when NG); the other rows time decode + pre-processing + forward + score of one image.",
        "anomalib's row runs its own pre-processing (square resize, aspect not kept) and scoring (re-weighted "
        "max, 9 neighbours, σ=4 map blur), as anomalib would; BDI letterboxes and scores a percentile.",
    ]
    results: dict[str, Any] = {
        "command": command,
        "mode": "quick" if args.quick else "full",
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "wall_s": time.perf_counter() - started,
        "machine": machine_facts(args.threads, load_before=load_before),
        "split_rule": (f"bdi.data.splits.split_mvtec, the pipeline's ingest rule: train/good fits; each test class is "
                       f"ordered by the sha256 of its files and dealt {CALIB_FRACTION:g} to calib (threshold), "
                       "the rest to eval (every figure below)."
                       + (f" {SWAPPED_NOTE}" if args.swap_halves else "")),
        "datasets": datasets,
        "notes": notes,
    }
    stem = "quality-quick" if args.quick else "quality"
    md, js = write_results(results, args.out_dir, f"{stem}-swapped" if args.swap_halves else stem)
    print(md.read_text(encoding="utf-8"))
    print(f"wrote {md} and {js}")
    failed = [f"{d['name']}/{r['name']}" for d in datasets for r in d["rows"] if r["status"] == "failed"]
    if failed:
        print(f"failed rows: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
