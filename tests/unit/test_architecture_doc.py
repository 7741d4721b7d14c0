"""docs/architecture.md stays true: it names every module under src/bdi, names no module that does not exist,
and lists every import contract of pyproject.toml by its exact name."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
DOC = ROOT / "docs" / "architecture.md"
# a dotted name under bdi, e.g. bdi.patchcore.knn or bdi.registry.BdiPyfuncModel
DOTTED = re.compile(r"(?<![\w.])bdi(?:\.\w+)+")


def _modules() -> set[str]:
    """Every module file under src/bdi as a dotted name (``__init__.py`` excluded)."""
    return {".".join(path.relative_to(SRC).with_suffix("").parts)
            for path in SRC.joinpath("bdi").rglob("*.py") if path.name != "__init__.py"}


def _packages() -> set[str]:
    return {".".join(path.parent.relative_to(SRC).parts) for path in SRC.joinpath("bdi").rglob("__init__.py")}


def _defined_names(module: str) -> set[str]:
    tree = ast.parse((SRC / Path(*module.split("."))).with_suffix(".py").read_text(encoding="utf-8"))
    # classes and functions at any depth: bdi.registry builds BdiPyfuncModel in a function (module __getattr__)
    names = {node.name for node in ast.walk(tree)
             if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)}
    for node in tree.body:
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
    return names


def _contract_names() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return [contract["name"] for contract in config["tool"]["importlinter"]["contracts"]]


def missing_modules(text: str) -> list[str]:
    """Modules under src/bdi that the text does not name."""
    return sorted(m for m in _modules() if not re.search(rf"(?<![\w.]){re.escape(m)}(?!\w)", text))


def unknown_names(text: str) -> list[str]:
    """Dotted ``bdi.…`` names in the text that are neither a module or package nor a name a module defines."""
    modules, known = _modules(), _modules() | _packages()
    unknown = set()
    for name in set(DOTTED.findall(text)):
        parent, _, attribute = name.rpartition(".")
        if name in known or (parent in modules and attribute in _defined_names(parent)):
            continue
        unknown.add(name)
    return sorted(unknown)


def test_the_page_names_every_module_under_src_bdi() -> None:
    missing = missing_modules(DOC.read_text(encoding="utf-8"))
    assert not missing, f"docs/architecture.md does not name these modules (add them to the table): {missing}"


def test_every_module_the_page_names_exists() -> None:
    unknown = unknown_names(DOC.read_text(encoding="utf-8"))
    assert not unknown, f"docs/architecture.md names modules that do not exist (renamed or removed?): {unknown}"


def test_the_page_lists_every_import_contract_by_name() -> None:
    text = DOC.read_text(encoding="utf-8")
    names = _contract_names()
    assert len(names) >= 11
    missing = [name for name in names if name not in text]
    assert not missing, f"docs/architecture.md does not list these pyproject import contracts: {missing}"


def test_a_module_left_out_of_the_page_or_a_renamed_one_is_reported() -> None:
    text = DOC.read_text(encoding="utf-8")
    broken = text.replace("`bdi.patchcore.knn`", "`bdi.patchcore.knn_search`")
    assert missing_modules(broken) == ["bdi.patchcore.knn"]
    assert unknown_names(broken) == ["bdi.patchcore.knn_search"]
