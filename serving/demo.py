"""`make run`: build a demo model, then serve it with uvicorn.

Data: ``../shared/data/magnetic_tile`` when present (real surface images), otherwise a seeded
synthetic brake-disc set written by ``bdi.synthetic``. Weights: ``BDI_WEIGHTS`` when set; otherwise
the demo selects ``random`` explicitly and says so (pretrained weights cannot be downloaded offline).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from bdi.config import Settings
from bdi.datasets import MvtecItem, read_mvtec
from bdi.errors import ImageDecodeError
from bdi.imaging import decode_image
from bdi.service import InspectionService
from bdi.store import ModelRef
from bdi.synthetic import write_mvtec_dataset

ROLE_ID, ROI_ID, MM_PER_PX = "Inspection", "inspection-1", 0.2
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "magnetic_tile"


def _dataset_root(work_dir: Path) -> Path:
    if SHARED_DATA.is_dir():
        return SHARED_DATA
    return write_mvtec_dataset(work_dir / "synthetic_discs", n_train=20, n_test_good=6, size=256, seed=0)


def build_demo_model(settings: Settings, *, data_root: Path, n_train: int) -> tuple[ModelRef, Path]:
    """Fit on train/good, calibrate on test/*; returns the model ref and one NG test image."""
    service = InspectionService.from_settings(settings)
    ref = ModelRef.create(recipe_id="default", role_id=ROLE_ID, roi_id=ROI_ID, model_key=None)
    items = read_mvtec(data_root)
    train = [i for i in items if i.split == "train"][:n_train]
    test = [i for i in items if i.split == "test"]

    def load(item: MvtecItem) -> np.ndarray:
        return decode_image(item.path.read_bytes(), name=item.path.name)

    with tqdm(total=len(train), desc="fit: encode", unit="img") as bar:
        def on_fit_progress(stage: str, done: int, total: int) -> None:
            if stage == "encode":
                bar.update(done - bar.n)

        service.store.lock_mm_per_px(ref.recipe_id, MM_PER_PX)
        fit = service.fit_images(ref=ref, images=[load(i) for i in train], progress=on_fit_progress)
    print(f"fitted {fit.n_images} images: {fit.n_embeddings} patches -> coreset {fit.coreset_size}")

    results = service.score_images(ref=ref, images=[load(i) for i in test])
    ok = [r.score for r, i in zip(results, test, strict=True) if i.label == "ok"]
    ng = [r.score for r, i in zip(results, test, strict=True) if i.label == "ng"]
    calib = service.calibrate_from_scores(ref=ref, ok_scores=ok, ng_scores=ng, mm_per_px=MM_PER_PX)
    print(f"calibrated on {len(ok)} OK / {len(ng)} NG: threshold {calib['threshold']:.4f}")
    worst_ng = max((r.score, i.path) for r, i in zip(results, test, strict=True) if i.label == "ng")[1]
    return ref, worst_ng


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n-train", type=int, default=20, help="OK images to fit on")
    parser.add_argument("--no-serve", action="store_true", help="build the model and exit")
    args = parser.parse_args(argv)

    if not os.environ.get("BDI_WEIGHTS"):
        os.environ["BDI_WEIGHTS"] = "random"
        print("BDI_WEIGHTS not set: the demo uses deterministic random-init weights (BDI_WEIGHTS=random).")
        print("  Set BDI_WEIGHTS=/path/to/dinov2_vits14_pretrain.pth for meaningful scores.")
    os.environ.setdefault("BDI_MODELS_DIR", "models")
    settings = Settings()
    data_root = _dataset_root(settings.models_dir.parent / "demo-data")
    print(f"data: {data_root}")
    _, sample = build_demo_model(settings, data_root=data_root, n_train=args.n_train)
    sample_png = settings.models_dir / "demo_sample.png"
    sample_image = cv2.imread(str(sample))
    if sample_image is None:  # it was decoded while building the model, so this is not expected
        raise ImageDecodeError(f"cannot read the demo sample {sample}")
    cv2.imwrite(str(sample_png), sample_image)

    base = f"http://{settings.backend_host}:{settings.backend_port}"
    print("\nTry:")
    print(f"  curl -s {base}/health")
    print(
        f"  curl -s -F role_id={ROLE_ID} -F roi_id={ROI_ID} -F mm_per_px={MM_PER_PX} "
        f"-F image=@{sample_png} {base}/infer\n"
    )
    if args.no_serve:
        return 0
    return subprocess.call([sys.executable, "-m", "serving"])


if __name__ == "__main__":
    raise SystemExit(main())
