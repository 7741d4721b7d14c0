"""The ``bdi`` command: ``bdi sync`` (registry → BDI_MODELS_DIR), ``bdi export`` (the feature net → ONNX /
OpenVINO, parity-checked) and ``bdi demo-data``.

Defaults come from :class:`bdi.config.Settings` (``BDI_*`` env, ``BDI_CONFIG`` YAML) and
:class:`bdi.tracking.TrackingConfig`; flags override them. A :class:`bdi.errors.BDIError` ends the
command with a one-line message on stderr and exit code 1 (2 for bad settings/arguments).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from .errors import BDIError


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


def _sync(args: argparse.Namespace) -> int:
    from .config import Settings
    from .registry import sync_registered
    from .tracking import TrackingConfig

    settings = Settings()
    overrides: dict[str, str] = {}
    if args.tracking_uri is not None:
        overrides["tracking_uri"] = args.tracking_uri
    if args.prefix is not None:
        overrides["registered_model_prefix"] = args.prefix
    cfg = TrackingConfig.from_settings(settings, **overrides)
    models_dir = args.models_dir if args.models_dir is not None else settings.models_dir
    synced = sync_registered(cfg=cfg, project_root=args.project_root, models_dir=models_dir,
                             alias=args.alias, exports_root=settings.exports_dir())
    for item in synced:
        _emit(f"synced {item.name} v{item.version} (@{item.alias}) -> {item.paths.memory.parent} "
              f"[{', '.join(item.written)}]")
    _emit(f"{len(synced)} model(s) updated in {models_dir}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from .acceleration import configure_threads, export_checked
    from .config import Settings
    from .features import FeatureExtractor

    settings = Settings()
    threads = settings.intra_op_threads()
    configure_threads(threads)
    extractor = FeatureExtractor(settings.feature_config(), cache_dir=settings.weights_cache_dir)
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


def _demo_data(args: argparse.Namespace) -> int:
    from .synthetic import write_mvtec_dataset

    for name in ("n_train", "n_test_good", "n_test_per_defect"):
        if getattr(args, name) < 0:
            raise argparse.ArgumentTypeError(f"--{name.replace('_', '-')} must be >= 0")
    if args.size < 32:
        raise argparse.ArgumentTypeError("--size must be >= 32")
    root = write_mvtec_dataset(args.out, n_train=args.n_train, n_test_good=args.n_test_good,
                               n_test_per_defect=args.n_test_per_defect, size=args.size, seed=args.seed)
    _emit(f"wrote a synthetic MVTec-layout dataset to {root}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bdi`` console script; returns the exit code."""
    args = _parser().parse_args(argv)
    handlers = {"sync": _sync, "export": _export, "demo-data": _demo_data}
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
