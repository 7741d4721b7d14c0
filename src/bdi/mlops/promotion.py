"""Promotion that cannot break a line: the alias moves only when a registered version passes a gate.

The gate (:class:`PromotionGate`, configuration: the pipeline's ``promotion`` section, or ``bdi
promote`` flags) checks, for one registered version against the current alias holder:

* ``primary_metric``: the candidate's primary metric (``image_auroc``) is not below the holder's;
* ``false_reject_rate``: its false-reject rate at the calibrated threshold is within a limit;
* ``review_rate``: the share of its evaluation parts its OK / review / NG band sends to human review is within a
  limit (off by default; 0 for a calibration without a band);
* ``infer_latency``: the median ``/infer`` latency over the golden images is within a budget, with the load of
  the machine divided out (:func:`machine_load_factor`, measured in the same process before every call) and
  repeated up to ``LATENCY_ROUNDS`` times before refusing (:func:`probe_until_within`), so a loaded machine does
  not refuse a good model;
* ``export_parity``: the golden images, scored through the serving path (the registered artefact
  downloaded as the sync does, loaded by a ``ModelStore`` and scored by ``InspectionService.infer``,
  the call behind ``/infer``), match the scores the pipeline computed within ``parity_eps``.

Metrics come from the version's ``metric.<name>`` tags (logged at registration). The golden images are
logged inside the version's artefact (``golden/golden.json`` + image files, written by the register
stage with :func:`write_golden_set`), so :func:`promote_version` can run the whole gate anywhere the
registry is reachable, e.g. on the line's own hardware for a binding latency figure. A check whose limit
is ``None`` is disabled (reported as passed). Rollback is moving the alias back: ``promote_version(...,
gate=None)`` (``bdi promote --skip-gate``).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from bdi.errors import InvalidInputError, StorageError
from bdi.logging import slog
from bdi.mlops.tracking import TrackingTarget, global_tracking_uri
from bdi.storage.fsio import atomic_write_bytes, atomic_write_json

GOLDEN_DIR = "golden"
GOLDEN_INDEX = "golden.json"
GATE_TAG_PREFIX = "gate."


@dataclass(frozen=True)
class PromotionGate:
    """The promotion rule. ``None`` disables a check."""

    primary_metric: str = "image_auroc"
    max_false_reject_rate: float | None = 0.05
    max_infer_latency_ms: float | None = 1000.0
    parity_eps: float | None = 1e-3
    max_review_rate: float | None = None  # share of evaluation parts sent to review by the band (None: no check)

    def __post_init__(self) -> None:
        for name in ("max_false_reject_rate", "max_infer_latency_ms", "parity_eps", "max_review_rate"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise InvalidInputError(f"promotion gate {name} must be >= 0 or null, got {value}")


@dataclass(frozen=True)
class GoldenImage:
    """One image scored by the pipeline, re-scored through the serving path by the gate."""

    file: str  # file name inside golden/
    expected_score: float  # the pipeline's score (evaluate stage)
    mm_per_px: float
    shape: str | None = None  # the ROI shape JSON the pipeline scored with; None = the whole image
    source: str = ""  # where the pipeline read it (manifest path), for people


@dataclass(frozen=True)
class GateCheck:
    name: str
    passed: bool
    value: float | None
    limit: float | None
    detail: str


@dataclass(frozen=True)
class GateReport:
    checks: tuple[GateCheck, ...]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def failures(self) -> list[GateCheck]:
        return [c for c in self.checks if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "checks": [asdict(c) for c in self.checks]}

    def tags(self) -> dict[str, str]:
        """``gate.passed`` and one ``gate.<check>`` tag per check, for the model version."""
        out = {f"{GATE_TAG_PREFIX}passed": str(self.passed).lower()}
        out.update({f"{GATE_TAG_PREFIX}{c.name}": f"{'pass' if c.passed else 'FAIL'}: {c.detail}"[:500]
                    for c in self.checks})
        return out


@dataclass(frozen=True)
class ServingProbe:
    """Golden images scored through the serving path: scores and per-call latencies (ms).

    ``load_factors``: per call, how much slower than its own CPU time a fixed single-thread reference ran just
    before it in this process (wall / thread CPU time, ≥ 1; :func:`machine_load_factor`): about 1 on an idle
    machine, about (busy threads) / (cores) on a loaded one. The latency check divides each call by it, so
    other processes' load does not count against the model. ``rounds``: how many probes were taken (the gate
    repeats a failing latency before refusing, keeping the best round).
    """

    scores: list[float]
    latencies_ms: list[float]
    expected: list[float] = field(default_factory=list)
    load_factors: list[float] = field(default_factory=list)
    rounds: int = 1

    @property
    def median_latency_ms(self) -> float | None:
        return statistics.median(self.latencies_ms) if self.latencies_ms else None

    @property
    def median_load_factor(self) -> float:
        return statistics.median(self.load_factors) if self.load_factors else 1.0

    @property
    def adjusted_latency_ms(self) -> float | None:
        """The median of the calls' latencies each divided by its load factor: the model's own cost."""
        if not self.latencies_ms:
            return None
        factors = self.load_factors or [1.0] * len(self.latencies_ms)
        return statistics.median(t / f for t, f in zip(self.latencies_ms, factors, strict=True))

    @property
    def max_abs_diff(self) -> float | None:
        if not self.scores:
            return None
        return max(abs(a - b) for a, b in zip(self.scores, self.expected, strict=True))


@dataclass(frozen=True)
class PromotionResult:
    name: str
    version: int
    alias: str
    moved: bool
    previous_version: int | None
    report: GateReport | None  # None: the gate was skipped (rollback / forced)


# ----------------------------------------------------------------------------------------- golden set


def write_golden_set(model_dir: Path, items: Sequence[tuple[bytes, str, GoldenImage]]) -> Path:
    """Write ``(image bytes, file extension, record)`` items into ``<model_dir>/golden/`` with an index;
    the records' ``file`` names are replaced by ``<i><ext>``. Returns the index path."""
    folder = Path(model_dir) / GOLDEN_DIR
    records = []
    for i, (data, ext, record) in enumerate(items):
        name = f"{i:03d}{ext if ext.startswith('.') else '.' + ext}"
        atomic_write_bytes(folder / name, data)
        records.append({**asdict(record), "file": name})
    index = folder / GOLDEN_INDEX
    atomic_write_json(index, {"images": records}, indent=2)
    return index


def read_golden_set(model_dir: Path) -> list[tuple[bytes, GoldenImage]]:
    """The golden images logged with a version (``[]`` when it has none)."""
    index = Path(model_dir) / GOLDEN_DIR / GOLDEN_INDEX
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, json.JSONDecodeError) as exc:
        raise StorageError(f"unreadable golden set {index}: {exc}") from exc
    out = []
    for entry in data.get("images", []):
        record = GoldenImage(file=str(entry["file"]), expected_score=float(entry["expected_score"]),
                             mm_per_px=float(entry["mm_per_px"]), shape=entry.get("shape") or None,
                             source=str(entry.get("source", "")))
        out.append(((index.parent / record.file).read_bytes(), record))
    return out


# ----------------------------------------------------------------------------------------- the checks


def probe_serving_path(model_dir: Path, *, overrides: Mapping[str, Any] | None = None) -> ServingProbe:
    """Score the golden images of a downloaded version through ``InspectionService.infer`` (the call
    behind ``/infer``), on the backbone the memory records; one warm-up call is not timed."""
    from bdi.config import Settings
    from bdi.mlops.pyfunc import ModelDirPredictor
    from bdi.service import InspectionService

    golden = read_golden_set(model_dir)
    if not golden:
        return ServingProbe(scores=[], latencies_ms=[])
    predictor = ModelDirPredictor(model_dir, overrides=overrides)
    extractor, ref = predictor.model.extractor, predictor.ref
    settings = Settings(models_dir=model_dir, model={"features": extractor.config})
    service = InspectionService(settings=settings, extractor=extractor, store=predictor.store)
    first_bytes, first = golden[0]
    service.infer(ref=ref, mm_per_px=first.mm_per_px, image=first_bytes, shape=first.shape, include_heatmap=False)
    scores, latencies, factors = [], [], []
    for data, record in golden:
        factors.append(machine_load_factor())
        started = time.perf_counter()
        outcome = service.infer(ref=ref, mm_per_px=record.mm_per_px, image=data, shape=record.shape,
                                include_heatmap=False)
        latencies.append((time.perf_counter() - started) * 1e3)
        scores.append(float(outcome.result.score))
    return ServingProbe(scores=scores, latencies_ms=latencies, expected=[r.expected_score for _, r in golden],
                        load_factors=factors)


REFERENCE_CPU_S = 0.02  # CPU time the load reference spins for


def machine_load_factor(cpu_s: float = REFERENCE_CPU_S) -> float:
    """Wall time / thread CPU time of a fixed single-thread busy loop run now, in this process: ≥ 1, about 1
    when a core is free, about N/cores when N threads compete for the cores (the scheduler shares them)."""
    wall0, cpu0 = time.perf_counter(), time.thread_time()
    while time.thread_time() - cpu0 < cpu_s:
        sum(range(2000))
    wall, cpu = time.perf_counter() - wall0, time.thread_time() - cpu0
    return max(1.0, wall / cpu) if cpu > 0 else 1.0


LATENCY_ROUNDS = 3  # probes taken at most when the latency is over its budget; the best one counts


def probe_until_within(
    model_dir: Path, *, limit_ms: float | None, overrides: Mapping[str, Any] | None = None,
    rounds: int = LATENCY_ROUNDS,
) -> ServingProbe:
    """:func:`probe_serving_path`, repeated (up to ``rounds``) while its load-adjusted latency is over
    ``limit_ms``; returns the round with the lowest adjusted latency, so a passing model is not refused for
    a burst of load, and a slow one is refused only after every round was slow."""
    best = probe_serving_path(model_dir, overrides=overrides)
    taken = 1
    while (limit_ms is not None and taken < rounds and best.adjusted_latency_ms is not None
           and best.adjusted_latency_ms > limit_ms):
        probe = probe_serving_path(model_dir, overrides=overrides)
        taken += 1
        if probe.adjusted_latency_ms is not None and probe.adjusted_latency_ms < best.adjusted_latency_ms:
            best = probe
    return replace(best, rounds=taken)


def evaluate_gate(
    gate: PromotionGate,
    *,
    candidate: Mapping[str, float],
    holder: Mapping[str, float] | None,
    probe: ServingProbe,
) -> GateReport:
    """Apply ``gate`` to the candidate's metrics, the holder's (None: no holder) and the serving probe."""
    checks: list[GateCheck] = []
    metric = gate.primary_metric
    value = candidate.get(metric)
    held = holder.get(metric) if holder is not None else None
    if value is None:
        checks.append(GateCheck(metric, False, None, held, f"the candidate records no {metric}"))
    elif held is None:
        checks.append(GateCheck(metric, True, value, None, f"{metric} {value:.6g}; no holder to compare with"))
    else:
        checks.append(GateCheck(metric, value >= held, value, held,
                                f"{metric} {value:.6g} vs holder {held:.6g} (must not be below)"))
    checks.append(_limit_check("false_reject_rate", candidate.get("false_reject_rate"), gate.max_false_reject_rate,
                               missing="the candidate records no false_reject_rate"))
    if gate.max_review_rate is not None:
        checks.append(_limit_check("review_rate", candidate.get("review_rate"), gate.max_review_rate,
                                   missing="the candidate records no review_rate",
                                   what="share of evaluation parts sent to review"))
    no_golden = "no golden images were logged with this version"
    checks.append(_latency_check(probe, gate.max_infer_latency_ms, missing=no_golden))
    checks.append(_limit_check("export_parity", probe.max_abs_diff, gate.parity_eps, missing=no_golden,
                               what="max |served score - pipeline score|"))
    return GateReport(checks=tuple(checks))


def _latency_check(probe: ServingProbe, limit: float | None, *, missing: str) -> GateCheck:
    """The median /infer latency with the machine's load divided out (``ServingProbe.adjusted_latency_ms``);
    the detail gives the raw figure, the load factor and the rounds, and says when the model itself is slow."""
    value = probe.adjusted_latency_ms
    what = f"median /infer over {len(probe.latencies_ms)} images"
    if limit is None or value is None:
        return _limit_check("infer_latency_ms", value, limit, missing=missing, what=what)
    raw, load = probe.median_latency_ms, probe.median_load_factor
    measured = (f"{what}: {raw:.6g} ms measured, {value:.6g} ms with the machine's load (x{load:.2f}, measured "
                f"in-process) divided out, best of {probe.rounds} round(s)")
    if value <= limit:
        return GateCheck("infer_latency_ms", True, value, limit, f"{measured} (limit {limit:.6g})")
    return GateCheck("infer_latency_ms", False, value, limit,
                     f"{measured} > limit {limit:.6g}: the model itself is too slow on this machine")


def _limit_check(name: str, value: float | None, limit: float | None, *, missing: str, what: str = "") -> GateCheck:
    label = what or name
    if limit is None:
        return GateCheck(name, True, value, None, f"{label}: check disabled")
    if value is None:
        return GateCheck(name, False, None, limit, missing)
    return GateCheck(name, value <= limit, value, limit, f"{label} {value:.6g} (limit {limit:.6g})")


# ----------------------------------------------------------------------------------------- promote


def _metrics_from_tags(tags: Mapping[str, str]) -> dict[str, float]:
    from bdi.mlops.registration import METRIC_TAG_PREFIX, finite_float

    out: dict[str, float] = {}
    for key, raw in tags.items():
        if key.startswith(METRIC_TAG_PREFIX):
            try:
                value = finite_float(float(raw))
            except ValueError:
                continue
            if value is not None:
                out[key[len(METRIC_TAG_PREFIX):]] = value
    return out


def promote_version(
    *,
    tracking: TrackingTarget,
    name: str,
    version: int,
    gate: PromotionGate | None,
    overrides: Mapping[str, Any] | None = None,
) -> PromotionResult:
    """Move ``tracking.alias`` of ``name`` to ``version`` when it passes ``gate`` (None: move unconditionally,
    e.g. a rollback). The report is tagged on the version (``gate.*``) and logged.

    ``overrides``: the pyfunc ``model_config`` keys (weights file, device …) for the serving probe.

    Raises:
        StorageError: MLflow unreachable, or the version does not exist.
    """
    from bdi.mlops.registration import alias_holder, download_version, mlflow_errors

    uri = tracking.tracking_uri
    with mlflow_errors("promotion"), global_tracking_uri(uri):
        client = tracking.client()
        candidate = client.get_model_version(name, str(version))
        holder = alias_holder(client, name, tracking.alias)
        previous = int(holder.version) if holder is not None else None
        report: GateReport | None = None
        if gate is not None:
            with tempfile.TemporaryDirectory(prefix="bdi-promote-") as tmp:
                model_dir = download_version(name=name, version=version, uri=uri, dest=Path(tmp))
                probe = probe_until_within(model_dir, limit_ms=gate.max_infer_latency_ms, overrides=overrides)
            holder_metrics = (_metrics_from_tags(holder.tags or {})
                              if holder is not None and int(holder.version) != version else None)
            report = evaluate_gate(gate, candidate=_metrics_from_tags(candidate.tags or {}), holder=holder_metrics,
                                   probe=probe)
            for key, value in report.tags().items():
                client.set_model_version_tag(name, str(version), key, value)
        moved = report is None or report.passed
        if moved:
            client.set_registered_model_alias(name, tracking.alias, str(version))
        slog("registry.promotion", name=name, version=version, alias=tracking.alias, moved=moved,
             previous_version=previous, gate=report.to_dict() if report is not None else "skipped")
        return PromotionResult(name=name, version=version, alias=tracking.alias, moved=moved, previous_version=previous,
                               report=report)
