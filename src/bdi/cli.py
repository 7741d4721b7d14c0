"""The ``bdi`` command: ``bdi sync [--watch]`` (registry → BDI_MODELS_DIR), ``bdi promote`` (move the alias
through the promotion gate, or back for a rollback), ``bdi export`` (the feature net → ONNX / OpenVINO,
parity-checked), ``bdi recipe unlock-scale RECIPE`` (reset a recipe's mm_per_px lock), ``bdi keys
create|list|revoke`` and ``bdi audit verify`` (docs/security.md), ``bdi demo-data``, ``bdi inspections export``
(the inspection record as CSV or Parquet) and ``bdi monitor report`` (drift per ROI logged on each model's MLflow
run; docs/monitoring.md).

Defaults come from :class:`bdi.config.Settings` (``BDI_*`` env, ``BDI_CONFIG`` YAML) and
:class:`bdi.mlops.tracking.TrackingConfig`; flags override them. A :class:`bdi.errors.BDIError` ends the
command with a one-line message on stderr and exit code 1 (2 for bad settings/arguments).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from bdi.errors import BDIError


def _emit(line: str, *, err: bool = False) -> None:
    """One line to stdout (or stderr): the CLI is the only place in bdi that prints."""
    (sys.stderr if err else sys.stdout).write(line + "\n")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bdi", description="BDI command-line tools")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sync = commands.add_parser(
        "sync", help="write the registered versions holding the alias into the models dir",
        description="Materialise every registered model version holding the alias into the models dir "
                    "(ModelStore layout, atomic writes; a running server picks them up at its next request).",
    )
    sync.add_argument("--models-dir", type=Path, default=None, help="default: BDI_MODELS_DIR (Settings)")
    sync.add_argument("--tracking-uri", default=None,
                      help="default: BDI_MLFLOW_TRACKING_URI, or the embedded <project-root>/mlflow.db")
    sync.add_argument("--alias", default=None, help="default: BDI_REGISTRY_ALIAS (champion)")
    sync.add_argument("--project-root", type=Path, default=Path("."),
                      help="where the embedded mlflow.db and mlartifacts/ live (default: .)")
    sync.add_argument("--prefix", default=None, help="registered model name prefix (default: bdi)")
    sync.add_argument("--watch", action="store_true",
                      help="keep following the registry (a sidecar): sync again every --interval seconds")
    sync.add_argument("--interval", type=float, default=None,
                      help="seconds between syncs with --watch (default: BDI_REGISTRY_SYNC_INTERVAL_S, 30)")

    promote = commands.add_parser(
        "promote", help="move the alias to a registered version if it passes the promotion gate",
        description="Run the promotion gate (primary metric not below the holder's, false-reject rate, /infer "
                    "latency and export parity on the golden images logged with the version) and move the alias "
                    "when it passes. --skip-gate moves it unconditionally: a rollback.",
    )
    promote.add_argument("name", help="registered model name (see registration.json or the MLflow UI)")
    promote.add_argument("version", type=int, help="the version to promote")
    promote.add_argument("--skip-gate", action="store_true", help="move the alias without the gate (rollback)")
    promote.add_argument("--max-false-reject-rate", type=float, default=None, help="default 0.05")
    promote.add_argument("--max-infer-latency-ms", type=float, default=None, help="default 1000")
    promote.add_argument("--parity-eps", type=float, default=None, help="default 0.001")
    promote.add_argument("--max-review-rate", type=float, default=None,
                         help="share of evaluation parts the band sends to review (default: no check)")
    promote.add_argument("--primary-metric", default="image_auroc")
    promote.add_argument("--tracking-uri", default=None,
                         help="default: BDI_MLFLOW_TRACKING_URI, or the embedded <project-root>/mlflow.db")
    promote.add_argument("--alias", default=None, help="default: BDI_REGISTRY_ALIAS (champion)")
    promote.add_argument("--project-root", type=Path, default=Path("."))
    promote.add_argument("--weights", default=None, help="backbone weights file for the serving probe")

    export = commands.add_parser(
        "export", help="export the feature extractor to ONNX (and OpenVINO IR) and check its parity",
        description="Export the extractor that BDI_BACKBONE / BDI_WEIGHTS / BDI_INPUT_SIZE … select (Settings) "
                    "at its fixed input size, then run the parity check (features and scores of golden images, "
                    "torch vs runtime, 1e-3 relative) on every installed runtime and record it in export.json. "
                    "Exit 1 when no runtime passes.",
    )
    export.add_argument("--out", type=Path, default=None,
                        help="exports root; the export lands in OUT/<key> (default: BDI_WEIGHTS_CACHE_DIR/exports, "
                             "where servers and pipeline stages look)")
    export.add_argument("--runtime", choices=("all", "onnxruntime", "openvino"), default="all",
                        help="check parity on this runtime only (default: every installed one)")

    recipe = commands.add_parser("recipe", help="recipe administration (the scale lock)",
                                 description="Recipe administration on the server's models dir (Settings).")
    recipe_commands = recipe.add_subparsers(dest="recipe_command", required=True, metavar="ACTION")
    unlock = recipe_commands.add_parser(
        "unlock-scale", help="reset the recipe's mm_per_px lock (docs/contract.md \"Scale lock\")",
        description="Remove the mm_per_px locked for RECIPE in recipes/<RECIPE>/recipe_meta.json, under the "
                    "recipe lock: the next successful /fit_ok or /infer locks its own value. Fitted memories "
                    "keep the scale they were fitted at: refit them at the new scale.",
    )
    unlock.add_argument("recipe_id", metavar="RECIPE", help="the recipe id (as in the recipe_id field)")
    unlock.add_argument("--models-dir", type=Path, default=None, help="default: BDI_MODELS_DIR (Settings)")

    keys = commands.add_parser(
        "keys", help="API keys of the server (docs/security.md)",
        description="API keys in the server's security folder (BDI_SECURITY_DIR, default <BDI_MODELS_DIR>/.security): "
                    "run with the server's settings, changes act on the running server at its next request.")
    key_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    create = key_commands.add_parser("create", help="create a key; its token is printed once, alone on the last line")
    create.add_argument("--scope", action="append", required=True,
                        help="inspect, samples, train or admin; repeat (or comma-separate) for several")
    create.add_argument("--label", required=True, help="who or what uses it, e.g. line-3-gui")
    create.add_argument("--expires-days", type=float, default=None, help="expire after this many days (default never)")
    key_commands.add_parser("list", help="list keys (id, label, scopes, created, expiry, revoked); never the tokens")
    revoke = key_commands.add_parser("revoke", help="revoke a key (every worker refuses it at its next request)")
    revoke.add_argument("key_id", metavar="ID")

    audit = commands.add_parser("audit", help="the audit trail (docs/security.md)",
                                description="The audit trail in the server's security folder.")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    audit_commands.add_parser("verify", help="check the hash chain; exit 1 naming each edited, removed or moved record")

    inspections = commands.add_parser("inspections", help="the inspection record (docs/monitoring.md)",
                                      description="the inspection record (docs/monitoring.md)")
    inspections_commands = inspections.add_subparsers(dest="inspections_command", required=True, metavar="ACTION")
    export_records = inspections_commands.add_parser(
        "export", help="write the record (newest first) as CSV or Parquet",
        description="write the inspection record (newest first, filtered) as one CSV or Parquet table")
    export_records.add_argument("--format", choices=("csv", "parquet"), default="csv")
    export_records.add_argument("--out", type=Path, required=True, help="the file to write")
    export_records.add_argument("--models-dir", type=Path, default=None, help="default: BDI_MODELS_DIR")
    for name in ("recipe-id", "role-id", "roi-id", "decision", "since"):
        export_records.add_argument(f"--{name}", default=None, help="only records with this value"
                                    if name != "since" else "only records at or after this ISO time")

    monitor = commands.add_parser("monitor", help="drift per ROI (docs/monitoring.md)",
                                  description="drift per ROI (docs/monitoring.md)")
    monitor_commands = monitor.add_subparsers(dest="monitor_command", required=True, metavar="ACTION")
    report = monitor_commands.add_parser(
        "report", help="evaluate every recorded model's drift and log it on its MLflow run",
        description="evaluate every recorded model's drift and log it on the model's MLflow run")
    report.add_argument("--models-dir", type=Path, default=None, help="default: BDI_MODELS_DIR")
    report.add_argument("--tracking-uri", default=None,
                        help="default: BDI_MLFLOW_TRACKING_URI (empty: embedded SQLite)")
    report.add_argument("--project-root", type=Path, default=Path("."), help="where the embedded SQLite default lives")

    demo = commands.add_parser(
        "demo-data", help="write a synthetic brake-disc dataset in MVTec layout",
        description="Write seeded synthetic disc images: train/good, test/good, test/<defect>, ground_truth.",
    )
    demo.add_argument("out", type=Path, help="output folder")
    demo.add_argument("--n-train", type=int, default=12)
    demo.add_argument("--n-test-good", type=int, default=4)
    demo.add_argument("--n-test-per-defect", type=int, default=2)
    demo.add_argument("--size", type=int, default=128, help="image side in px")
    demo.add_argument("--seed", type=int, default=0)
    return parser


def _tracking(args: argparse.Namespace) -> tuple[Any, Any]:
    """(Settings, TrackingTarget) from the environment and the common flags (``--project-root``)."""
    from bdi.config import Settings
    from bdi.mlops.tracking import TrackingConfig

    settings = Settings()
    overrides: dict[str, str] = {}
    if args.tracking_uri is not None:
        overrides["tracking_uri"] = args.tracking_uri
    if getattr(args, "prefix", None) is not None:
        overrides["registered_model_prefix"] = args.prefix
    if args.alias is not None:
        overrides["alias"] = args.alias
    return settings, TrackingConfig.from_settings(settings, **overrides).resolve(args.project_root)


def _sync(args: argparse.Namespace) -> int:
    from bdi.mlops.registry_sync import sync_registered

    settings, tracking = _tracking(args)
    models_dir = args.models_dir if args.models_dir is not None else settings.models_dir
    if args.watch:
        return _watch(args, tracking=tracking, models_dir=models_dir, interval_s=settings.registry_sync_interval_s,
                      log_dir=settings.log_dir, shadow_alias=settings.registry_shadow_alias)
    synced = sync_registered(tracking=tracking, models_dir=models_dir,
                             exports_root=settings.exports_dir())
    for item in synced:
        _emit(f"synced {item.name} v{item.version} (@{item.alias}) -> {item.paths.memory.parent} "
              f"[{', '.join(item.written)}]")
    _emit(f"{len(synced)} model(s) updated in {models_dir}")
    return 0


def _watch(
    args: argparse.Namespace, *, tracking: Any, models_dir: Path, interval_s: float, log_dir: Path | None,
    shadow_alias: str,
) -> int:
    """``bdi sync --watch``: the server's follower loop in the foreground, until SIGTERM/SIGINT."""
    import signal

    from bdi.config import Settings
    from bdi.logging import configure_logging
    from bdi.mlops.follower import RegistryFollower
    from bdi.security.audit import AuditLog

    interval = args.interval if args.interval is not None else interval_s
    if interval <= 0:
        raise argparse.ArgumentTypeError("--interval must be > 0 with --watch")
    configure_logging(log_dir)
    settings = Settings()
    security_root = settings.model_copy(update={"models_dir": models_dir}).security_root()  # --models-dir's own
    follower = RegistryFollower(tracking=tracking, models_dir=models_dir, interval_s=interval,
                                exports_root=settings.exports_dir(), shadow_alias=shadow_alias,
                                audit=AuditLog(security_root))
    signal.signal(signal.SIGTERM, lambda *_: follower.stop(timeout_s=0))
    _emit(f"following the registry into {models_dir} every {interval:g} s (status: {models_dir}/.registry_sync.json)")
    try:
        follower.run()
    except KeyboardInterrupt:
        pass
    return 0


def _promote(args: argparse.Namespace) -> int:
    from bdi.mlops.promotion import PromotionGate, promote_version

    settings, tracking = _tracking(args)
    limits = {name: getattr(args, name) for name in ("max_false_reject_rate", "max_infer_latency_ms", "parity_eps",
                                                     "max_review_rate")
              if getattr(args, name) is not None}  # flags not given keep the gate's defaults
    gate = None if args.skip_gate else PromotionGate(primary_metric=args.primary_metric, **limits)
    overrides = {"weights_cache_dir": str(settings.weights_cache_dir)}  # the pyfunc reads no BDI_* env
    if args.weights:
        overrides["weights"] = args.weights
    result = promote_version(tracking=tracking, name=args.name, version=args.version,
                             gate=gate, overrides=overrides)
    for check in result.report.checks if result.report is not None else ():
        _emit(f"  {'pass' if check.passed else 'FAIL'} {check.name}: {check.detail}")
    if not result.moved:
        _emit(f"{result.name} v{result.version} did not pass the gate: @{result.alias} stays on "
              f"v{result.previous_version}", err=True)
        return 1
    _emit(f"{result.name}@{result.alias} -> v{result.version} (was v{result.previous_version})")
    return 0


def _export(args: argparse.Namespace) -> int:
    from bdi.config import Settings
    from bdi.patchcore.features import FeatureExtractor
    from bdi.runtime.select import configure_threads, export_checked

    settings = Settings()
    threads = settings.intra_op_threads()
    configure_threads(threads)
    extractor = FeatureExtractor(settings.model.features, cache_dir=settings.weights_cache_dir)
    root = args.out if args.out is not None else settings.exports_dir()
    runtimes = None if args.runtime == "all" else [args.runtime]
    export, reports = export_checked(extractor, root=root, threads=threads, runtimes=runtimes)
    _emit(f"exported {extractor.config.backbone} @{extractor.config.input_size} ({extractor.weights.name}) -> "
          f"{export.path} [{', '.join(sorted(export.manifest.files))}]")
    for report in reports.values():
        verdict = "passed" if report.passed else "FAILED"
        _emit(f"parity {verdict}: {report.summary()}; {report.runtime_ms or float('nan'):.1f} ms vs torch "
              f"{report.torch_ms or float('nan'):.1f} ms per image")
    return 0


def _recipe(args: argparse.Namespace) -> int:
    """``bdi recipe unlock-scale RECIPE``: the documented reset of the scale lock, with the server's settings."""
    from bdi.config import Settings
    from bdi.logging import configure_logging, slog
    from bdi.storage.store import ModelStore

    settings = Settings()
    models_dir = args.models_dir if args.models_dir is not None else settings.models_dir
    configure_logging(settings.log_dir)
    previous = ModelStore(models_dir).unlock_mm_per_px(args.recipe_id)
    slog("recipe.scale_unlocked", recipe_id=args.recipe_id, previous_mm_per_px=previous, models_dir=str(models_dir))
    if previous is None:
        _emit(f"recipe '{args.recipe_id}' has no mm_per_px lock in {models_dir}")
    else:
        _emit(f"recipe '{args.recipe_id}': mm_per_px lock {previous:g} removed ({models_dir})")
    return 0


def _security_root() -> Path:
    from bdi.config import Settings

    root: Path = Settings().security_root()
    return root


def _keys(args: argparse.Namespace) -> int:
    """``bdi keys create|list|revoke``: on the server's key file; creation and revocation are audited."""
    import getpass
    import json
    import socket
    from datetime import timedelta

    from bdi.security.audit import AuditEvent, AuditLog
    from bdi.security.keys import KeyStore, parse_scopes

    root = _security_root()
    store = KeyStore(root)
    if args.keys_command == "list":
        for key in store.keys().values():
            _emit(json.dumps(key.public(), sort_keys=True))
        return 0
    client = f"cli:{getpass.getuser()}@{socket.gethostname()}"
    if args.keys_command == "create":
        if args.expires_days is not None and args.expires_days <= 0:
            raise argparse.ArgumentTypeError("--expires-days must be > 0")
        expires = timedelta(days=args.expires_days) if args.expires_days is not None else None
        created = store.create(label=args.label, scopes=parse_scopes(args.scope), expires_in=expires)
        AuditLog(root).append(AuditEvent(action="keys.create", outcome="ok", key_id="cli", key_label="bdi keys",
                                         client=client, detail=created.key.public()))
        _emit(f"created key {created.key.id} ({created.key.label}; scopes {', '.join(created.key.scopes)}; "
              f"expires {created.key.expires_utc or 'never'}) in {store.path}")
        _emit("the token below is shown once; the server keeps only its salted hash:")
        _emit(created.token)
        return 0
    revoked = store.revoke(args.key_id)
    AuditLog(root).append(AuditEvent(action="keys.revoke", outcome="ok", key_id="cli", key_label="bdi keys",
                                     client=client, detail=revoked.public()))
    _emit(f"revoked key {revoked.id} ({revoked.label}) at {revoked.revoked_utc}")
    return 0


def _audit(args: argparse.Namespace) -> int:
    """``bdi audit verify``: exit 0 when the chain holds (crash artefacts are reported, not failures)."""
    from bdi.security.audit import AuditLog, verify

    log = AuditLog(_security_root())
    report = verify(log.path)
    for finding in report.artefacts:
        _emit(f"line {finding.line}: crash artefact: {finding.message}")
    for finding in report.problems:
        seq = f" (seq {finding.seq})" if finding.seq is not None else ""
        _emit(f"line {finding.line}{seq}: {finding.kind}: {finding.message}", err=True)
    if not report.ok:
        _emit(f"{log.path}: FAILED: {len(report.problems)} problem(s) in {report.records} record(s)", err=True)
        return 1
    _emit(f"{log.path}: OK: {report.records} record(s), head {report.head}")
    return 0


def _demo_data(args: argparse.Namespace) -> int:
    from bdi.data.synthetic import write_mvtec_dataset

    for name in ("n_train", "n_test_good", "n_test_per_defect"):
        if getattr(args, name) < 0:
            raise argparse.ArgumentTypeError(f"--{name.replace('_', '-')} must be >= 0")
    if args.size < 32:
        raise argparse.ArgumentTypeError("--size must be >= 32")
    root = write_mvtec_dataset(args.out, n_train=args.n_train, n_test_good=args.n_test_good,
                               n_test_per_defect=args.n_test_per_defect, size=args.size, seed=args.seed)
    _emit(f"wrote a synthetic MVTec-layout dataset to {root}")
    return 0


def _inspections(args: argparse.Namespace) -> int:
    """``bdi inspections export``: the record of the server's models dir as one table."""
    from bdi.config import Settings
    from bdi.monitoring.export import export_records
    from bdi.monitoring.record import InspectionQuery, inspections_dir, read_records

    models_dir = args.models_dir if args.models_dir is not None else Settings().models_dir
    query = InspectionQuery(recipe_id=args.recipe_id, role_id=args.role_id, roi_id=args.roi_id,
                            decision=args.decision, since=args.since)
    records = read_records(inspections_dir(models_dir), query)
    export_records(records, args.out, fmt=args.format)
    _emit(f"wrote {len(records)} inspection records to {args.out} ({args.format})")
    return 0


def _monitor(args: argparse.Namespace) -> int:
    """``bdi monitor report``: every recorded model's drift, one line each, logged on its MLflow run."""
    from dataclasses import replace

    from bdi.config import Settings
    from bdi.mlops.monitor_report import report_drift
    from bdi.mlops.tracking import TrackingConfig
    from bdi.service.monitoring import evaluate_all
    from bdi.storage.store import ModelStore

    settings = Settings()
    if args.models_dir is not None:
        settings = settings.model_copy(update={"models_dir": args.models_dir})
    config = TrackingConfig.from_settings(settings)
    if args.tracking_uri is not None:
        config = replace(config, tracking_uri=args.tracking_uri)
    store = ModelStore(settings.models_dir)
    drifts = evaluate_all(settings, store)
    reported = {r.key: r for r in report_drift(config.resolve(args.project_root), store, drifts)}
    for drift in drifts:
        where = reported.get(drift.key)
        _emit(f"{drift.key}: {drift.status}" + (f" ({drift.cause})" if drift.cause else "")
              + f", {drift.n_live} live records" + (f", run {where.run_id}" if where else ""))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bdi`` console script; returns the exit code."""
    args = _parser().parse_args(argv)
    handlers = {"sync": _sync, "promote": _promote, "export": _export, "recipe": _recipe,
                "keys": _keys, "audit": _audit, "demo-data": _demo_data, "inspections": _inspections,
                "monitor": _monitor}
    try:
        return handlers[args.command](args)
    except BDIError as exc:
        _emit(f"bdi {args.command}: error: {exc}", err=True)
        return 1
    except (ValidationError, argparse.ArgumentTypeError) as exc:
        message = " ".join(str(exc).split())
        _emit(f"bdi {args.command}: invalid settings or arguments: {message}", err=True)
        return 2
    except OSError as exc:
        _emit(f"bdi {args.command}: error: {exc}", err=True)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
