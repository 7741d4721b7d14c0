"""The repository documents itself: code points only at docs in the repository, and at headings that exist."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ("docs/contract.md", "docs/design.md")
# a section sign, or the contract, design and style notes outside the repository (split so this file passes)
OUTSIDE = re.compile("\u00a7|API_" + "CONTRACT|DESIGN" + r"\.md|STYLE" + r"\.md")
POINTER = re.compile(r'(docs/(?:contract|design)\.md) "([^"\n]+)"')


def _tracked_texts() -> dict[str, str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout")
    listed = subprocess.run(
        ["git", "ls-files", "*.py", "*.md", "*.yaml", "*.yml", "*.toml"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()
    return {name: (ROOT / name).read_text(encoding="utf-8") for name in listed if (ROOT / name).is_file()}


def _headings(doc: str) -> set[str]:
    return {m.group(1).strip() for m in re.finditer(r"^#+ (.+)$", (ROOT / doc).read_text(encoding="utf-8"), re.M)}


def test_code_points_only_at_docs_in_the_repository() -> None:
    texts = _tracked_texts()
    outside = [f"{name}:{n}" for name, text in texts.items()
               for n, line in enumerate(text.splitlines(), 1) if OUTSIDE.search(line)]
    assert not outside, f"point at docs/contract.md or docs/design.md instead: {outside}"
    headings = {doc: _headings(doc) for doc in DOCS}
    dangling = [f"{name}: {doc} {section!r}" for name, text in texts.items()
                for doc, section in POINTER.findall(text) if section not in headings[doc]]
    assert not dangling, f"no such heading: {dangling}"
