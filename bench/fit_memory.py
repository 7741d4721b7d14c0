"""Peak RSS of a dataset fit for N images: `python -m bench.fit_memory` (default N = 50 and 400).

Each N runs in a fresh subprocess: N seeded synthetic discs (448 px, PNG) are stored as OK samples,
then ``InspectionService.fit_ok(use_dataset=True)`` fits them, the /fit_ok code path (files read and
decoded lazily, encoded in batches, the coreset fed by ``memory.MemoryBuilder``). The child reports
its peak RSS (``ru_maxrss``) before and after the fit. The model is the tests' tiny ViT (depth 4,
112 px input, random init): the real ViT-S/14 at 448 px takes minutes per 100 images on 2 CPU cores,
and memory is what is measured here. For scale, the float32 patch rows of all N images (what the
fit used to concatenate, then copy twice) are printed beside.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

TINY = {"model": {"features": {"weights": "random", "input_size": 112, "blocks": (1, 2, 3), "depth": 4,
                               "device": "cpu"}}}


def _prepare(n_images: int, models_dir: Path) -> None:
    """Store N seeded 448 px discs as OK samples of REF (like N uploads)."""
    import cv2
    import numpy as np

    from bdi.data.synthetic import make_disc
    from bdi.refs import DatasetRef
    from bdi.storage.datasets import DatasetStore, UploadItem
    from bench.run import REF

    rng = np.random.default_rng(0)
    items = []
    for i in range(n_images):
        ok, png = cv2.imencode(".png", make_disc(size=448, rng=rng).image)
        assert ok
        items.append(UploadItem(data=png.tobytes(), client_filename=f"{i}.png", meta={"mm_per_px": 0.2}))
    ref = DatasetRef(recipe_id=REF.recipe_id, role_id=REF.role_id, roi_id=REF.roi_id)
    DatasetStore(models_dir).save(ref, "ok", items)


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _child(n_images: int, models_dir: Path) -> dict[str, float]:
    import torch

    from bdi.config import Settings
    from bdi.service import InspectionService
    from bench.run import REF

    torch.set_num_threads(2)
    settings = Settings(models_dir=models_dir, weights_cache_dir=models_dir.parent / "weights", min_ok_samples=1,
                        max_dataset_images=max(1000, n_images), **TINY)  # type: ignore[arg-type]
    service = InspectionService.from_settings(settings)
    before = _rss_mib()
    result = service.fit_ok(ref=REF, mm_per_px=0.2, use_dataset=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "n_images": n_images,
        "rss_before_fit_mib": before,
        "peak_rss_mib": peak,
        "fit_peak_growth_mib": peak - before,
        "all_rows_float32_mib": result.n_embeddings * service.extractor.embed_dim * 4 / 2**20,
        "bank_mib": result.coreset_size * service.extractor.embed_dim * 4 / 2**20,
        "encode_s": result.timings_ms.get("encode", 0.0) / 1e3,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="*", default=[50, 400], help="image counts, one subprocess each")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--models-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(_child(args.child, Path(args.models_dir))))
        return 0
    print("fit peak RSS (tiny ViT, 448 px PNG discs from the dataset store, one subprocess per N)")
    rows = []
    for n in args.n:
        with tempfile.TemporaryDirectory(prefix="bdi-bench-mem-") as tmp:
            _prepare(n, Path(tmp) / "models")
            out = subprocess.run([sys.executable, "-m", "bench.fit_memory", "--child", str(n), "--models-dir",
                                  str(Path(tmp) / "models")], check=True, capture_output=True, text=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    for r in rows:
        print(f"  N={r['n_images']:4d}  peak RSS {r['peak_rss_mib']:7.1f} MiB"
              f"  (before the fit {r['rss_before_fit_mib']:6.1f}, growth {r['fit_peak_growth_mib']:6.1f})"
              f"   all float32 rows {r['all_rows_float32_mib']:6.1f} MiB, bank {r['bank_mib']:5.1f} MiB,"
              f" encode {r['encode_s']:.1f} s")
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        growth = b["fit_peak_growth_mib"] / a["fit_peak_growth_mib"]
        print(f"  {b['n_images']} vs {a['n_images']} images: fit growth x{growth:.2f},"
              f" all float32 rows x{b['all_rows_float32_mib'] / a['all_rows_float32_mib']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
