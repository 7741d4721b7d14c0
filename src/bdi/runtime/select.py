"""Choose what runs the feature net (``BDI_RUNTIME``), prove it with the parity check, and say so.

``attach_runtime`` is called once per process, right after the extractor is built (server lifespan,
pipeline stage, CLI). For ``onnxruntime``/``openvino`` it finds the export of this extractor in the
exports root (``<BDI_WEIGHTS_CACHE_DIR>/exports/<key>``), writing it first when missing, opens the
runtime, and runs the parity check (``bdi.runtime.parity``) on it: only a runtime that passes is attached
(``FeatureExtractor.use_runtime``). Any failure (not installed, export impossible, load error, parity
outside the tolerance) leaves torch in place, with a WARNING on the ``bdi.runtime`` logger, a
``runtime.fallback`` diagnostics event and ``/health`` reporting ``runtime_fallback``.

``auto`` (the default) checks every installed runtime and keeps the fastest of those that pass and
torch itself, timed on the same golden images: the fastest one that passes parity on this machine.

``configure_threads`` gives torch, FAISS and OpenCV the process's intra-op thread budget; runners get
the same number (``Settings.intra_op_threads``: the CPU cores divided among the server's workers).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, get_args

from bdi.config import RuntimeName
from bdi.errors import ExportError
from bdi.logging import slog
from bdi.patchcore.features import FeatureExtractor, TorchRunner
from bdi.runtime.export import (
    CHOICE_FILE,
    Export,
    export_key,
    export_lock,
    load_export,
    read_runtime_choice,
    record_parity,
    record_runtime_choice,
    write_export,
)
from bdi.runtime.parity import GoldenReference, ParityReport, ParityTolerance, check_parity, golden_reference
from bdi.runtime.runners import RUNTIMES, Runner, RuntimeOptions, open_runtime, runtime_installed

Candidate = Runner | TorchRunner
RUNTIME_SETTINGS: tuple[RuntimeName, ...] = get_args(RuntimeName)  # auto, torch, then the exported runtimes
assert set(RUNTIME_SETTINGS) == {"auto", "torch", *RUNTIMES}

_log = logging.getLogger("bdi.runtime")


@dataclass(frozen=True)
class RuntimeStatus:
    """Which runtime runs the feature net, and why (``/health``, the ``startup`` event, the bench).

    Attributes:
        requested: the ``BDI_RUNTIME`` value.
        active: ``torch``, ``onnxruntime`` or ``openvino``: what runs now.
        reason: why ``active`` was chosen, in words.
        fallback: set when torch runs because the requested runtime failed (not installed, no export, load
            error, parity outside the tolerance); None otherwise.
        parity: runtime name → report of the check made at load.
    """

    requested: str
    active: str
    reason: str
    threads: int
    fallback: str | None = None
    export_key: str | None = None
    export_path: str | None = None
    parity: dict[str, ParityReport] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    choice: dict[str, Any] | None = None  # auto: the choice recorded with the export (runtime_choice.json)

    def to_dict(self) -> dict[str, Any]:
        return {
            "requested": self.requested, "active": self.active, "reason": self.reason, "threads": self.threads,
            "fallback": self.fallback, "export_key": self.export_key, "export_path": self.export_path,
            "parity": {name: report.to_dict() for name, report in self.parity.items()}, "details": self.details,
            "choice": self.choice,
        }


    def health(self) -> dict[str, Any]:
        """The ``/health`` fields: the runtime in use, the one asked for, why not (fallback) and parity figures."""
        return {
            "runtime": self.active,
            "runtime_precision": self.details.get("precision", "fp32"),
            "runtime_requested": self.requested,
            "runtime_fallback": self.fallback,
            "runtime_choice": self.choice,
            "runtime_parity": {
                name: {"passed": r.passed, "feature_rel_err": r.feature_rel_err, "score_rel_err": r.score_rel_err}
                for name, r in self.parity.items()
            },
        }


def current_status(extractor: FeatureExtractor, *, threads: int) -> RuntimeStatus:
    """The status of an extractor whose runtime its owner set (no check made here)."""
    return RuntimeStatus(requested=extractor.runtime, active=extractor.runtime, threads=threads,
                         reason="set by the caller" if extractor.runtime != "torch" else "torch")


def configure_threads(threads: int) -> None:
    """Set the intra-op thread count of torch, FAISS (OpenMP) and OpenCV for this process."""
    import importlib

    import cv2
    import torch

    from bdi.patchcore.knn import FAISS_AVAILABLE

    threads = max(1, int(threads))
    torch.set_num_threads(threads)
    cv2.setNumThreads(threads)
    if FAISS_AVAILABLE:
        faiss = importlib.import_module("faiss")
        if hasattr(faiss, "omp_set_num_threads"):
            faiss.omp_set_num_threads(threads)


def runtime_options(extractor: FeatureExtractor, *, threads: int) -> RuntimeOptions:
    return RuntimeOptions(threads=threads, device=extractor.device, precision=extractor.precision)


def ensure_export(extractor: FeatureExtractor, *, root: Path) -> Export:
    """The valid export of ``extractor`` in ``root``, written first when missing or invalid (under a lock).

    Raises:
        ExportError: the export cannot be written (exporter failure, read-only folder, lock timeout).
    """
    signature = extractor.signature()
    key = export_key(signature)
    folder = Path(root) / key
    try:
        return load_export(folder, signature=signature)
    except ExportError:
        pass
    with export_lock(Path(root), key):
        try:
            return load_export(folder, signature=signature)  # another process wrote it meanwhile
        except ExportError as exc:
            if folder.exists():
                _log.warning("re-exporting %s: %s", folder, exc)
        try:
            export = write_export(extractor, folder)
        except OSError as exc:
            raise ExportError(f"cannot write the export to {folder}: {exc}") from exc
        slog("runtime.exported", export_key=key, path=str(folder), files=sorted(export.manifest.files))
        return export


def candidate_label(runtime: str, precision: str) -> str:
    """A candidate's name in parity reports and ``/health``: ``openvino``, ``openvino-bf16``, ``torch-bf16``…"""
    return runtime if precision == "fp32" else f"{runtime}-{precision}"


def _open(name: str, export: Export, *, reference: GoldenReference, options: RuntimeOptions) -> Runner | ParityReport:
    """The runner of ``name`` on ``export``, or the failed report saying why it cannot run."""
    try:
        return open_runtime(name, export, options=options)
    except ExportError as exc:
        return ParityReport(runtime=name, passed=False, error=str(exc), torch_ms=reference.torch_ms)


def _check(name: str, export: Export, *, reference: GoldenReference, options: RuntimeOptions,
           tolerance: ParityTolerance | None) -> tuple[Runner | None, ParityReport]:
    opened = _open(name, export, reference=reference, options=options)
    if isinstance(opened, ParityReport):
        return None, opened
    return opened, check_parity(reference, opened, tolerance=tolerance)


def export_checked(
    extractor: FeatureExtractor,
    *,
    root: Path,
    threads: int,
    runtimes: Sequence[str] | None = None,
    tolerance: ParityTolerance | None = None,
) -> tuple[Export, dict[str, ParityReport]]:
    """Export ``extractor`` into ``root`` (when not there yet), check parity on ``runtimes`` (default: every
    installed one) and record the reports in ``export.json``. ``bdi export`` and the register stage.

    Raises:
        ExportError: the export failed, no runtime is installed, or none passes the parity check.
    """
    names = [n for n in (runtimes or RUNTIMES) if runtime_installed(n)]
    if not names:
        raise ExportError(f"no export runtime is installed: `pip install {' '.join(RUNTIMES)}`")
    export = ensure_export(extractor, root=root)
    reference = golden_reference(extractor)
    options = runtime_options(extractor, threads=threads)
    reports = {name: _check(name, export, reference=reference, options=options, tolerance=tolerance)[1]
               for name in names}
    with export_lock(Path(root), export.manifest.key):
        export = record_parity(export, {name: report.to_dict() for name, report in reports.items()})
    slog("runtime.export_checked", export_key=export.manifest.key, path=str(export.path),
         parity={name: report.to_dict() for name, report in reports.items()})
    if not any(report.passed for report in reports.values()):
        raise ExportError("the export fails the parity check on every runtime: "
                          + "; ".join(report.summary() for report in reports.values()))
    return export, reports


def checked_export_for(
    signature: Mapping[str, Any],
    *,
    root: Path,
    threads: int,
    build_extractor: Callable[[], FeatureExtractor],
) -> Export:
    """The export in ``root`` of the extractor with ``signature`` (a memory's ``metadata["signature"]``)
    that passed parity on some runtime when it was made; exported and checked now when there is none.

    Raises:
        ExportError: ``build_extractor()`` gives an extractor with another signature, or the export cannot
            be made or passes no parity check.
    """
    key = export_key(signature)
    try:
        export = load_export(Path(root) / key, signature=signature)
        if any(report.get("passed") for report in export.manifest.parity.values()):
            return export
    except ExportError:
        pass
    extractor = build_extractor()
    if export_key(extractor.signature()) != key:
        raise ExportError(f"the configured extractor {extractor.signature()} is not the one the model was fitted "
                          f"with {dict(signature)}: no export made")
    return export_checked(extractor, root=root, threads=threads)[0]


def _candidates(extractor: FeatureExtractor, requested: str, *, installed: Sequence[str], export: Export | None,
                reference: GoldenReference, options: RuntimeOptions
                ) -> tuple[dict[str, Candidate], dict[str, ParityReport]]:
    """What may run the net, by :func:`candidate_label`, and the failed reports of the runtimes that cannot open."""
    runners: dict[str, Candidate] = {}
    failed: dict[str, ParityReport] = {}
    if extractor.precision != "fp32" and requested in ("auto", "torch"):
        runners[candidate_label("torch", extractor.precision)] = TorchRunner(extractor, extractor.precision)
    if export is None:
        return runners, failed
    for name in installed:
        opened = _open(name, export, reference=reference, options=options)
        if isinstance(opened, ParityReport):
            failed[name] = opened
        else:
            runners[candidate_label(name, opened.precision)] = opened
    return runners, failed


def attach_runtime(
    extractor: FeatureExtractor,
    *,
    requested: str,
    root: Path,
    threads: int,
    tolerance: ParityTolerance | None = None,
) -> RuntimeStatus:
    """Attach the runtime ``requested`` (``auto``/``torch``/``onnxruntime``/``openvino``) to ``extractor`` if it
    passes parity; torch otherwise (loudly, see the module docstring). Never raises for a runtime problem.

    A reduced ``precision`` (``bf16``, or ``fp16`` on CUDA) is a candidate like a runtime: torch autocast and the
    runtimes that compute in it are checked against fp32 torch, and fp32 torch runs when none passes."""
    if requested not in RUNTIME_SETTINGS:
        raise ValueError(f"runtime must be one of {list(RUNTIME_SETTINGS)}, got {requested!r} (BDI_RUNTIME)")
    extractor.use_runtime(None)
    reduced = extractor.precision != "fp32"
    if requested == "torch" and not reduced:
        status = RuntimeStatus(requested="torch", active="torch", reason="BDI_RUNTIME=torch", threads=threads)
        slog("runtime.selected", **status.to_dict())
        return status
    fp32_torch = TorchRunner(extractor, "fp32")
    names = [] if requested == "torch" else list(RUNTIMES) if requested == "auto" else [requested]
    installed = [name for name in names if runtime_installed(name)]
    common: dict[str, Any] = {"requested": requested, "threads": threads}
    if names and not installed and not reduced:
        why = f"{' and '.join(names)} not installed (`pip install {' '.join(names)}`)"
        return _fallback(requested, why=why, threads=threads, loud=requested != "auto")
    export: Export | None = None
    if installed:
        try:
            export = ensure_export(extractor, root=root)
            common.update(export_key=export.manifest.key, export_path=str(export.path))
        except ExportError as exc:
            if not reduced:
                return _fallback(requested, why=f"no usable export: {exc}", threads=threads)
            _log.warning("no usable export, only torch-%s is checked: %s", extractor.precision, exc)
    reference = golden_reference(extractor)
    options = runtime_options(extractor, threads=threads)
    candidates, reports = _candidates(extractor, requested, installed=installed, export=export, reference=reference,
                                      options=options)
    choice_key = f"{extractor.precision}@{extractor.device}"
    recorded = (read_runtime_choice(export, choice_key=choice_key)
                if requested == "auto" and export is not None else None)
    if recorded is not None:  # chosen once for this export: check only that one, time nothing
        candidates = {name: runner for name, runner in candidates.items() if name == recorded["runtime"]}
    runners: dict[str, Candidate] = {}
    for name, runner in candidates.items():
        reports[name] = replace(check_parity(reference, runner, tolerance=tolerance), runtime=name)
        if reports[name].passed:
            runners[name] = runner
        else:
            _log.warning("runtime %s failed the parity check and will not be used: %s", name, reports[name].summary())
    common["parity"] = reports
    torch_ms = reference.torch_ms
    if recorded is not None:
        assert export is not None
        return _attach_recorded(extractor, recorded=recorded, runners=runners, reports=reports, fp32_torch=fp32_torch,
                                common=common, where=str(export.path / CHOICE_FILE))
    if not runners:
        why = "parity check failed: " + "; ".join(report.summary() for report in reports.values())
        if reduced:
            extractor.use_runtime(fp32_torch)
            common["details"] = fp32_torch.describe()
        asked = f"BDI_RUNTIME={requested} with BDI_PRECISION={extractor.precision}" if reduced else None
        return _fallback(requested, why=why, threads=threads, status_extra=common, asked=asked)
    best = min(runners, key=lambda name: reports[name].runtime_ms or float("inf"))
    best_ms = reports[best].runtime_ms or float("inf")
    chosen = "torch" if requested == "auto" and best_ms >= torch_ms else best
    if requested == "auto" and export is not None:
        timings = {name: reports[name].runtime_ms for name in runners} | {"torch": torch_ms}
        chosen, common["choice"] = _record_choice(export, root=root, choice_key=choice_key, chosen=chosen,
                                                  runners=runners, timings=timings)
    if chosen == "torch":
        if reduced:
            extractor.use_runtime(fp32_torch)
        status = RuntimeStatus(active="torch", reason=f"auto: torch fp32 ({torch_ms:.0f} ms) was faster than every "
                               f"runtime that passed parity ({best} {best_ms:.0f} ms)",
                               details=fp32_torch.describe(), **common)
    else:
        chosen_ms = reports[chosen].runtime_ms or float("inf")
        extractor.use_runtime(runners[chosen])
        reason = (f"auto: the fastest that passed parity ({chosen} {chosen_ms:.0f} ms vs torch fp32 {torch_ms:.0f} ms "
                  "per image)" if requested == "auto" else f"BDI_RUNTIME={requested}: {chosen} passed parity")
        status = RuntimeStatus(active=runners[chosen].name, reason=reason, details=runners[chosen].describe(),
                               **common)
    slog("runtime.selected", **status.to_dict())
    return status


def _record_choice(export: Export, *, root: Path, choice_key: str, chosen: str, runners: Mapping[str, Candidate],
                   timings: Mapping[str, float | None]) -> tuple[str, dict[str, Any]]:
    """Record this process's ``auto`` choice with the export unless another process recorded one first; the
    choice that holds (this one, or the recorded one when it can run here) and its record for ``/health``."""
    mine = {"runtime": chosen, "timings_ms": dict(timings), "choice_key": choice_key}
    try:
        held, written = record_runtime_choice(export, root=root, choice_key=choice_key, choice=mine)
    except ExportError as exc:
        _log.warning("the runtime choice %s is not recorded (each process will time again): %s", chosen, exc)
        return chosen, {**mine, "source": "timed, not recorded", "error": str(exc)}
    where = str(export.path / CHOICE_FILE)
    if written:
        return chosen, {**held, "source": "timed and recorded by this process", "path": where}
    if held["runtime"] == chosen or held["runtime"] == "torch" or held["runtime"] in runners:
        return str(held["runtime"]), {**held, "source": "recorded (by a process that timed first)", "path": where}
    _log.warning("the recorded runtime choice %s (%s) cannot run here; this process uses %s", held["runtime"],
                 where, chosen)
    return chosen, {**mine, "source": f"timed: the recorded {held['runtime']} cannot run here", "path": where}


def _attach_recorded(extractor: FeatureExtractor, *, recorded: Mapping[str, Any], runners: Mapping[str, Candidate],
                     reports: Mapping[str, ParityReport], fp32_torch: TorchRunner, common: dict[str, Any],
                     where: str) -> RuntimeStatus:
    """Attach the runtime recorded for this export (``runtime_choice.json``); torch, loudly, when it cannot run."""
    label = str(recorded["runtime"])
    common["choice"] = {**recorded, "source": "recorded", "path": where}
    when = recorded.get("recorded_at_utc", "?")
    if label == "torch":
        if extractor.precision != "fp32":
            extractor.use_runtime(fp32_torch)
        status = RuntimeStatus(active="torch", reason=f"auto: torch fp32, the choice recorded in {where} ({when})",
                               details=fp32_torch.describe(), **common)
    elif label in runners:
        extractor.use_runtime(runners[label])
        status = RuntimeStatus(active=runners[label].name, details=runners[label].describe(),
                               reason=f"auto: {label}, the choice recorded in {where} ({when}); it passed parity",
                               **common)
    else:
        report = reports.get(label)
        why = (f"the recorded runtime choice {label} ({where}) cannot run here: "
               + (report.summary() if report is not None else "not installed or cannot open the export"))
        if extractor.precision != "fp32":
            extractor.use_runtime(fp32_torch)
        return _fallback(str(common["requested"]), why=why, threads=int(common["threads"]), status_extra=common)
    slog("runtime.selected", **status.to_dict())
    return status


def _fallback(requested: str, *, why: str, threads: int, loud: bool = True,
              status_extra: dict[str, Any] | None = None, asked: str | None = None) -> RuntimeStatus:
    extra = dict(status_extra or {})
    extra.pop("requested", None)
    extra.pop("threads", None)
    status = RuntimeStatus(requested=requested, active="torch", reason=f"fell back to torch: {why}",
                           fallback=why, threads=threads, **extra)
    if loud:
        _log.warning("%s is not used, falling back to torch fp32: %s", asked or f"BDI_RUNTIME={requested}", why)
    slog("runtime.fallback", **status.to_dict())
    return status
