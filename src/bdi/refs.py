"""Ids and refs: which model or dataset a request names, and how those ids become folder names.

Recipe ids are normalised (docs/contract.md "Recipe id"), model keys are escaped injectively, role/roi ids are
urlsafe-base64 encoded into file bases, so no id reaches a path raw (docs/design.md "No id reaches a path raw").
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from dataclasses import dataclass
from pathlib import Path

from bdi.errors import InvalidInputError, InvalidRecipeError, ReservedRecipeError, StorageError

RECIPE_ID_PATTERN = "^[a-z0-9][a-z0-9_-]{0,63}$"
DEFAULT_RECIPE = "default"
RESERVED_RECIPES = frozenset({"last"})
MODEL_KEY_MAX_LEN = 80  # the legacy sanitiser's cut; only used to find legacy folders
MODEL_KEY_DIR_MAX_LEN = 200  # an escaped model-key folder name longer than this is refused
MAX_BASE_LEN = 200  # leaves room for "_index.faiss" and temp-file affixes under NAME_MAX (255)

_RECIPE_RE = re.compile(RECIPE_ID_PATTERN.strip("^$"))
_MODEL_KEY_BAD = re.compile(r"[^A-Za-z0-9._-]")
_MODEL_KEY_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")


def resolve_recipe_id(raw: str | None) -> str:
    """Trim, lower-case, empty → ``default``; ``last`` is reserved; the rest must match the pattern."""
    value = (raw or "").strip().lower()
    if not value:
        return DEFAULT_RECIPE
    if value in RESERVED_RECIPES:
        raise ReservedRecipeError(f"recipe_id '{value}' is reserved")
    if not _RECIPE_RE.fullmatch(value):
        raise InvalidRecipeError(f"invalid recipe_id {raw!r}: must match {RECIPE_ID_PATTERN}")
    return value


def pick_recipe_id(*, explicit: object, header: str | None) -> str:
    """An explicit non-empty string (form/JSON/query), else the header, else default
    (docs/contract.md "Recipe id")."""
    if isinstance(explicit, str) and explicit != "":
        return resolve_recipe_id(explicit)
    return resolve_recipe_id(header)


def effective_model_key(raw: str | None, *, roi_id: str) -> str:
    """The model key (``roi_id`` when missing or empty: docs/contract.md "Model key"), trimmed; empty or only
    dots is refused."""
    value = (raw if raw else roi_id or "").strip()
    if not value:
        raise InvalidInputError(f"invalid model_key {raw!r}: it must not be empty (after trimming)")
    if set(value) == {"."}:
        raise InvalidInputError(f"invalid model_key {raw!r}: it must not be '.', '..' or only dots")
    return value


def sanitize_model_key(raw: str | None, *, roi_id: str) -> str:
    """The model key's folder name: injective, so two keys never share a model.

    The trimmed key's UTF-8 bytes are escaped as ``~XX`` (hex) except ``[A-Za-z0-9._-]``: the keys
    the GUI sends (``inspection-1``) keep their legacy folder name, ``a b`` → ``a~20b`` and ``a_b`` →
    ``a_b`` differ, and ``~`` itself is escaped. (``~``, not ``%``: MLflow URL-decodes artefact paths.)
    Empty, only-dots and over-long keys are refused (:class:`InvalidInputError`); nothing is cut.
    """
    value = effective_model_key(raw, roi_id=roi_id)
    encoded = "".join(chr(b) if b in _MODEL_KEY_SAFE else f"~{b:02X}" for b in value.encode("utf-8"))
    if len(encoded) > MODEL_KEY_DIR_MAX_LEN:
        raise InvalidInputError(
            f"model_key too long: its folder name would exceed {MODEL_KEY_DIR_MAX_LEN} characters"
        )
    return encoded


def legacy_model_key_dir(raw: str | None, *, roi_id: str) -> str:
    """The folder the legacy sanitiser gave a key (unsafe chars → ``_``, trim, cut to 80,
    empty → ``default``); read-only fallback for models stored before the injective naming."""
    value = raw if raw else roi_id
    return _MODEL_KEY_BAD.sub("_", value or "").strip()[:MODEL_KEY_MAX_LEN] or "default"


def encode_id(value: str) -> str:
    """URL-safe base64 of the UTF-8 bytes without ``=`` padding; empty → ``default``."""
    if not value:
        return "default"
    return base64.urlsafe_b64encode(value.encode("utf-8")).decode("ascii").rstrip("=")


def decode_id(value: str) -> str | None:
    """Inverse of :func:`encode_id` (``default`` → ""); None when ``value`` is not such a name."""
    if value == "default":
        return ""
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode("utf-8")
    except (binascii.Error, ValueError):
        return None


def roi_base(role_id: str, roi_id: str) -> str:
    """Per-ROI file base name: ``encode_id(role) + "__" + encode_id(roi)``."""
    return f"{encode_id(role_id)}__{encode_id(roi_id)}"


def checked_roi_base(role_id: str, roi_id: str) -> str:
    """:func:`roi_base`, rejecting ids whose encoded name would not fit a file name."""
    base = roi_base(role_id, roi_id)
    if len(base) > MAX_BASE_LEN:
        raise InvalidInputError("role_id/roi_id too long: the encoded name exceeds 200 characters")
    return base


def legacy_name(value: str) -> str:
    """``S()`` of docs/contract.md "Model read order": trim, every char not alphanumeric, '-' or '_' → '_';
    empty → ``default``."""
    out = "".join(c if (c.isalnum() or c in "-_") else "_" for c in (value or "").strip())
    return out or "default"


def check_recipe_id(recipe_id: str) -> None:
    """Raise :class:`InvalidRecipeError` unless ``recipe_id`` is already normalised and valid."""
    if resolve_recipe_id(recipe_id) != recipe_id:
        raise InvalidRecipeError(f"invalid recipe_id {recipe_id!r}: must match {RECIPE_ID_PATTERN}")


def ensure_inside(root: Path, path: Path) -> Path:
    """``path`` if it lies under ``root`` after normalising ``..``; else StorageError.

    The check is lexical (``os.path.normpath`` of absolute paths): ids can only add path components,
    and symlinks an operator places inside the root are trusted.
    """
    root_abs = Path(os.path.normpath(os.path.abspath(root)))
    path_abs = Path(os.path.normpath(os.path.abspath(path)))
    if not path_abs.is_relative_to(root_abs):
        raise StorageError(f"refusing a path outside the models root: {path}")
    return path


def recipe_dir_candidates(recipes_root: Path, recipe_id: str) -> list[Path]:
    """The recipe dirs of the model and dataset read orders: the exact one, then (recipe ≠ default)
    case-insensitive matches in name order, then ``default``."""
    out = [recipes_root / recipe_id]
    if recipe_id == DEFAULT_RECIPE:
        return out
    try:
        names = sorted(entry.name for entry in os.scandir(recipes_root) if entry.is_dir())
    except OSError:
        names = []
    out.extend(recipes_root / name for name in names if name != recipe_id and name.lower() == recipe_id)
    out.append(recipes_root / DEFAULT_RECIPE)
    return out


@dataclass(frozen=True)
class ModelRef:
    """Which model: a validated recipe id, the raw role/roi ids and the raw effective model key."""

    recipe_id: str
    role_id: str
    roi_id: str
    model_key: str

    def __post_init__(self) -> None:
        check_recipe_id(self.recipe_id)
        checked_roi_base(self.role_id, self.roi_id)
        sanitize_model_key(self.model_key, roi_id=self.roi_id)

    @classmethod
    def create(cls, *, recipe_id: str | None, role_id: str, roi_id: str, model_key: str | None) -> ModelRef:
        """Normalise the recipe id and default the model key to ``roi_id``."""
        return cls(
            recipe_id=resolve_recipe_id(recipe_id),
            role_id=role_id,
            roi_id=roi_id,
            model_key=model_key if model_key else roi_id,
        )

    def to_dict(self) -> dict[str, str]:
        """``{"recipe_id", "role_id", "roi_id", "model_key"}``: the one JSON form of a model's ids (the npz's
        ``model_ref``, a ``/calibrate_dataset`` calibration, MLflow tags and registry descriptions)."""
        return {"recipe_id": self.recipe_id, "role_id": self.role_id, "roi_id": self.roi_id,
                "model_key": self.model_key}

    def dataset_ref(self) -> DatasetRef:
        """The dataset this model is fitted and calibrated from (same recipe, role and roi)."""
        return DatasetRef(recipe_id=self.recipe_id, role_id=self.role_id, roi_id=self.roi_id)

    @property
    def model_key_fs(self) -> str:
        return sanitize_model_key(self.model_key, roi_id=self.roi_id)

    @property
    def model_key_legacy(self) -> str:
        """The key as the legacy sanitiser wrote it (``a b`` → ``a_b``): what /manifest reports (M2)."""
        return legacy_model_key_dir(self.model_key, roi_id=self.roi_id)

    @property
    def base(self) -> str:
        return roi_base(self.role_id, self.roi_id)


@dataclass(frozen=True)
class DatasetRef:
    """Which dataset: a validated recipe id and the raw role/roi ids (model_key plays no part)."""

    recipe_id: str
    role_id: str
    roi_id: str

    def __post_init__(self) -> None:
        check_recipe_id(self.recipe_id)
        checked_roi_base(self.role_id, self.roi_id)

    @property
    def base(self) -> str:
        return roi_base(self.role_id, self.roi_id)
