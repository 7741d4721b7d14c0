"""`/infer` over HTTP on each runtime, against BDI's torch path: `python -m bench.runtimes` (in `make bench`).

One run, same image and same weights for every server, real uvicorn on 127.0.0.1:
  1. per backbone (DINOv2 ViT-S/14 @448 with BDI_WEIGHTS or random init, and the pretrained CNN
     `bdi.backbones.PRETRAINED_CNN`), one model is fitted on magnetic-tile train images (fp32 torch) and
     calibrated, and its feature net exported and parity-checked once (`bdi.runtime.select.export_checked`, as
     `bdi export` does);
  2. latency: one server per mode (`MODES`: BDI_RUNTIME=torch | onnxruntime | openvino in fp32, and torch /
     openvino with BDI_PRECISION=bf16; 1 worker each), requests sent round-robin across the servers (so load
     from elsewhere hits them alike), p50/p95 of the client-side wall time of `POST /infer`, and the largest
     relative score difference from the torch fp32 server over the test images (score parity); a bf16 server
     whose parity check failed at start-up runs fp32 torch, and the table says so;
  3. fit: `POST /fit_ok` with the fit images on each latency server, round-robin (`--fit-repeats`), the
     client-side wall time (median) and the server's own stage times (`fit_ok.response` in the diagnostics log): how
     much of the runtime's speed-up a fit gets;
  4. throughput: torch and the fastest runtime, with 1 and 2 workers (threads divided among them:
     `Settings.intra_op_threads`), under a bounded loopback load (`--concurrency` clients, `--load-requests`
     requests), zero errors required.
Prints Markdown tables and writes them to `bench/results/runtimes.md` (the report in `runtimes.json`;
docs/benchmarks.md "Runtimes over HTTP"). Data: ../shared/data/magnetic_tile, else synthetic discs.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bdi.backbones import PRETRAINED_CNN, backbone_spec
from bdi.config import Settings
from bdi.data.mvtec import read_mvtec
from bdi.data.synthetic import write_mvtec_dataset
from bdi.logging import LOG_FILE_NAME
from bdi.patchcore.imaging import decode_image
from bdi.refs import ModelRef
from bdi.runtime.select import candidate_label, configure_threads, export_checked
from bdi.service import InspectionService

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SHARED_DATA = ROOT.parent / "shared" / "data" / "magnetic_tile"
REF = ModelRef.create(recipe_id="default", role_id="Inspection", roi_id="inspection-1", model_key=None)
MM_PER_PX = 0.2
# BDI_RUNTIME × BDI_PRECISION of the latency servers; torch fp32 (first) stands in for the reference backend
MODES = (("torch", "fp32"), ("onnxruntime", "fp32"), ("openvino", "fp32"), ("torch", "bf16"), ("openvino", "bf16"))


@dataclass
class Backbone:
    label: str
    env: dict[str, str]


@dataclass
class Server:
    runtime: str
    precision: str
    workers: int
    port: int
    process: subprocess.Popen[bytes]
    health: dict[str, Any] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)
    scores: dict[int, float] = field(default_factory=dict)
    fits: list[dict[str, float]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def mode(self) -> str:
        """``openvino``, ``openvino bf16``…: BDI_RUNTIME, and BDI_PRECISION where it is not fp32."""
        return self.runtime if self.precision == "fp32" else f"{self.runtime} {self.precision}"

    @property
    def parity_key(self) -> str:
        """The candidate's name in ``/health``'s ``runtime_parity``."""
        return candidate_label(self.runtime, self.precision)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start(runtime: str, precision: str, *, workers: int, env: dict[str, str], log: Path) -> Server:
    port = _free_port()
    full = {**os.environ, **env, "BDI_RUNTIME": runtime, "BDI_PRECISION": precision,
            "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
    full.pop("BDI_THREADS", None)  # the default: cores divided among workers
    with log.open("ab") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "serving", "--port", str(port), "--workers", str(workers), "--log-level", "warning"],
            env=full, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT,
        )
    return Server(runtime=runtime, precision=precision, workers=workers, port=port, process=process)


def _wait(server: Server, *, timeout_s: float = 600.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server {server.mode} exited with {server.process.returncode}")
        try:
            response = httpx.get(f"{server.url}/health", timeout=5.0)
            if response.status_code == 200:
                server.health = response.json()
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server {server.mode} did not answer /health within {timeout_s} s")


@contextmanager
def _servers(specs: list[tuple[str, str, int]], *, env: dict[str, str], log: Path) -> Iterator[list[Server]]:
    servers = [_start(runtime, precision, workers=workers, env=env, log=log) for runtime, precision, workers in specs]
    try:
        for server in servers:
            _wait(server)
        yield servers
    finally:
        for server in servers:
            server.process.terminate()
        for server in servers:
            try:
                server.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.process.kill()


def _infer(client: httpx.Client, server: Server, image: bytes) -> tuple[float, dict[str, Any]]:
    start = time.perf_counter()
    response = client.post(f"{server.url}/infer", data={"role_id": REF.role_id, "roi_id": REF.roi_id,
                                                        "mm_per_px": str(MM_PER_PX)},
                           files={"image": ("crop.png", image, "image/png")}, timeout=120.0)
    elapsed = (time.perf_counter() - start) * 1e3
    if response.status_code != 200:
        raise RuntimeError(f"/infer on {server.mode}: {response.status_code} {response.text[:200]}")
    return elapsed, response.json()


def _build_model(models_dir: Path, env: dict[str, str], *, train: list[np.ndarray], test: list[np.ndarray],
                 cache: Path, threads: int) -> dict[str, Any]:
    features = {"backbone": env["BDI_BACKBONE"], "weights": env["BDI_WEIGHTS"], "device": "cpu"}
    settings = Settings(models_dir=models_dir, model={"features": features}, runtime="torch",
                        weights_cache_dir=cache, min_ok_samples=1)
    service = InspectionService.from_settings(settings)
    started = time.perf_counter()
    service.fit_images(ref=REF, mm_per_px=MM_PER_PX, images=train)
    fit_s = time.perf_counter() - started
    scores = [r.score for r in service.score_images(ref=REF, images=test)]
    service.calibrate_from_scores(ref=REF, ok_scores=scores, ng_scores=None)
    started = time.perf_counter()
    export, reports = export_checked(service.extractor, root=settings.exports_dir(), threads=threads)
    return {"fit_s": fit_s, "export_s": time.perf_counter() - started, "export": str(export.path),
            "parity": {name: r.to_dict() for name, r in reports.items()}, "extractor": service.extractor.describe()}


def _latency(servers: list[Server], images: list[bytes], *, requests: int) -> None:
    with httpx.Client() as client:
        for server in servers:  # warm-up: allocations, first-request paths
            for image in images[:2]:
                _infer(client, server, image)
        for i in range(requests):
            order = servers[i % len(servers):] + servers[: i % len(servers)]
            for server in order:
                k = i % len(images)
                elapsed, body = _infer(client, server, images[k])
                server.latencies_ms.append(elapsed)
                server.scores[k] = float(body["score"])


def _fit_stages(log_file: Path, request_id: str) -> dict[str, float]:
    """The stage times (ms) the server logged for one ``/fit_ok``."""
    for line in log_file.read_text(encoding="utf-8").splitlines():
        event = json.loads(line)
        if event.get("event") == "fit_ok.response" and event.get("request_id") == request_id:
            return {k: float(v) for k, v in event["timings_ms"].items()}
    raise RuntimeError(f"no fit_ok.response logged for request {request_id} in {log_file}")


def _fits(servers: list[Server], images: list[bytes], *, repeats: int, log_file: Path) -> None:
    """``POST /fit_ok`` of ``images`` on every server, round-robin; appends wall, forward and coreset seconds.

    One untimed fit per server first: a fit's batch shape is new to a server that has only answered /infer.
    """
    files = [("images", (f"fit{i}.png", image, "image/png")) for i, image in enumerate(images)]
    with httpx.Client() as client:
        for i in range(-1, repeats):
            for server in servers[i % len(servers):] + servers[: i % len(servers)]:
                request_id = uuid.uuid4().hex
                start = time.perf_counter()
                response = client.post(f"{server.url}/fit_ok", data={"role_id": REF.role_id, "roi_id": "fit-bench",
                                                                     "mm_per_px": str(MM_PER_PX)},
                                       files=files, headers={"X-Request-Id": request_id}, timeout=600.0)
                wall_s = time.perf_counter() - start
                if response.status_code != 200:
                    raise RuntimeError(f"/fit_ok on {server.mode}: {response.status_code} {response.text[:200]}")
                if i < 0:
                    continue
                stages = _fit_stages(log_file, request_id)
                server.fits.append({"wall_s": wall_s, "forward_s": stages.get("forward", 0.0) / 1e3,
                                    "coreset_s": stages.get("coreset", 0.0) / 1e3})


def _throughput(server: Server, images: list[bytes], *, requests: int, concurrency: int) -> tuple[float, int]:
    def worker(indices: list[int]) -> int:
        errors = 0
        with httpx.Client() as client:
            for i in indices:
                try:
                    _infer(client, server, images[i % len(images)])
                except (RuntimeError, httpx.HTTPError):
                    errors += 1
        return errors

    with httpx.Client() as client:
        _infer(client, server, images[0])
    chunks = [list(range(c, requests, concurrency)) for c in range(concurrency)]
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        errors = sum(pool.map(worker, chunks))
    return requests / (time.perf_counter() - started), errors


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default="vit,cnn", help="comma-separated: vit, cnn")
    parser.add_argument("--n-fit", type=int, default=10)
    parser.add_argument("--requests", type=int, default=30, help="latency requests per server")
    parser.add_argument("--fit-repeats", type=int, default=5, help="timed /fit_ok calls per server")
    parser.add_argument("--load-requests", type=int, default=24, help="throughput requests per configuration")
    parser.add_argument("--concurrency", type=int, default=4, help="concurrent loopback clients")
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="where runtimes.md and runtimes.json go")
    args = parser.parse_args(argv)
    lines: list[str] = []

    def emit(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    threads = Settings().intra_op_threads()
    configure_threads(threads)
    work = Path(tempfile.mkdtemp(prefix="bdi-bench-runtimes-"))
    data = SHARED_DATA if SHARED_DATA.is_dir() else write_mvtec_dataset(work / "data", n_train=args.n_fit, size=256)
    items = read_mvtec(data)
    train_bytes = [i.path.read_bytes() for i in items if i.split == "train"][: args.n_fit]
    train = [decode_image(raw) for raw in train_bytes]
    test_items = [i for i in items if i.split == "test"][:6]
    test_images = [decode_image(i.path.read_bytes()) for i in test_items]
    test_bytes = [i.path.read_bytes() for i in test_items]
    vit_weights = os.environ.get("BDI_WEIGHTS", "random")
    backbones = {
        "vit": Backbone(f"DINOv2 ViT-S/14 @448 ({vit_weights})",
                        {"BDI_BACKBONE": "vit_small_patch14_dinov2", "BDI_WEIGHTS": vit_weights}),
        "cnn": Backbone(f"{PRETRAINED_CNN} @{backbone_spec(PRETRAINED_CNN).input_size} (official, pretrained)",
                        {"BDI_BACKBONE": PRETRAINED_CNN, "BDI_WEIGHTS": "official"}),
    }
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    emit(f"data={data}  cpus={os.cpu_count()}  threads/process={threads}  load average at start "
          f"{load[0]:.1f}  python={sys.version.split()[0]}")
    report: dict[str, Any] = {}
    for key in [b.strip() for b in args.backbones.split(",") if b.strip()]:
        backbone = backbones[key]
        models_dir, cache = work / key / "models", work / key / "cache"
        env = {**backbone.env, "BDI_MODELS_DIR": str(models_dir), "BDI_WEIGHTS_CACHE_DIR": str(cache),
               "BDI_DEVICE": "cpu", "BDI_GUI_LOG_DIR": str(work / key / "logs"), "WEB_CONCURRENCY": "1"}
        built = _build_model(models_dir, env, train=train, test=test_images, cache=cache, threads=threads)
        emit(f"\n{backbone.label}: fit {len(train)} images {built['fit_s']:.1f} s; export + parity on "
              f"{len(built['parity'])} runtimes {built['export_s']:.1f} s -> {built['export']}")
        log = work / key / "servers.log"
        with _servers([(rt, precision, 1) for rt, precision in MODES], env=env, log=log) as servers:
            _latency(servers, test_bytes, requests=args.requests)
            _fits(servers, train_bytes, repeats=args.fit_repeats,
                  log_file=Path(env["BDI_GUI_LOG_DIR"]) / LOG_FILE_NAME)
        torch_server = servers[0]
        rows: list[dict[str, Any]] = []
        for server in servers:
            rel = max(abs(server.scores[k] - torch_server.scores[k]) / abs(torch_server.scores[k])
                      for k in torch_server.scores)
            rows.append({
                "mode": server.mode, "runtime": server.runtime, "precision": server.precision,
                "active": f"{server.health.get('runtime')} {server.health.get('runtime_precision')}",
                "fallback": server.health.get("runtime_fallback"),
                "p50": _pct(server.latencies_ms, 50), "p95": _pct(server.latencies_ms, 95),
                "score_rel_diff": rel, "parity": (server.health.get("runtime_parity") or {}).get(server.parity_key),
                "fit": {k: _pct([f[k] for f in server.fits], 50) for k in ("wall_s", "forward_s", "coreset_s")},
            })
        torch_p50 = rows[0]["p50"]
        emit(f"\n/infer over HTTP, 1 worker each, {args.requests} round-robin requests per server "
              f"({len(test_bytes)} crops):\n")
        emit("| BDI_RUNTIME, BDI_PRECISION (what runs) | p50 ms | p95 ms | p50 vs torch | max score diff vs torch "
              "(rel) | parity at load: features / scores (rel) |")
        emit("|---|---|---|---|---|---|")
        for row in rows:
            parity = row["parity"] or {}
            figures = (f"{parity['feature_rel_err']:.1e} / {parity['score_rel_err']:.1e}"
                       if parity.get("feature_rel_err") is not None else "—")
            emit(f"| {row['mode']} ({row['active']}) | {row['p50']:.0f} | {row['p95']:.0f} | "
                  f"x{row['p50'] / torch_p50:.2f} | {row['score_rel_diff']:.1e} | {figures} |")
        torch_fit = rows[0]["fit"]
        emit(f"\nfit over HTTP: `POST /fit_ok` with the {len(train_bytes)} fit images, median of "
             f"{args.fit_repeats} round-robin calls per server; forward and coreset as the server logged them:\n")
        emit("| BDI_RUNTIME, BDI_PRECISION (what runs) | fit s | fit vs torch | forward s | forward vs torch | "
             "coreset s |")
        emit("|---|---|---|---|---|---|")
        for row in rows:
            fit = row["fit"]
            emit(f"| {row['mode']} ({row['active']}) | {fit['wall_s']:.2f} | "
                 f"x{fit['wall_s'] / torch_fit['wall_s']:.2f} | {fit['forward_s']:.2f} | "
                 f"x{fit['forward_s'] / torch_fit['forward_s']:.2f} | {fit['coreset_s']:.2f} |")
        used = [r for r in rows[1:] if r["active"] == f"{r['runtime']} {r['precision']}"]  # parity passed
        fastest = min(used, key=lambda r: r["p50"], default=None)
        load_specs = [("torch", "fp32", 1), ("torch", "fp32", 2)]
        if fastest is not None:
            load_specs += [(fastest["runtime"], fastest["precision"], 1), (fastest["runtime"], fastest["precision"], 2)]
        emit(f"\nthroughput, {args.load_requests} requests from {args.concurrency} concurrent loopback clients:\n")
        emit("| runtime | workers × threads | requests/s | errors |")
        emit("|---|---|---|---|")
        throughput = []
        for runtime, precision, workers in load_specs:
            with _servers([(runtime, precision, workers)], env={**env, "WEB_CONCURRENCY": str(workers)},
                          log=log) as (server,):
                rps, errors = _throughput(server, test_bytes, requests=args.load_requests,
                                          concurrency=args.concurrency)
            per_worker = max(1, (os.cpu_count() or 1) // workers)
            emit(f"| {server.mode} | {workers} × {per_worker} | {rps:.2f} | {errors} |")
            throughput.append({"mode": server.mode, "workers": workers, "rps": rps, "errors": errors})
        report[key] = {"label": backbone.label, "built": built, "latency": rows, "throughput": throughput}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    command = "python -m bench.runtimes" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    finished = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = f"# Runtimes: `/infer` over HTTP (`{command}`)\n\nfinished {finished}\n\n"
    (args.out_dir / "runtimes.md").write_text(header + "\n".join(lines) + "\n", encoding="utf-8")
    (args.out_dir / "runtimes.json").write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"\nwrote {args.out_dir / 'runtimes.md'} and runtimes.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
