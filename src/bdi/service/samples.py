"""The sample folders (docs/contract.md "Endpoints", ``/datasets/*``): upload checked as a whole, list, read,
delete, clear."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from bdi.errors import InvalidInputError, NotFoundError, StorageError
from bdi.logging import slog
from bdi.patchcore.imaging import parse_shape, validate_mm_per_px
from bdi.refs import DatasetRef
from bdi.service.context import ServiceContext
from bdi.storage.datasets import ClearResult, UploadItem, parse_label


class Samples:
    """A dataset's OK/NG samples and their sidecars (``bdi.storage.datasets.DatasetStore``)."""

    def __init__(self, ctx: ServiceContext) -> None:
        self._ctx = ctx

    def upload(
        self,
        *,
        ref: DatasetRef,
        label: str,
        files: Sequence[tuple[str | None, bytes]],
        metas: Sequence[str] | None = None,
    ) -> list[str]:
        """Validate every file and meta, lock mm_per_px, then store all files or none (the upload routes)."""
        ctx = self._ctx
        label = parse_label(label)
        if not files:
            raise InvalidInputError("images: at least one file is required")
        ctx.limits.check_file_count(len(files))
        metas = list(metas or [])
        if metas and len(metas) != len(files):
            raise InvalidInputError("metas length must match images length")
        parsed = [_parse_meta(text, index=i) for i, text in enumerate(metas)] or [{} for _ in files]
        for (name, data), meta in zip(files, parsed, strict=True):
            ctx.decode(data, name=name or "image")
            parse_shape(meta.get("shape_json"))  # None/"" mean the full image
        for meta in parsed:
            if "mm_per_px" in meta:
                ctx.store.lock_mm_per_px(ref.recipe_id, validate_mm_per_px(meta["mm_per_px"]))
        items = [UploadItem(data=data, client_filename=name, meta=meta)
                 for (name, data), meta in zip(files, parsed, strict=True)]
        return ctx.datasets.save(ref, label, items)

    def listing(self, ref: DatasetRef) -> dict[str, Any]:
        """``{"role_id", "roi_id", "classes"}`` of the resolved dataset (GET /datasets/list)."""
        return self._ctx.datasets.listing(ref)

    def read(self, *, ref: DatasetRef, label: str, filename: str) -> tuple[str, bytes]:
        """``(stored name, bytes)`` of one sample (GET /datasets/file); NotFoundError when absent."""
        path = self._ctx.datasets.file_path(ref, label, filename)
        try:
            return path.name, path.read_bytes()
        except (FileNotFoundError, IsADirectoryError) as exc:
            raise NotFoundError("file not found") from exc
        except OSError as exc:
            raise StorageError(f"cannot read {path.name}: {exc}") from exc

    def meta(self, *, ref: DatasetRef, label: str, filename: str) -> dict[str, Any]:
        """The sidecar of one sample (GET /datasets/meta); NotFoundError when absent."""
        return self._ctx.datasets.read_meta(ref, label, filename)

    def delete(self, *, ref: DatasetRef, label: str, filename: str) -> bool:
        """Remove one sample and its sidecar (DELETE /datasets/file); True when the image existed."""
        return self._ctx.datasets.delete(ref, label, filename)

    def clear(self, *, ref: DatasetRef, label: str) -> ClearResult:
        """Remove every file of one label (DELETE /datasets/clear): how many, and from which recipe's folder.
        A clear the read fallback takes to another recipe is refused unless ``Settings.dataset_clear_fallback``
        (:class:`CrossRecipeDeleteError`); an allowed one is logged as ``datasets.clear.crossed``."""
        result = self._ctx.datasets.clear(ref, label, allow_fallback=self._ctx.settings.dataset_clear_fallback)
        if result.crossed:
            slog("datasets.clear.crossed", recipe_id=ref.recipe_id, resolved_recipe_id=result.resolved_recipe_id,
                 label=label, cleared=result.cleared)
        return result


def _parse_meta(text: str, *, index: int) -> dict[str, Any]:
    """One ``metas[i]`` text as a JSON object ({} when empty)."""
    if text is None or str(text).strip() == "":
        return {}
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, TypeError) as exc:
        raise InvalidInputError(f"metas[{index}] is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):  # null included: any non-object JSON is bad input
        raise InvalidInputError(f"metas[{index}] must be a JSON object, got {type(value).__name__}")
    return value
