"""bf16 against fp32 on real data, one command, one run: `python -m bench.precision` (docs/runtimes.md "Precision").

For each backbone (the pretrained CNN, ``bdi.backbones.PRETRAINED_CNN``; DINOv2 ViT-S/14 with ``BDI_WEIGHTS`` or
random init) and each way of running its feature net (torch fp32, the reference; torch bf16 autocast; OpenVINO
bf16; ONNX Runtime fp32), the same BDI model is fitted on magnetic-tile train/good, calibrated on the calib half
and measured on the eval half (``bench.quality.measure_row``): image and pixel AUROC, the escape and false-reject
rates, and how far each eval image's score moved from fp32 torch's, both end to end (fitted in that mode) and
serving the fp32-fitted model in that mode (what ``BDI_PRECISION=bf16`` on a server alone changes). The feature
net is set to each mode directly, bypassing the start-up parity gate, so the effect is measured even where the
gate would refuse the mode; the gate's verdict on the golden images (``bdi.runtime.parity``) is printed beside it, with
its forward time (one image, in-process). Writes ``bench/results/precision.{md,json}``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as bench.quality: sane timings on a shared CPU

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bdi.backbones import DINOV2_VITS14, PRETRAINED_CNN
from bdi.patchcore.features import ForwardRuntime, TorchRunner
from bdi.runtime.parity import check_parity, golden_reference
from bdi.runtime.runners import RuntimeOptions, open_runtime
from bdi.runtime.select import configure_threads, ensure_export
from bench.quality import MAGNETIC_TILE, RESULTS, load_average, measure_row, without_bdi_env
from bench.quality_data import BenchDataset, load_mvtec, synthetic_dataset
from bench.quality_rows import BdiDetector

MODES: tuple[tuple[str, str], ...] = (("torch", "fp32"), ("torch", "bf16"), ("openvino", "bf16"),
                                      ("onnxruntime", "fp32"))
BACKBONES = {"cnn": (PRETRAINED_CNN, "official"), "vit": (DINOV2_VITS14, os.environ.get("BDI_WEIGHTS", "random"))}


def _runner(detector: BdiDetector, runtime: str, precision: str, *, threads: int) -> ForwardRuntime:
    extractor = detector.service.extractor
    if runtime == "torch":
        return TorchRunner(extractor, precision)
    export = ensure_export(extractor, root=detector.settings.exports_dir())
    runner = open_runtime(runtime, export, options=RuntimeOptions(threads=threads, precision=precision))
    if runner.precision != precision:
        raise RuntimeError(f"{runtime} cannot run {precision} on this CPU (it runs {runner.precision})")
    return runner


def measure_backbone(key: str, data: BenchDataset, work: Path, *, threads: int, repeats: int) -> list[dict[str, Any]]:
    backbone, weights = BACKBONES[key]
    rows: list[dict[str, Any]] = []
    reference_detector: BdiDetector | None = None  # the fp32 torch model, fitted and calibrated first
    for runtime, precision in MODES:
        label = f"{runtime} {precision}"
        print(f"[{backbone}] {label} ...", flush=True)
        detector = BdiDetector(name=f"{key}-{runtime}-{precision}", label=backbone, backbone=backbone,
                               weights=weights, work=work, runtime="torch")
        reference = golden_reference(detector.service.extractor)
        try:
            runner = _runner(detector, runtime, precision, threads=threads)
        except Exception as exc:  # noqa: BLE001 - a mode this machine cannot run is reported, not fatal
            rows.append({"backbone": backbone, "mode": label, "status": "skipped", "reason": str(exc)})
            continue
        gate = check_parity(reference, runner)
        detector.service.extractor.use_runtime(runner)
        measured = measure_row(detector, data, latency_repeats=repeats, warmup=2)
        row = {"backbone": backbone, "mode": label, "status": "ok", "gate": gate.to_dict(), **measured}
        if reference_detector is None:
            reference_detector = detector
        else:  # the same mode serving the fp32 model: what BDI_PRECISION=bf16 on a server alone changes
            fp32_extractor = reference_detector.service.extractor
            fp32_extractor.use_runtime(_runner(reference_detector, runtime, precision, threads=threads))
            served = reference_detector.score([s.image for s in data.eval])
            fp32_extractor.use_runtime(None)
            row["served_fp32_model_scores"] = [r.score for r in served]
        rows.append(row)
    base = [s["score"] for s in rows[0]["eval_scores"]]
    for row in rows[1:]:
        if row["status"] == "ok":
            row["score_rel_diff"] = _moved(base, [s["score"] for s in row["eval_scores"]])
            row["served_rel_diff"] = _moved(base, row["served_fp32_model_scores"])
    return rows


def _moved(base: Sequence[float], scores: Sequence[float]) -> dict[str, float]:
    """Median and largest ``|s − s_fp32| / |s_fp32|`` over the eval images."""
    moved = [abs(s - b) / max(abs(b), 1e-12) for s, b in zip(scores, base, strict=True)]
    return {"median": statistics.median(moved), "max": max(moved)}


def _markdown(results: dict[str, Any]) -> str:
    lines = [f"# Precision: bf16 against fp32 (`{results['command']}`)", "",
             f"{results['created_utc']}; {results['cpu']}, {results['threads']} threads, load average at start "
             f"{results['load_before']}; data: {results['data']} (eval half: {results['n_eval']} images)", "",
             "| backbone | mode | golden-image gate (features / scores rel) | forward ms (1 image) | /infer p50 ms "
             "| image AUROC | pixel AUROC | escape | false reject | eval score moved vs fp32 (median / max rel) "
             "| the same, serving the fp32-fitted model |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        if row["status"] != "ok":
            lines.append(f"| {row['backbone']} | {row['mode']} | skipped: {row['reason']} | | | | | | | | |")
            continue
        gate, m = row["gate"], row["metrics"]
        verdict = (f"{'pass' if gate['passed'] else 'FAIL'} ({gate['feature_rel_err']:.1e} / "
                   f"{gate['score_rel_err']:.1e})")
        moved, served = row.get("score_rel_diff"), row.get("served_rel_diff")
        moved_text = f"{moved['median']:.1e} / {moved['max']:.1e}" if moved else "(reference)"
        served_text = f"{served['median']:.1e} / {served['max']:.1e}" if served else "(reference)"
        lines.append(
            f"| {row['backbone']} | {row['mode']} | {verdict} | {gate['runtime_ms']:.0f} "
            f"| {row['latency_ms']['p50']:.0f} | {m['image_auroc']:.3f} | {m['pixel_auroc']:.3f} "
            f"| {m['escape_rate']:.3f} | {m['false_reject_rate']:.3f} | {moved_text} | {served_text} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.precision", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default="cnn,vit", help="comma-separated subset of cnn,vit")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--latency-repeats", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="small subsets (a smoke run)")
    parser.add_argument("--dataset", choices=("magnetic_tile", "synthetic"), default="magnetic_tile")
    parser.add_argument("--magnetic-tile", type=Path, default=MAGNETIC_TILE)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    keys = [k for k in args.backbones.split(",") if k]
    if unknown := set(keys) - set(BACKBONES):
        parser.error(f"--backbones: unknown {sorted(unknown)}; choose from {', '.join(BACKBONES)}")
    if args.dataset == "magnetic_tile" and not args.magnetic_tile.is_dir():
        parser.error(f"{args.magnetic_tile} does not exist (the magnetic-tile data of ../shared): --dataset synthetic")
    configure_threads(args.threads)
    from bench.quality import machine_facts

    load_before = load_average()
    rows: list[dict[str, Any]] = []
    with without_bdi_env(), tempfile.TemporaryDirectory(prefix="bdi-precision-") as tmp:
        data = (load_mvtec("magnetic_tile", args.magnetic_tile, quick=args.quick) if args.dataset == "magnetic_tile"
                else synthetic_dataset(Path(tmp), quick=args.quick))
        for key in keys:
            rows += measure_backbone(key, data, Path(tmp), threads=args.threads, repeats=args.latency_repeats)
    results = {"command": "python -m bench.precision" + "".join(f" {a}" for a in (argv or sys.argv[1:])),
               "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "cpu": machine_facts(args.threads, load_before=load_before)["cpu"], "threads": args.threads,
               "load_before": load_before, "data": data.name, "n_eval": len(data.eval), "rows": rows}
    name = "precision-quick" if args.quick else "precision"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    markdown = _markdown(results)
    (args.out_dir / f"{name}.md").write_text(markdown, encoding="utf-8")
    (args.out_dir / f"{name}.json").write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
