"""`/infer` latency of this tree against an earlier commit, interleaved in one run:
`python -m bench.infer_latency --baseline d4fdec5` (issue 29: "/infer p50 on the default runtime no more than 1.5×
today's").

A latency measured in one run and compared with a figure from another day compares two machines' loads, not two
versions. Here both versions run at once on the same machine:
  1. ``git archive <baseline> src`` unpacks the baseline's library into a temporary folder;
  2. one worker process per version (this file run as a script with only that version's ``src`` on ``PYTHONPATH``)
     builds ``InspectionService`` with every setting its default but the backbone (the pretrained CNN, official
     weights), fits on ``train/good``, calibrates on the test parts' scores, then waits;
  3. rounds alternate between the two workers (``--rounds``, the order swapped every round): in its turn a worker
     times ``--repeats`` single-image ``InspectionService.infer`` calls on the encoded test images while the other
     one sleeps on its stdin, so load from elsewhere hits both alike.
Reports p50 / p95 per version, their ratio (this tree / baseline), the median per-round ratio with its range, and
each version's median stage times (``timings_ms``). Writes ``bench/results/infer_latency.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
MAGNETIC_TILE = ROOT.parent / "shared" / "data" / "magnetic_tile"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
CNN = "efficientnet_lite2"  # bdi.backbones.PRETRAINED_CNN; spelled out because the baseline may predate the name


# --------------------------------------------------------------------------------------------- worker
# Runs under either version's library: only the public API both versions share (from_settings, fit_images,
# score_images, calibrate_from_scores, infer).


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and "_mask" not in p.stem)


def worker(data: Path, backbone: str) -> None:
    import bdi
    from bdi.config import Settings
    from bdi.patchcore.imaging import decode_image
    from bdi.refs import ModelRef
    from bdi.service import InspectionService

    ref = ModelRef.create(recipe_id="default", role_id="Inspection", roi_id="latency", model_key=None)
    with tempfile.TemporaryDirectory(prefix="bdi-latency-") as tmp:
        settings = Settings(model={"features": {"backbone": backbone, "weights": "official", "device": "cpu"}},
                            models_dir=Path(tmp))
        service = InspectionService.from_settings(settings)
        service.fit_images(ref=ref, mm_per_px=0.2, images=[decode_image(p.read_bytes())
                                                            for p in _images(data / "train" / "good")])
        tests = _images(data / "test")
        payloads = [p.read_bytes() for p in tests]
        scores = [float(r.score) for r in service.score_images(ref=ref, images=[decode_image(b) for b in payloads])]
        good = [s for p, s in zip(tests, scores, strict=True) if p.parent.name == "good"]
        bad = [s for p, s in zip(tests, scores, strict=True) if p.parent.name != "good"]
        service.calibrate_from_scores(ref=ref, ok_scores=good, ng_scores=bad, mm_per_px=0.2)
        health = service.runtime.health() if hasattr(service, "runtime") else {}
        print(json.dumps({"ready": True, "library": str(Path(bdi.__file__).parent),
                          "runtime": {k: v for k, v in health.items() if k.startswith("runtime")}}), flush=True)
        served = 0
        for line in sys.stdin:
            times, stages = [], []
            for _ in range(int(line)):
                start = time.perf_counter()
                answer = service.infer(ref=ref, mm_per_px=0.2, image=payloads[served % len(payloads)])
                times.append((time.perf_counter() - start) * 1e3)
                stages.append(dict(answer.result.timings_ms))
                served += 1
            print(json.dumps({"ms": times, "stages": {k: float(np.median([s.get(k, 0.0) for s in stages]))
                                                      for k in stages[0]}}), flush=True)


# --------------------------------------------------------------------------------------------- driver


@dataclass
class Version:
    name: str  # "this tree" or the baseline commit
    src: Path
    process: subprocess.Popen[str] | None = None
    ready: dict[str, Any] | None = None

    def start(self, data: Path, backbone: str, threads: int) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BDI_", "BRAKEDISC_"))}
        env.update(PYTHONPATH=str(self.src), OMP_WAIT_POLICY="PASSIVE", BDI_THREADS=str(threads))
        self.process = subprocess.Popen([sys.executable, __file__, "--worker", "--data", str(data),
                                         "--backbone", backbone], env=env, cwd=self.src.parent, text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def answer(self) -> dict[str, Any]:
        assert self.process is not None and self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.name} worker exited with {self.process.wait()}")
        body: dict[str, Any] = json.loads(line)
        return body

    def time(self, repeats: int) -> dict[str, Any]:
        assert self.process is not None and self.process.stdin is not None
        self.process.stdin.write(f"{repeats}\n")
        self.process.stdin.flush()
        return self.answer()

    def stop(self) -> None:
        if self.process is not None:
            if self.process.stdin is not None:
                self.process.stdin.close()
            self.process.wait(timeout=60)


def baseline_src(commit: str, into: Path) -> Path:
    """The baseline's ``src`` unpacked under ``into`` (``git archive``: no worktree left behind)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "src"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into / "src"


def summarise(now: dict[str, Any], then: dict[str, Any], round_ratios: list[float]) -> dict[str, Any]:
    """p50 / p95 per version and the ratio of the p50s (this tree / baseline), with the per-round ratios."""
    def figures(runs: dict[str, Any]) -> dict[str, Any]:
        return {"p50": statistics.median(runs["ms"]), "p95": float(np.percentile(runs["ms"], 95)), "n": len(runs["ms"])}

    return {"this_tree": figures(now), "baseline": figures(then),
            "ratio_p50": statistics.median(now["ms"]) / statistics.median(then["ms"]),
            "round_ratio_median": statistics.median(round_ratios),
            "round_ratio_range": [min(round_ratios), max(round_ratios)]}


def markdown(report: dict[str, Any]) -> str:
    s, a = report["summary"], report["args"]
    stage_names = list(report["stages"]["this_tree"])
    lines = [
        "# `/infer` latency: this tree against an earlier commit (`python -m bench.infer_latency`)", "",
        f"finished {report['finished']}; command `{report['command']}`", "",
        f"data={a['data']}  backbone={a['backbone']} (official weights, every other setting the default)  "
        f"threads/process={a['threads']}  load average {report['load_before']:.1f} before, "
        f"{report['load_after']:.1f} after", "",
        f"{a['rounds']} rounds of {a['repeats']} single-image `InspectionService.infer` calls per version, "
        "alternating (order swapped each round):", "",
        "| version | runtime | p50 ms | p95 ms | calls |", "|---|---|---|---|---|",
    ]
    for key, label in (("baseline", f"baseline {a['baseline']}"), ("this_tree", f"this tree {report['head']}")):
        runtime = report["runtime"][key]
        lines.append(f"| {label} | {runtime.get('runtime', '?')} {runtime.get('runtime_precision', '')} | "
                     f"{s[key]['p50']:.1f} | {s[key]['p95']:.1f} | {s[key]['n']} |")
    lo, hi = s["round_ratio_range"]
    lines += ["", f"p50 ratio (this tree / baseline): **×{s['ratio_p50']:.2f}**; per round: median "
              f"×{s['round_ratio_median']:.2f}, range ×{lo:.2f}–×{hi:.2f}.", "",
              "Median stage times (ms, `timings_ms`):", "",
              "| version | " + " | ".join(stage_names) + " |", "|---|" + "---|" * len(stage_names)]
    for key in ("baseline", "this_tree"):
        stages = report["stages"][key]
        lines.append(f"| {key.replace('_', ' ')} | " + " | ".join(f"{stages.get(n, 0.0):.1f}" for n in stage_names)
                     + " |")
    return "\n".join(lines) + "\n"


def _head() -> str:
    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()


def run(args: argparse.Namespace) -> dict[str, Any]:
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bdi-latency-baseline-") as tmp:
        versions = {"this_tree": Version("this tree", ROOT / "src"),
                    "baseline": Version(args.baseline, baseline_src(args.baseline, Path(tmp)))}
        try:
            for version in versions.values():  # one at a time: fits would otherwise share the cores
                version.start(args.data, args.backbone, args.threads)
                version.ready = version.answer()
                print(f"{version.name}: ready, bdi from {version.ready['library']}, {version.ready['runtime']}",
                      flush=True)
            runs: dict[str, dict[str, Any]] = {key: {"ms": [], "stages": []} for key in versions}
            round_ratios = []
            for index in range(args.rounds):
                order = ["this_tree", "baseline"] if index % 2 == 0 else ["baseline", "this_tree"]
                this_round = {key: versions[key].time(args.repeats) for key in order}
                for key, answer in this_round.items():
                    runs[key]["ms"] += answer["ms"]
                    runs[key]["stages"].append(answer["stages"])
                now, then = (statistics.median(this_round[key]["ms"]) for key in ("this_tree", "baseline"))
                ratio = now / then
                round_ratios.append(ratio)
                print(f"round {index + 1}/{args.rounds}: ×{ratio:.2f}", flush=True)
        finally:
            for version in versions.values():
                version.stop()
    stages = {key: {name: statistics.median(s[name] for s in runs[key]["stages"] if name in s)
                    for name in runs[key]["stages"][0]} for key in runs}
    return {
        "finished": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python -m bench.infer_latency", *sys.argv[1:]]),
        "head": _head(), "load_before": load_before, "load_after": os.getloadavg()[0],
        "args": {"baseline": args.baseline, "data": str(args.data), "backbone": args.backbone,
                 "rounds": args.rounds, "repeats": args.repeats, "threads": args.threads},
        "runtime": {key: (versions[key].ready or {}).get("runtime", {}) for key in versions},
        "library": {key: (versions[key].ready or {}).get("library") for key in versions},
        "summary": summarise(runs["this_tree"], runs["baseline"], round_ratios),
        "stages": stages, "ms": {key: runs[key]["ms"] for key in runs},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="d4fdec5",
                        help="the commit to compare with (default: the quality run of 2026-12-02, 44 ms p50)")
    parser.add_argument("--data", type=Path, default=MAGNETIC_TILE, help="an MVTec-layout folder")
    parser.add_argument("--backbone", default=CNN)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per version per round")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads per worker (BDI_THREADS)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.data, args.backbone)
        return 0
    if not (args.data / "train" / "good").is_dir():
        parser.error(f"{args.data} has no train/good: pass --data <an MVTec-layout folder>")
    report = run(args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "infer_latency.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    text = markdown(report)
    (args.out_dir / "infer_latency.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
