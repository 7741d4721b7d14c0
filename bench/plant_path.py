"""The plant's calibration path over HTTP, both halves in turn: `python -m bench.plant_path` (issue 29 "Measured
the way a plant calibrates").

Against a real server (``python -m serving`` on 127.0.0.1, every setting its default but the backbone, ``--backbone``,
the pretrained CNN by default, with its official weights):
  1. ``POST /fit_ok`` with the train/good images (uploaded with the request, as a plant fits on its good parts);
  2. fold 1: the calib half's parts uploaded as OK / NG dataset samples (``/datasets/{ok,ng}/upload``),
     ``POST /calibrate_dataset`` with its defaults, then every part of the eval half through ``POST /infer``;
     escapes (NG decided ok), false rejects (OK decided ng) and parts sent to review (``review: true``) counted;
  3. fold 2: the samples cleared (``DELETE /datasets/clear``), the halves swapped, the same again.
The halves are ``bdi.data.splits.split_mvtec``'s (the pipeline's). Writes ``bench/results/plant_path.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bdi.backbones import BACKBONES, PRETRAINED_CNN
from bdi.data.metrics import image_auroc
from bdi.data.mvtec import MvtecItem, read_mvtec
from bdi.data.splits import CALIB, CALIB_FRACTION, EVAL, TRAIN, split_mvtec

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
MAGNETIC_TILE = ROOT.parent / "shared" / "data" / "magnetic_tile"
ROLE, ROI, MM_PER_PX = "Inspection", "plant-path", 0.2
IDS = {"role_id": ROLE, "roi_id": ROI}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(*, env: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """``python -m serving`` on a free port with ``env`` over this process's environment (BDI_* dropped)."""
    port = _free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("BDI_", "BRAKEDISC_"))}
    full = {**base, **env, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
    with log.open("ab") as sink:
        process = subprocess.Popen([sys.executable, "-m", "serving", "--port", str(port), "--log-level", "warning"],
                                   env=full, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}: see {log}")
        try:
            if httpx.get(f"{url}/health", timeout=5.0).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    process.terminate()
    raise RuntimeError("the server did not answer /health in 900 s")


def _check(response: httpx.Response, what: str) -> dict[str, Any]:
    if response.status_code != 200:
        raise RuntimeError(f"{what}: {response.status_code} {response.text[:300]}")
    body: dict[str, Any] = response.json()
    return body


def fit(client: httpx.Client, items: Sequence[MvtecItem]) -> dict[str, Any]:
    files = [("images", (item.path.name, item.path.read_bytes(), "image/png")) for item in items]
    data = {**IDS, "mm_per_px": str(MM_PER_PX)}
    return _check(client.post("/fit_ok", data=data, files=files), "/fit_ok")


def upload(client: httpx.Client, items: Sequence[MvtecItem]) -> None:
    meta = json.dumps({"mm_per_px": MM_PER_PX})
    for item in items:
        files = [("images", (item.path.name, item.path.read_bytes(), "image/png"))]
        _check(client.post(f"/datasets/{item.label}/upload", data={**IDS, "metas": [meta]}, files=files),
               f"upload {item.path.name}")


def clear(client: httpx.Client) -> None:
    for label in ("ok", "ng"):
        _check(client.delete("/datasets/clear", params={**IDS, "label": label}), f"clear {label}")


def decide(client: httpx.Client, items: Sequence[MvtecItem]) -> list[dict[str, Any]]:
    out = []
    for item in items:
        files = {"image": (item.path.name, item.path.read_bytes(), "image/png")}
        started = time.perf_counter()
        body = _check(client.post("/infer", data={**IDS, "mm_per_px": str(MM_PER_PX), "include_heatmap": "false"},
                                  files=files), f"/infer {item.path.name}")
        out.append({"file": item.path.name, "label": item.label, "defect_class": item.defect_class,
                    "score": body["score"], "decision": body["decision"], "review": body.get("review", False),
                    "ms": (time.perf_counter() - started) * 1e3})
    return out


def count(decisions: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Escapes, false rejects and reviews of one reporting half (decisions as ``/infer`` gave them)."""
    ok = [d for d in decisions if d["label"] == "ok"]
    ng = [d for d in decisions if d["label"] == "ng"]
    escapes = sum(d["decision"] == "ok" for d in ng)
    false_rejects = sum(d["decision"] == "ng" for d in ok)
    reviews = sum(bool(d["review"]) for d in decisions)
    auto_false_rejects = sum(d["decision"] == "ng" and not d["review"] for d in ok)
    labels = [1 if d["label"] == "ng" else 0 for d in decisions]
    return {
        "n_ok": len(ok), "n_ng": len(ng), "escapes": escapes, "false_rejects": false_rejects, "reviews": reviews,
        "escape_rate": escapes / len(ng) if ng else None,
        "false_reject_rate": false_rejects / len(ok) if ok else None,
        "false_reject_rate_unreviewed": auto_false_rejects / len(ok) if ok else None,
        "review_share": reviews / len(decisions) if decisions else None,
        "image_auroc": image_auroc(labels, [d["score"] for d in decisions]),
        "infer_p50_ms": float(np.median([d["ms"] for d in decisions])) if decisions else None,
    }


def run(root: Path, *, backbone: str, work: Path) -> dict[str, Any]:
    items = read_mvtec(root)
    parts: dict[str, list[MvtecItem]] = {TRAIN: [], CALIB: [], EVAL: []}
    for item, split in zip(items, split_mvtec(items, calib_fraction=CALIB_FRACTION), strict=True):
        parts[split].append(item)
    env = {"BDI_BACKBONE": backbone, "BDI_WEIGHTS": "official", "BDI_MODELS_DIR": str(work / "models"),
           "BDI_GUI_LOG_DIR": str(work / "logs")}
    process, url = start_server(env=env, log=work / "server.log")
    try:
        with httpx.Client(base_url=url, timeout=900.0) as client:
            health = client.get("/health").json()
            started = time.perf_counter()
            fitted = fit(client, parts[TRAIN])
            fit_s = time.perf_counter() - started
            folds: list[dict[str, Any]] = []
            for name, calib_half, report_half in (("fold 1", CALIB, EVAL), ("fold 2", EVAL, CALIB)):
                clear(client)
                upload(client, parts[calib_half])
                calibration = _check(client.post("/calibrate_dataset", json={**IDS}), "/calibrate_dataset")
                decisions = decide(client, parts[report_half])
                folds.append({"fold": name, "calibrate_on": calib_half, "report_on": report_half,
                              "calibration": calibration, "counts": count(decisions), "decisions": decisions})
                print(f"{name}: {folds[-1]['counts']}", flush=True)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
    keys = ("escape_rate", "false_reject_rate", "false_reject_rate_unreviewed", "review_share", "image_auroc")
    mean = {k: float(np.mean([f["counts"][k] for f in folds])) if all(f["counts"][k] is not None for f in folds)
            else None for k in keys}
    return {"backbone": backbone, "health": {k: health.get(k) for k in ("model", "backbone", "runtime",
                                                                        "runtime_precision",
                                                                        "runtime_precision_choice")},
            "fit": {"wall_s": fit_s, **{k: fitted[k] for k in ("n_embeddings", "coreset_size")}},
            "counts": {split: len(v) for split, v in parts.items()}, "folds": folds, "mean": mean}


def _pct(value: Any) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def render(results: dict[str, Any]) -> str:
    r = results["result"]
    lines = [
        "# The plant's calibration path over HTTP", "",
        f"`{results['command']}` ({results['created_utc']}, {results['wall_s']:.0f} s wall). Server: every setting "
        f"its default but `BDI_BACKBONE={r['backbone']}`, `BDI_WEIGHTS=official`; it ran {r['health']['runtime']} "
        f"{r['health']['runtime_precision']} ({r['health'].get('runtime_precision_choice')}). Fit: `/fit_ok` with "
        f"the {r['counts'][TRAIN]} train/good images in {r['fit']['wall_s']:.0f} s. Each fold uploads one test half "
        "as OK/NG samples, calls `/calibrate_dataset` with its defaults and `/infer`s the other half.", "",
        "| fold | threshold | band [low, high) | escapes | false rejects (of them unreviewed) | to review "
        "| image AUROC "
        "| /infer p50 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for f in r["folds"]:
        c, cal = f["counts"], f["calibration"]
        band = (f"[{cal['threshold_low']:.4g}, {cal['threshold_high']:.4g})" if "threshold_low" in cal else "none")
        lines.append(f"| {f['fold']} (calibrate on {f['calibrate_on']}, report on {f['report_on']}) | "
                     f"{cal['threshold']:.4g} | {band} | {c['escapes']}/{c['n_ng']} ({_pct(c['escape_rate'])}) | "
                     f"{c['false_rejects']}/{c['n_ok']} ({_pct(c['false_reject_rate'])}; "
                     f"{_pct(c['false_reject_rate_unreviewed'])}) | {c['reviews']}/{c['n_ok'] + c['n_ng']} "
                     f"({_pct(c['review_share'])}) | {c['image_auroc']:.3f} | {c['infer_p50_ms']:.0f} |")
    m = r["mean"]
    lines += [f"| mean | | | {_pct(m['escape_rate'])} | {_pct(m['false_reject_rate'])} "
              f"({_pct(m['false_reject_rate_unreviewed'])}) | {_pct(m['review_share'])} | "
              f"{m['image_auroc']:.3f} | |", "",
              "A part sent to review is decided `ng` (the fail-safe default, `BDI_REVIEW_DECISION`), so it counts as "
              "a false reject when it is OK; 'unreviewed' counts only the OK parts rejected outside the band.", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.plant_path", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=MAGNETIC_TILE, help="MVTec-layout folder")
    parser.add_argument("--backbone", choices=sorted(BACKBONES), default=PRETRAINED_CNN)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--stem", default="plant_path")
    args = parser.parse_args(argv)
    command = "python -m bench.plant_path" + "".join(f" {shlex.quote(a)}" for a in (argv if argv is not None
                                                                                     else sys.argv[1:]))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bdi-plant-") as tmp:
        result = run(args.data, backbone=args.backbone, work=Path(tmp))
    results = {"command": command, "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "wall_s": time.perf_counter() - started, "result": result}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    md = args.out_dir / f"{args.stem}.md"
    md.write_text(render(results), encoding="utf-8")
    (args.out_dir / f"{args.stem}.json").write_text(json.dumps(results, indent=2, allow_nan=False) + "\n",
                                                    encoding="utf-8")
    print(md.read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
