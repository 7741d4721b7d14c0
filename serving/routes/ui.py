"""GET /ui: the operator web page (docs/ui.md), plain static files shipped in ``serving/static`` (package data).

The page uses only the public HTTP API, through URLs relative to itself (``../infer``), so it works behind a
reverse proxy under any path prefix; ``/ui`` redirects to ``ui/`` (a relative Location) for the same reason.
Only the files in that folder are served, by name: no path reaches the disk from the request.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

from bdi.errors import NotFoundError
from serving.auth import scoped
from serving.errors import error_style

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png"}
INDEX = "index.html"

router = APIRouter(tags=["ui"], include_in_schema=False, dependencies=[error_style("resource"), scoped("public")])


def page_files() -> dict[str, Path]:
    """The servable files: name → path, every plain file of ``serving/static`` with a known type."""
    if not STATIC_DIR.is_dir():
        return {}
    return {p.name: p for p in STATIC_DIR.iterdir() if p.is_file() and p.suffix in MEDIA_TYPES}


@router.get("/ui")
def ui_redirect() -> RedirectResponse:
    """``/ui`` → ``ui/``: relative, so that the page's relative URLs resolve under a proxy's prefix too."""
    return RedirectResponse("ui/", status_code=307)


@router.get("/ui/")
def ui_index() -> FileResponse:
    return ui_file(INDEX)


@router.get("/ui/{name}")
def ui_file(name: str) -> FileResponse:
    """One file of the page; 404 B ``ui file not found`` for any other name."""
    path = page_files().get(name)
    if path is None:
        raise NotFoundError("ui file not found")
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers={"Cache-Control": "no-cache"})
