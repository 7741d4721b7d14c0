"""OK/NG sample folders per (recipe, role, roi): uploads, listings, downloads and deletes.

The MVTec reader lives in :mod:`bdi.data.mvtec`, the usability checks of a sample file in :mod:`bdi.data.checks`.

Layout (docs/contract.md "Files"): ``<root>/recipes/<recipe>/datasets/<b64role>__<b64roi>/{ok,ng}/`` holding
``<YYYYmmdd-HHMMSS-ffffff><ext>`` images, each with a ``<stem>.json`` sidecar.

Choices (docs/design.md: "No id reaches a path raw", "Upload limits", "Unique sample names"):
* Stored names use UTC time (like ``created_at_utc``; no DST jumps). A name is claimed with an
  exclusive hard link of a fully written temp file, so a concurrent upload can never overwrite it
  nor can a reader see a half-written file; on a collision the microsecond is bumped.
* The sidecar is linked before its image (an image never appears without its sidecar), its
  ``filename`` is always the stored name and the client's name is kept as ``client_filename``.
* A multi-file upload stores all files or none.
* Reads resolve the base dir as in docs/contract.md "Dataset read order", but the legacy ``<root>/datasets/...``
  folder is only reached through sanitised names (``S()``), never raw ids; downloads and deletes take the
  basename of the requested file only, and only an image's name (a sidecar is reached through its image).
* A clear that the read order takes to another recipe's folder (docs/design.md "Deletes stay in their recipe")
  is refused unless the caller allows it (``Settings.dataset_clear_fallback``), and says which recipe it cleared.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from bdi.errors import CrossRecipeDeleteError, InvalidInputError, NotFoundError, StorageError
from bdi.logging import slog
from bdi.refs import DEFAULT_RECIPE, DatasetRef, ensure_inside, legacy_name, recipe_dir_candidates
from bdi.storage.fsio import fsync_dir, utc_now_iso, write_temp_file

LABELS: tuple[str, ...] = ("ok", "ng")
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp"})
DEFAULT_EXTENSION = ".png"
_STAMP_FORMAT = "%Y%m%d-%H%M%S-%f"
_MAX_NAME_ATTEMPTS = 100_000


def parse_label(raw: str) -> str:
    """``ok`` or ``ng`` (case-insensitive, trimmed); anything else is an :class:`InvalidInputError`."""
    value = raw.strip().lower() if isinstance(raw, str) else ""
    if value not in LABELS:
        raise InvalidInputError("label must be 'ok' or 'ng'")
    return value


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def client_extension(client_filename: str | None) -> str:
    """The lower-cased suffix of the client's file name, ``.png`` when absent or not an image type."""
    name = _basename(client_filename or "")
    ext = os.path.splitext(name)[1].lower()
    return ext if ext in IMAGE_EXTENSIONS else DEFAULT_EXTENSION


def check_image_name(filename: str) -> None:
    """:class:`InvalidInputError` when the basename of ``filename`` has an extension that is not an image's
    (``.json``: a sidecar is never served nor deleted on its own); a name without one simply finds nothing."""
    name = _basename(filename or "")
    if os.path.splitext(name)[1] and not is_image_name(name):
        raise InvalidInputError(
            f"filename must name a stored image ({', '.join(sorted(IMAGE_EXTENSIONS))}); "
            "its sidecar is read with /datasets/meta and deleted with its image")


def _basename(filename: str) -> str:
    """The last path component, splitting on both '/' and '\\' (clients may be Windows)."""
    return filename.replace("\\", "/").rsplit("/", 1)[-1]


@dataclass(frozen=True)
class UploadItem:
    """One uploaded file, already checked by the caller (decodable image, limits, mm_per_px)."""

    data: bytes
    client_filename: str | None
    meta: Mapping[str, Any]


@dataclass(frozen=True)
class Sample:
    """A stored image with its sidecar meta ({} when absent or unreadable)."""

    path: Path
    label: str
    meta: dict[str, Any]


@dataclass(frozen=True)
class ClearResult:
    """What ``DatasetStore.clear`` removed: ``cleared`` files from the folder of ``resolved_recipe_id`` (None:
    the legacy ``<root>/datasets/…`` folder, or no folder at all)."""

    cleared: int
    resolved_recipe_id: str | None
    crossed: bool  # the folder is not the requested recipe's own (the read fallback took it elsewhere)


class DatasetStore:
    """OK/NG sample folders under the models root."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # -------------------------------------------------------------- layout
    @property
    def recipes_root(self) -> Path:
        return self.root / "recipes"

    def base_dir(self, ref: DatasetRef) -> Path:
        """Write target: ``<root>/recipes/<recipe>/datasets/<base>``."""
        return ensure_inside(self.root, self.recipes_root / ref.recipe_id / "datasets" / ref.base)

    def candidates(self, ref: DatasetRef) -> list[Path]:
        """docs/contract.md "Dataset read order", with the legacy folder reached through sanitised names only."""
        out = [d / "datasets" / ref.base for d in recipe_dir_candidates(self.recipes_root, ref.recipe_id)]
        out.append(self.root / "datasets" / legacy_name(ref.role_id) / legacy_name(ref.roi_id))
        return [ensure_inside(self.root, p) for p in out]

    def resolve_base(self, ref: DatasetRef) -> Path | None:
        """The first existing dataset base dir, or None."""
        for path in self.candidates(ref):
            if path.is_dir():
                return path
        return None

    def _label_dir(self, base: Path, label: str) -> Path:
        return ensure_inside(base, base / label)

    def _file_in(self, base: Path, label: str, filename: str) -> Path | None:
        name = _basename(filename or "")
        if name in ("", ".", ".."):
            return None
        return ensure_inside(base, self._label_dir(base, label) / name)

    def resolved_recipe_id(self, ref: DatasetRef, base: Path) -> tuple[str | None, bool]:
        """``(recipe folder name or None for the legacy folder, whether it is another recipe's)`` of a resolved
        base dir (docs/contract.md "Dataset read order")."""
        recipes_root = self.recipes_root
        if base.parent.parent.parent == recipes_root:  # recipes/<recipe>/datasets/<base>
            name = base.parent.parent.name
            return name, name.lower() != ref.recipe_id.lower()
        return None, ref.recipe_id != DEFAULT_RECIPE  # the legacy folder belongs to no recipe but the default

    # -------------------------------------------------------------- writes
    def save(self, ref: DatasetRef, label: str, items: Sequence[UploadItem]) -> list[str]:
        """Store every item under the requested recipe (no fallback) and return the stored names.

        All or nothing: if item k fails, items 0..k-1 and their sidecars are removed again. OS
        failures become :class:`StorageError`; a meta that is not strict JSON (NaN, objects) is an
        :class:`InvalidInputError`.
        """
        label = parse_label(label)
        directory = self._label_dir(self.base_dir(ref), label)
        if not items:
            return []
        for item in items:  # a bad meta fails before anything (even a folder) is created
            self._sidecar_bytes(ref=ref, label=label, item=item, name="check")
        created: list[Path] = []
        saved: list[str] = []
        try:
            directory.mkdir(parents=True, exist_ok=True)
            for item in items:
                saved.append(self._save_one(directory, ref=ref, label=label, item=item, created=created))
        except BaseException as exc:
            for path in reversed(created):
                try:
                    path.unlink(missing_ok=True)
                except OSError as cleanup_exc:
                    slog("datasets.upload.rollback_failed", path=str(path), error=str(cleanup_exc))
            slog("datasets.upload.rolled_back", label=label, n_removed=len(created), error=str(exc))
            if isinstance(exc, OSError):
                raise StorageError(f"could not store the upload (nothing was kept): {exc}") from exc
            raise
        fsync_dir(directory)
        return saved

    def _save_one(
        self, directory: Path, *, ref: DatasetRef, label: str, item: UploadItem, created: list[Path]
    ) -> str:
        ext = client_extension(item.client_filename)
        image_tmp = write_temp_file(directory, bytes(item.data))
        try:
            stamp = datetime.now(timezone.utc)
            for _ in range(_MAX_NAME_ATTEMPTS):
                stem = stamp.strftime(_STAMP_FORMAT)
                stamp += timedelta(microseconds=1)
                name = f"{stem}{ext}"
                sidecar = directory / f"{stem}.json"
                side_tmp = write_temp_file(directory, self._sidecar_bytes(ref=ref, label=label, item=item,
                                                                          name=name))
                try:
                    if not _link_exclusive(side_tmp, sidecar):
                        continue  # the stem is taken (by any extension)
                    created.append(sidecar)
                    if not _link_exclusive(image_tmp, directory / name):
                        sidecar.unlink(missing_ok=True)  # an image without our sidecar holds the name
                        created.remove(sidecar)
                        continue
                    created.append(directory / name)
                    return name
                finally:
                    side_tmp.unlink(missing_ok=True)
            raise StorageError(f"no free file name in {directory}")
        finally:
            image_tmp.unlink(missing_ok=True)

    @staticmethod
    def _sidecar_bytes(*, ref: DatasetRef, label: str, item: UploadItem, name: str) -> bytes:
        meta: dict[str, Any] = dict(item.meta)
        client_name = meta.get("filename") or item.client_filename
        for key, value in (("role_id", ref.role_id), ("roi_id", ref.roi_id), ("label", label),
                           ("recipe_id", ref.recipe_id), ("created_at_utc", utc_now_iso())):
            meta.setdefault(key, value)
        if client_name and "client_filename" not in meta:
            meta["client_filename"] = client_name
        meta["filename"] = name
        try:
            return json.dumps(meta, ensure_ascii=False, allow_nan=False, indent=2).encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"meta of {client_name or 'an image'} is not valid JSON: {exc}") from exc

    # -------------------------------------------------------------- reads
    def _images(self, base: Path, label: str) -> list[str]:
        """Names of the stored images of ``label``, sorted; [] when the folder is missing or unreadable."""
        try:
            return [path.name for path in image_files(self._label_dir(base, label))]
        except OSError:
            return []

    def listing(self, ref: DatasetRef) -> dict[str, Any]:
        """``{"role_id", "roi_id", "classes": {label: {"count", "files", "meta"}}}`` (GET /datasets/list)."""
        classes: dict[str, Any] = {}
        base = self.resolve_base(ref)
        if base is not None:
            for label in LABELS:
                directory = self._label_dir(base, label)
                if not directory.is_dir():
                    continue
                files = self._images(base, label)
                meta = {name: (directory / f"{os.path.splitext(name)[0]}.json").is_file() for name in files}
                classes[label] = {"count": len(files), "files": files, "meta": meta}
        return {"role_id": ref.role_id, "roi_id": ref.roi_id, "classes": classes}

    def counts(self, ref: DatasetRef) -> dict[str, int]:
        """Number of stored images per label (0 when missing)."""
        base = self.resolve_base(ref)
        return {label: (len(self._images(base, label)) if base is not None else 0) for label in LABELS}

    def file_path(self, ref: DatasetRef, label: str, filename: str) -> Path:
        """The stored image ``<base>/<label>/<basename(filename)>``; :class:`NotFoundError` if absent."""
        label = parse_label(label)
        check_image_name(filename)
        base = self.resolve_base(ref)
        path = self._file_in(base, label, filename) if base is not None else None
        if path is None or not path.is_file():
            raise NotFoundError("file not found")
        return path

    def read_meta(self, ref: DatasetRef, label: str, filename: str) -> dict[str, Any]:
        """The sidecar object of a stored image; :class:`NotFoundError` ("meta not found") when the
        image or its sidecar is missing or the sidecar is not a JSON object."""
        label = parse_label(label)
        check_image_name(filename)
        base = self.resolve_base(ref)
        path = self._file_in(base, label, filename) if base is not None else None
        if path is None or not path.is_file():
            raise NotFoundError("meta not found")
        meta = _read_sidecar(path)
        if meta is None:
            raise NotFoundError("meta not found")
        return meta

    def samples(self, ref: DatasetRef, label: str) -> list[Sample]:
        """Stored images of ``label`` sorted by name, with their metas."""
        label = parse_label(label)
        base = self.resolve_base(ref)
        if base is None:
            return []
        directory = self._label_dir(base, label)
        return [
            Sample(path=directory / name, label=label, meta=_read_sidecar(directory / name) or {})
            for name in self._images(base, label)
        ]

    # -------------------------------------------------------------- deletes
    def delete(self, ref: DatasetRef, label: str, filename: str) -> bool:
        """Remove an image and its sidecar; True when the image existed and was removed."""
        label = parse_label(label)
        check_image_name(filename)
        base = self.resolve_base(ref)
        path = self._file_in(base, label, filename) if base is not None else None
        if path is None or not path.is_file():
            return False
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StorageError(f"cannot delete {path.name}: {exc}") from exc
        try:
            path.with_suffix(".json").unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot delete the sidecar of {path.name}: {exc}") from exc
        return True

    def clear(self, ref: DatasetRef, label: str, *, allow_fallback: bool = False) -> ClearResult:
        """Remove every regular file in ``<base>/<label>/`` (sidecars included): the count and whose folder it was.

        Raises:
            CrossRecipeDeleteError: the read order resolves to another recipe's folder (or the legacy one for a
                recipe other than the default) and ``allow_fallback`` is off; nothing is deleted.
        """
        label = parse_label(label)
        base = self.resolve_base(ref)
        if base is None:
            return ClearResult(cleared=0, resolved_recipe_id=None, crossed=False)
        resolved, crossed = self.resolved_recipe_id(ref, base)
        if crossed and not allow_fallback:
            where = f"recipe '{resolved}'" if resolved is not None else "the legacy datasets folder"
            raise CrossRecipeDeleteError(
                f"recipe '{ref.recipe_id}' has no dataset folder of its own: the clear would delete the samples of "
                f"{where}; refused (BDI_DATASET_CLEAR_FALLBACK=1 allows it)")
        try:
            entries = list(os.scandir(self._label_dir(base, label)))
        except OSError:
            return ClearResult(cleared=0, resolved_recipe_id=resolved, crossed=crossed)
        cleared = 0
        for entry in entries:
            if not entry.is_file(follow_symlinks=False):
                continue
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise StorageError(f"cannot delete {entry.name}: {exc}") from exc
            cleared += 1
        return ClearResult(cleared=cleared, resolved_recipe_id=resolved, crossed=crossed)


def _read_sidecar(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``<stem>.json`` next to ``path``; None when missing or unreadable."""
    sidecar = path.with_suffix(".json")
    try:
        text = sidecar.read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    except (OSError, UnicodeDecodeError) as exc:
        slog("datasets.meta_unreadable", path=str(sidecar), error=str(exc))
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        slog("datasets.meta_corrupt", path=str(sidecar), error=str(exc))
        return None
    if not isinstance(value, dict):
        slog("datasets.meta_corrupt", path=str(sidecar), error="not a JSON object")
        return None
    return value


def _link_exclusive(src: Path, dst: Path) -> bool:
    """Make the complete file ``src`` appear at ``dst`` only if ``dst`` is free; False when taken."""
    try:
        os.link(src, dst)
        return True
    except FileExistsError:
        return False
    except OSError:
        pass  # no hard links on this filesystem: reserve the name, then replace it atomically
    try:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        return False
    os.close(fd)
    os.replace(src, dst)
    return True


def image_files(directory: Path) -> list[Path]:
    """Image files (by extension) directly in ``directory``, sorted by name; [] when it is not a folder.

    Other OS errors (e.g. permissions) propagate.
    """
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(Path(e.path) for e in entries if is_image_name(e.name) and e.is_file())
