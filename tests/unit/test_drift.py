"""Drift statistics per ROI (bdi.monitoring.drift) and the persisted status (bdi.monitoring.drift_state): seeded
samples from the reference's distribution never warn; a shifted brightness, a lost sharpness or higher scores are
alarms named for their cause; ``since`` holds while the status holds."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from bdi.monitoring.drift import ALARM, INSUFFICIENT, NO_REFERENCE, OK, evaluate_roi, metrics_rows, psi
from bdi.monitoring.drift_state import STATE_FILE, DriftStateReader, persist_statuses
from bdi.monitoring.record import InspectionRecord

IDS = {"recipe_id": "default", "role_id": "Inspection", "roi_id": "roi-1", "model_key": "roi-1"}


def _reference(rng: np.random.Generator, n: int = 300) -> dict[str, list[float]]:
    return {"score": list(rng.normal(5.0, 0.5, n)), "brightness": list(rng.normal(120.0, 4.0, n)),
            "contrast": list(rng.normal(40.0, 2.0, n)), "sharpness": list(rng.normal(300.0, 20.0, n))}


def _live(rng: np.random.Generator, n: int, *, brightness: float = 0.0, sharpness: float = 1.0,
          score: float = 0.0, gain: float = 1.0) -> list[InspectionRecord]:
    out = []
    for i in range(n):
        s = float(rng.normal(5.0 + score, 0.5))
        out.append(InspectionRecord(
            id=str(i), ts=f"2026-01-01T00:00:00.{i:06d}Z", request_id=None, **IDS, memory_fingerprint="fp",
            registered_model=None, registered_version=None, registered_alias=None, score=s, threshold=6.5,
            decision="ng" if s >= 6.5 else "ok", mm_per_px=0.2, n_regions=0, largest_region_mm2=None,
            image_sha256="0" * 64, image_bytes=1, width=1, height=1,
            brightness=float(rng.normal(120.0 + brightness, 4.0)), contrast=float(rng.normal(40.0, 2.0)) * gain,
            sharpness=float(rng.normal(300.0, 20.0)) * sharpness * gain**2))
    return out


def _evaluate(live: list[InspectionRecord], reference: dict[str, list[float]] | None) -> object:
    return evaluate_roi(ids=IDS, memory_fingerprint="fp", reference=reference, calibrated_ng_rate=0.01, live=live,
                        min_count=30)


def test_windows_of_the_reference_distribution_never_warn() -> None:
    for seed in range(40):
        rng = np.random.default_rng(seed)
        drift = _evaluate(_live(rng, 200), _reference(rng))
        assert drift.status == OK, (seed, drift)  # type: ignore[attr-defined]


def test_a_brighter_window_is_a_lighting_alarm_and_a_blurred_one_a_focus_alarm() -> None:
    rng = np.random.default_rng(1)
    reference = _reference(rng)
    lighting = _evaluate(_live(rng, 200, brightness=15.0), reference)
    assert (lighting.status, lighting.cause) == (ALARM, "lighting")  # type: ignore[attr-defined]
    focus = _evaluate(_live(rng, 200, sharpness=0.5), reference)
    assert (focus.status, focus.cause) == (ALARM, "focus")  # type: ignore[attr-defined]
    gain = _evaluate(_live(rng, 200, gain=1.3), reference)  # more light: contrast x1.3, Laplacian variance x1.69
    assert (gain.status, gain.cause) == (ALARM, "lighting")  # type: ignore[attr-defined]
    scores = _evaluate(_live(rng, 200, score=1.5), reference)
    assert (scores.status, scores.cause) == (ALARM, "score")  # type: ignore[attr-defined]
    assert scores.ng_rate.status == ALARM and scores.ng_rate.live > 0.3  # type: ignore[attr-defined]


def test_no_reference_and_too_few_records_are_not_evaluated() -> None:
    rng = np.random.default_rng(2)
    assert _evaluate(_live(rng, 200), None).status == NO_REFERENCE  # type: ignore[attr-defined]
    assert _evaluate(_live(rng, 10), _reference(rng)).status == INSUFFICIENT  # type: ignore[attr-defined]


def test_psi_is_zero_for_the_same_sample_and_large_for_a_shift() -> None:
    values = np.random.default_rng(3).normal(size=1000)
    assert psi(values, values) < 1e-9
    assert psi(values, values + 1.0) > 0.25


def test_since_holds_while_the_status_holds_and_health_sees_alarms(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    reference = _reference(rng)
    ok = evaluate_roi(ids=IDS, memory_fingerprint="fp", reference=reference, calibrated_ng_rate=0.01,
                      live=_live(rng, 100), min_count=30)
    reader = DriftStateReader(tmp_path)
    (first,) = persist_statuses(tmp_path, [ok], now="2026-01-01T00:00:00.000000Z")
    written = (tmp_path / STATE_FILE).stat().st_ino
    (again,) = persist_statuses(tmp_path, [ok], now="2026-01-02T00:00:00.000000Z")
    assert (tmp_path / STATE_FILE).stat().st_ino == written  # unchanged status: the file is not rewritten
    assert first.since == again.since == "2026-01-01T00:00:00.000000Z"
    assert reader.alarms() == []
    alarm = replace(ok, status=ALARM, cause="lighting")
    (raised,) = persist_statuses(tmp_path, [alarm], now="2026-01-03T00:00:00.000000Z")
    assert raised.since == "2026-01-03T00:00:00.000000Z"
    (warning,) = reader.alarms()
    assert warning["cause"] == "lighting" and warning["roi_id"] == "roi-1"


def test_metrics_rows_feed_the_drift_gauges_of_evaluated_models_only() -> None:
    from serving.metrics.exposition import drift_families

    rng = np.random.default_rng(5)
    alarm = _evaluate(_live(rng, 200, brightness=15.0), _reference(rng))
    unevaluated = _evaluate(_live(rng, 200), None)
    status, statistic = drift_families(metrics_rows([alarm, unevaluated]))  # type: ignore[list-item]
    assert [(s.labels["roi_id"], s.value) for s in status.samples] == [("roi-1", 2.0)]
    values = {s.labels["statistic"]: s.value for s in statistic.samples}
    assert values["brightness_psi"] > 0.25 and "ng_rate_live" in values
