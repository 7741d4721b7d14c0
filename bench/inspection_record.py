"""What the inspection record costs /infer: `python -m bench.inspection_record` (docs/benchmarks.md).

One process, one feature extractor, two services over the same fitted and calibrated model: one records every
decision (``inspections_record`` on, images kept too with ``--store-images``), the other does not. The /infer use
case (decode, mask, features, scoring, decision; recording after it) runs on seeded synthetic discs, the two
services alternating call by call so that both see the same machine load; the p50 of each and the overhead of the
record are printed, and the record's own cost (statistics, hash, write) is timed apart. HTTP is left out: it adds
the same to both and would only hide the difference. The default model is efficientnet_lite0 (pretrained, 224 px
crops), a realistic CPU /infer; ``--tiny`` uses the tests' tiny ViT (a faster /infer, so a larger share).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

TINY = {"weights": "random", "input_size": 112, "blocks": (1, 2, 3), "depth": 4, "device": "cpu"}
MM_PER_PX = 0.2


def _discs(n: int, size: int, seed: int) -> list[bytes]:
    import cv2
    import numpy as np

    from bdi.data.synthetic import make_disc

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ok, png = cv2.imencode(".png", make_disc(size=size, rng=rng).image)
        assert ok
        out.append(png.tobytes())
    return out


def run(*, n: int, size: int, tiny: bool, store_images: bool, threads: int) -> dict[str, Any]:
    import torch

    from bdi.config import Settings
    from bdi.monitoring.record import inspections_dir, read_records
    from bdi.patchcore.features import FeatureExtractor
    from bdi.refs import ModelRef
    from bdi.service import InspectionService

    torch.set_num_threads(threads)
    root = Path(tempfile.mkdtemp(prefix="bdi-bench-record-"))
    features: dict[str, Any] = dict(TINY) if tiny else {"backbone": "efficientnet_lite0", "device": "cpu"}
    base = {"models_dir": root / "models", "model": {"features": features}, "min_ok_samples": 1,
            "weights_cache_dir": Path.home() / ".cache" / "bdi", "runtime": "torch", "threads": threads}
    on = Settings(**base, inspections_record=True, inspections_store_images=store_images)
    off = Settings(**base, inspections_record=False)
    extractor = FeatureExtractor(on.model.features, cache_dir=on.weights_cache_dir)
    recording = InspectionService(settings=on, extractor=extractor)
    plain = InspectionService(settings=off, extractor=extractor)
    ref = ModelRef.create(recipe_id=None, role_id="Inspection", roi_id="bench", model_key=None)
    plain.fit_ok(ref=ref, mm_per_px=MM_PER_PX, images=[(f"{i}.png", b) for i, b in enumerate(_discs(10, size, 0))])
    plain.calibrate_from_scores(ref=ref, ok_scores=[1e9], ng_scores=None)
    crops = _discs(n, size, 1)
    for image in crops[:5]:  # warm-up: caches, allocator, the first segment file
        recording.infer(ref=ref, mm_per_px=MM_PER_PX, image=image)
        plain.infer(ref=ref, mm_per_px=MM_PER_PX, image=image)
    times: dict[str, list[float]] = {"on": [], "off": []}
    for i, image in enumerate(crops):
        order = (("on", recording), ("off", plain)) if i % 2 == 0 else (("off", plain), ("on", recording))
        for name, service in order:
            start = time.perf_counter()
            service.infer(ref=ref, mm_per_px=MM_PER_PX, image=image)
            times[name].append((time.perf_counter() - start) * 1000)
    record_ms = _record_cost(crops[:50], recording)
    p50_on, p50_off = statistics.median(times["on"]), statistics.median(times["off"])
    # the same crop on both sides, back to back: the median paired difference shrugs off load bursts that land
    # on one side's calls more than the difference of the two medians does
    paired = statistics.median(a - b for a, b in zip(times["on"], times["off"], strict=True))
    n_records = len(read_records(inspections_dir(on.models_dir)))
    return {"model": "tiny ViT (112 px)" if tiny else "efficientnet_lite0 (224 px)", "crop_px": size, "n": n,
            "threads": threads, "store_images": store_images, "p50_ms_off": p50_off, "p50_ms_on": p50_on,
            "overhead_pct": 100.0 * (p50_on - p50_off) / p50_off, "paired_diff_ms_p50": paired,
            "paired_overhead_pct": 100.0 * paired / p50_off, "record_only_ms_p50": record_ms,
            "record_only_pct_of_p50": 100.0 * record_ms / p50_off, "records_written": n_records}


def _record_cost(crops: list[bytes], service: Any) -> float:
    """p50 of the record alone (statistics, sha256, one write), given one answered outcome per crop."""
    from bdi.refs import ModelRef
    from bdi.service.recording import record_inference

    ref = ModelRef.create(recipe_id=None, role_id="Inspection", roi_id="bench", model_key=None)
    log = service.inspection_log
    out = []
    for image in crops:
        outcome = service.infer(ref=ref, mm_per_px=MM_PER_PX, image=image)
        crop = service._ctx.decode(image, name="image")  # noqa: SLF001 - the decoded crop the use case had
        start = time.perf_counter()
        record_inference(log, ref=ref, image=image, crop=crop, mm_per_px=MM_PER_PX, outcome=outcome)
        out.append((time.perf_counter() - start) * 1000)
    return statistics.median(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200, help="crops per side")
    parser.add_argument("--size", type=int, default=448, help="crop side in px (the record's statistics "
                                                              "downscale it to 128)")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny ViT instead of efficientnet_lite0")
    parser.add_argument("--store-images", action="store_true", help="keep each image with its record")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="also write the result as JSON here")
    args = parser.parse_args(argv)
    result = run(n=args.n, size=args.size, tiny=args.tiny, store_images=args.store_images, threads=args.threads)
    line = (f"/infer p50 over {result['n']} crops of {result['crop_px']} px, {result['model']}, "
            f"{result['threads']} threads: record off {result['p50_ms_off']:.2f} ms, on "
            f"{result['p50_ms_on']:.2f} ms ({result['overhead_pct']:+.2f} %), paired median difference "
            f"{result['paired_diff_ms_p50']:+.3f} ms ({result['paired_overhead_pct']:+.2f} %); the record alone "
            f"{result['record_only_ms_p50']:.3f} ms = {result['record_only_pct_of_p50']:.2f} % of p50")
    print(line)  # noqa: T201 - a benchmark's one line of output
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
