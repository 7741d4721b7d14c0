"""One-command CPU benchmark: `make bench` (or `python -m bench.run`).

Measures, side by side in one run, on the real DINOv2 ViT-S/14 architecture at 448 px:
  * fit time for N OK images (encode / coreset / index) — the figure docs/benchmarks.md quotes;
  * single-crop /infer latency through `InspectionService.infer`, fp32 vs bf16 autocast, with the
    largest score difference between the two (what bf16 costs in accuracy);
  * batched ViT extraction vs one image per forward pass (the reference backend never batches);
  * greedy coreset: the reference's NumPy loop vs ours, exact and on the random-projection default
    (time and covering radius).
Weights: BDI_WEIGHTS if set, else deterministic random init (timings do not depend on the values).
Data: ../shared/data/magnetic_tile when present, else synthetic discs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bdi.config import Settings
from bdi.data.mvtec import read_mvtec
from bdi.data.synthetic import write_mvtec_dataset
from bdi.patchcore.coreset import coreset_size, covering_radius, greedy_k_center
from bdi.patchcore.imaging import decode_image
from bdi.patchcore.memory import l2_normalize
from bdi.refs import ModelRef
from bdi.service import InspectionService
from bench.baselines import reference_greedy_k_center

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "magnetic_tile"
REF = ModelRef.create(recipe_id="default", role_id="Inspection", roi_id="inspection-1", model_key=None)


def _images(root: Path, split: str, n: int) -> list[tuple[np.ndarray, bytes]]:
    items = [i for i in read_mvtec(root) if i.split == split][:n]
    return [(decode_image(i.path.read_bytes()), i.path.read_bytes()) for i in items]


def _median_ms(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-fit", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="bdi-bench-"))
    data = SHARED_DATA if SHARED_DATA.is_dir() else write_mvtec_dataset(work / "data", n_train=args.n_fit, size=256)
    weights = os.environ.get("BDI_WEIGHTS", "random")
    print(f"data={data}  weights={weights}  threads={args.threads}  torch={torch.__version__}")

    def settings(precision: str) -> Settings:
        return Settings(models_dir=work / "models", min_ok_samples=1, runtime="torch",
                        model={"features": {"weights": weights, "device": "cpu", "precision": precision}})

    fp32 = InspectionService.from_settings(settings("fp32"))
    bf16_settings = settings("bf16")
    bf16 = InspectionService(
        settings=bf16_settings,
        extractor=type(fp32.extractor)(bf16_settings.model.features, cache_dir=fp32.settings.weights_cache_dir),
        store=fp32.store, datasets=fp32.datasets,
    )
    train = _images(data, "train", args.n_fit)
    test = _images(data, "test", 8)

    # 1. fit
    start = time.perf_counter()
    fit = fp32.fit_images(ref=REF, mm_per_px=0.2, images=[im for im, _ in train])
    fit_s = time.perf_counter() - start
    stages = ", ".join(f"{k} {v / 1e3:.1f} s" for k, v in fit.timings_ms.items())
    print(f"\nfit {len(train)} images @448 fp32: {fit_s:.1f} s  ({stages}); "
          f"{fit.n_embeddings} patches -> {fit.coreset_size}")
    scores = [r.score for r in fp32.score_images(ref=REF, images=[im for im, _ in test])]
    fp32.calibrate_from_scores(ref=REF, ok_scores=scores, ng_scores=None)

    # 2. infer latency fp32 vs bf16
    crop = test[0][1]
    lat = {name: _median_ms(lambda s=svc: s.infer(ref=REF, mm_per_px=0.2, image=crop, include_heatmap=True),
                            args.repeats) for name, svc in (("fp32", fp32), ("bf16", bf16))}
    crops = [im for im, _ in test]
    pairs = zip(fp32.score_images(ref=REF, images=crops), bf16.score_images(ref=REF, images=crops), strict=True)
    diffs = [abs(a.score - b.score) for a, b in pairs]
    print(f"\n/infer latency, 1 crop @448, median of {args.repeats}:")
    print(f"  fp32 {lat['fp32']:.0f} ms   bf16 {lat['bf16']:.0f} ms   speed-up x{lat['fp32'] / lat['bf16']:.2f}")
    print(f"  max |score_fp32 - score_bf16| over {len(diffs)} crops: {max(diffs):.5f} "
          f"(scores ~{statistics.mean(scores):.3f})")

    # 3. batched extraction (ours) vs one image per forward pass (the reference backend's design)
    crops = [im for im, _ in train[:8]]
    one_by_one = _median_ms(lambda: [fp32.extractor.extract([c]) for c in crops], max(1, args.repeats // 5))
    batched = _median_ms(lambda: fp32.extractor.extract(crops), max(1, args.repeats // 5))
    print(f"\nencode {len(crops)} crops: one per pass {one_by_one:.0f} ms   batched (8) {batched:.0f} ms   "
          f"speed-up x{one_by_one / batched:.2f}")

    # 4. coreset: the reference's NumPy greedy vs ours (exact, and on the default projection)
    batch = fp32.extractor.extract([im for im, _ in train[:10]])
    rows = l2_normalize(batch.embeddings.reshape(-1, batch.embeddings.shape[-1]))
    size = coreset_size(rows.shape[0], 0.1)
    timed: dict[str, tuple[float, float]] = {}
    runs = (
        ("reference-numpy", lambda: reference_greedy_k_center(rows, size)),
        ("exact", lambda: greedy_k_center(rows, size=size, seed=0, projection_dim=0)),
        ("projected-128", lambda: greedy_k_center(rows, size=size, seed=0, projection_dim=128)),
    )
    for name, select in runs:
        start = time.perf_counter()
        idx = select()
        timed[name] = (time.perf_counter() - start, covering_radius(rows, rows[idx]))
    (tr, rr), (te, re_), (tp, rp) = timed["reference-numpy"], timed["exact"], timed["projected-128"]
    print(f"\ncoreset {rows.shape[0]}x{rows.shape[1]} -> {size}:")
    print(f"  reference numpy {tr:.2f} s (radius {rr:.4f})   exact {te:.2f} s (radius {re_:.4f})   "
          f"projected-128 {tp:.2f} s (radius {rp:.4f})")
    print(f"  exact vs reference x{tr / te:.1f}   projected vs reference x{tr / tp:.1f}   "
          f"projected radius / exact radius {rp / re_:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
