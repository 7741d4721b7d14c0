"""The public API is one import line (``from bdi import ...``), and ``import bdi`` stays light."""

from __future__ import annotations

import subprocess
import sys

import pytest

import bdi


def test_import_bdi_loads_neither_torch_nor_mlflow() -> None:
    code = "import sys, bdi; print(sorted(m for m in ('torch', 'mlflow', 'faiss', 'cv2') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("name", [n for n in bdi.__all__ if n != "__version__"])
def test_every_public_name_is_the_defining_modules_object(name: str) -> None:
    obj = getattr(bdi, name)
    assert obj.__module__.startswith("bdi.") and obj.__name__ == name


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        bdi.Nope  # noqa: B018
