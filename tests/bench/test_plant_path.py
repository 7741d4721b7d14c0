"""The plant-path benchmark (bench.plant_path, issue 29) counts what /infer decided: escapes, false rejects (with and
without the reviewed parts) and reviews, per fold and their mean."""

from __future__ import annotations

import pytest

from bench.plant_path import count, render


def _d(label: str, decision: str, review: bool, score: float) -> dict[str, object]:
    return {"file": "x.png", "label": label, "defect_class": "good" if label == "ok" else "crack", "score": score,
            "decision": decision, "review": review, "ms": 10.0}


DECISIONS = [_d("ok", "ok", False, 0.1), _d("ok", "ng", True, 0.5), _d("ok", "ng", False, 0.9),
             _d("ng", "ok", False, 0.2), _d("ng", "ng", True, 0.6), _d("ng", "ng", False, 1.0)]


def test_count_escapes_false_rejects_and_reviews() -> None:
    c = count(DECISIONS)
    assert (c["escapes"], c["false_rejects"], c["reviews"]) == (1, 2, 2)
    assert c["escape_rate"] == pytest.approx(1 / 3) and c["false_reject_rate"] == pytest.approx(2 / 3)
    assert c["false_reject_rate_unreviewed"] == pytest.approx(1 / 3)  # the reviewed OK part is not counted
    assert c["review_share"] == pytest.approx(2 / 6)
    assert c["image_auroc"] == pytest.approx(6 / 9)  # NG over OK in 6 of the 9 pairs


def test_render_shows_each_fold_and_the_mean() -> None:
    calibration = {"threshold": 0.55, "threshold_low": 0.4, "threshold_high": 0.8}
    fold = {"calibrate_on": "calib", "report_on": "eval", "calibration": calibration, "counts": count(DECISIONS)}
    result = {"backbone": "efficientnet_lite2", "counts": {"train": 60},
              "health": {"runtime": "torch", "runtime_precision": "fp32", "runtime_precision_choice": "auto"},
              "fit": {"wall_s": 12.0}, "folds": [{**fold, "fold": "fold 1"}, {**fold, "fold": "fold 2"}],
              "mean": {k: count(DECISIONS)[k] for k in ("escape_rate", "false_reject_rate",
                                                       "false_reject_rate_unreviewed", "review_share",
                                                       "image_auroc")}}
    text = render({"command": "python -m bench.plant_path", "created_utc": "now", "wall_s": 1.0, "result": result})
    assert "| fold 1 (calibrate on calib, report on eval) | 0.55 | [0.4, 0.8) | 1/3 (33.3 %) |" in text
    assert "| mean |" in text and "2/6 (33.3 %)" in text
