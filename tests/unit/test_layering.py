"""src/bdi must not import the layers above it, and its leaves must not import the middle layer."""

from __future__ import annotations

import ast
from pathlib import Path

BDI = Path(__file__).resolve().parents[2] / "src" / "bdi"
FORBIDDEN_EVERYWHERE = {"fastapi", "starlette", "hydra", "serving", "pipelines", "uvicorn"}
LEAVES = {"errors", "config", "imaging", "coreset", "knn", "refs", "fsio"}
MIDDLE_AND_UP = {"memory", "inference", "calibration", "store", "datasets", "service", "features",
                 "tracking", "registry", "pyfunc", "registration", "registry_sync", "evaluation", "cli", "lineage",
                 "model_lock", "sync", "promotion", "shadow", "model", "demo"}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: "from .memory import X" -> "bdi.memory"
                names.add(f"bdi.{module}" if module else "bdi")
            else:
                names.add(module)
    return names


def test_bdi_never_imports_http_hydra_or_upper_layers() -> None:
    for path in BDI.glob("*.py"):
        bad = {n for n in _imports(path) if n.split(".")[0] in FORBIDDEN_EVERYWHERE}
        assert not bad, f"{path.name} imports {sorted(bad)}"


def test_leaf_modules_import_no_middle_layer_module() -> None:
    for leaf in LEAVES:
        imported = {n.split(".")[1] for n in _imports(BDI / f"{leaf}.py") if n.startswith("bdi.")}
        assert not imported & MIDDLE_AND_UP, f"{leaf}.py imports {sorted(imported & MIDDLE_AND_UP)}"


def test_service_is_the_only_bdi_module_serving_imports() -> None:
    serving = BDI.parents[1] / "serving"
    for path in serving.rglob("*.py"):
        for name in _imports(path):
            if name.startswith("bdi."):
                assert name.split(".")[1] in {"service", "errors", "config", "refs", "fsio", "store", "datasets",
                                              "logging", "tracking", "registry", "sync", "shadow", "__init__",
                                              "calibration", "inference"}, f"{path}: {name}"
