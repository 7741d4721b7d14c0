"""The repository documents itself: code points only at docs in the repository, at pages and headings that exist,
and the docs' own links lead somewhere."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# a section sign, or the contract, design and style notes outside the repository (split so this file passes)
OUTSIDE = re.compile("\u00a7|API_" + "CONTRACT|DESIGN" + r"\.md|STYLE" + r"\.md")
# `docs/<page>.md "<heading>"` or `README "<heading>"` (also README.md): the heading must exist on that page
POINTER = re.compile(r'(docs/[\w-]+\.md|README(?:\.md)?) "([^"\n]+)"')
PAGE = re.compile(r"(?<![\w/.-])docs/[\w-]+\.md")
# a relative markdown link: [text](target) or [text](target#anchor)
LINK = re.compile(r"\]\((?!https?://|mailto:)([^)#\s]*)(?:#([^)\s]+))?\)")


def _tracked_texts() -> dict[str, str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout")
    listed = subprocess.run(
        ["git", "ls-files", "*.py", "*.md", "*.yaml", "*.yml", "*.toml", "Makefile", "Dockerfile", ".ci/*"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()
    return {name: (ROOT / name).read_text(encoding="utf-8") for name in listed if (ROOT / name).is_file()}


def _headings(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.M | re.S)  # not code comments
    return {m.group(1).strip() for m in re.finditer(r"^#+ (.+)$", text, re.M)}


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def _page(name: str) -> Path:
    return ROOT / ("README.md" if name.startswith("README") else name)


def test_code_points_only_at_docs_in_the_repository() -> None:
    texts = _tracked_texts()
    outside = [f"{name}:{n}" for name, text in texts.items()
               for n, line in enumerate(text.splitlines(), 1) if OUTSIDE.search(line)]
    assert not outside, f"point at a page of docs/ instead: {outside}"


def test_every_docs_page_named_exists() -> None:
    missing = sorted({f"{name}: {page}" for name, text in _tracked_texts().items()
                      for page in PAGE.findall(text) if not (ROOT / page).is_file()})
    assert not missing, f"no such page: {missing}"


def test_a_pointer_to_a_page_and_heading_names_a_heading_that_exists() -> None:
    dangling = [f"{name}: {page} {section!r}" for name, text in _tracked_texts().items()
                for page, section in POINTER.findall(text)
                if not section.startswith("<")
                and (not _page(page).is_file() or section not in _headings(_page(page)))]
    assert not dangling, f"no such page or heading (the text moved? point at the docs page that holds it): {dangling}"


def test_links_in_the_docs_lead_to_existing_files_and_headings() -> None:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target, anchor in LINK.findall(page.read_text(encoding="utf-8")):
            path = (page.parent / target).resolve() if target else page
            if not path.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
            elif anchor and path.suffix == ".md" and anchor not in {_anchor(h) for h in _headings(path)}:
                broken.append(f"{page.relative_to(ROOT)}: {target}#{anchor}")
    assert not broken, f"broken links: {broken}"
