"""Ids and refs: recipe ids, model-key folder names, encoded role/roi bases."""

from __future__ import annotations

import pytest

from bdi.errors import InvalidInputError, InvalidRecipeError, ReservedRecipeError
from bdi.refs import (
    RECIPE_ID_PATTERN,
    ModelRef,
    decode_id,
    encode_id,
    legacy_name,
    pick_recipe_id,
    resolve_recipe_id,
    roi_base,
    sanitize_model_key,
)

BASE = "SW5zcGVjdGlvbg__aW5zcGVjdGlvbi0x"


def _ref(recipe: str | None = None, model_key: str | None = None) -> ModelRef:
    return ModelRef.create(recipe_id=recipe, role_id="Inspection", roi_id="inspection-1", model_key=model_key)


def test_roi_base_matches_the_contract_example() -> None:
    assert roi_base("Inspection", "inspection-1") == BASE


def test_encode_id_of_empty_is_default_and_decodes_back() -> None:
    assert encode_id("") == "default"
    assert decode_id("default") == ""
    for value in ("Inspection", "ä/ü ..", "a"):
        assert "=" not in encode_id(value)
        assert decode_id(encode_id(value)) == value


@pytest.mark.parametrize("raw", ["last", "LAST", " Last "])
def test_recipe_last_is_reserved_in_any_case(raw: str) -> None:
    with pytest.raises(ReservedRecipeError, match="reserved"):
        resolve_recipe_id(raw)


@pytest.mark.parametrize("raw", ["My Layout", "a" * 65, "-abc", "layout.json", "ñ"])
def test_recipe_outside_the_pattern_is_invalid_and_names_it(raw: str) -> None:
    with pytest.raises(InvalidRecipeError) as info:
        resolve_recipe_id(raw)
    assert "invalid" in str(info.value)
    assert RECIPE_ID_PATTERN in str(info.value)
    assert not isinstance(info.value, ReservedRecipeError)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("DefaultLayout", "defaultlayout"), (None, "default"), ("", "default"), ("  ", "default"),
     (" r1 ", "r1"), ("a" * 64, "a" * 64), ("0_x-y", "0_x-y")],
)
def test_recipe_is_trimmed_and_lower_cased(raw: str | None, expected: str) -> None:
    assert resolve_recipe_id(raw) == expected


def test_pick_recipe_prefers_a_non_empty_explicit_string() -> None:
    assert pick_recipe_id(explicit="abc", header="xyz") == "abc"
    assert pick_recipe_id(explicit="", header="XYZ") == "xyz"
    assert pick_recipe_id(explicit=5, header="xyz") == "xyz"
    assert pick_recipe_id(explicit=None, header=None) == "default"
    with pytest.raises(ReservedRecipeError):
        pick_recipe_id(explicit="Last", header="ok")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("a b", "a~20b"), ("a_b", "a_b"), (None, "inspection-1"), ("", "inspection-1"), ("mk.v1", "mk.v1"),
     ("é/x", "~C3~A9~2Fx"), ("k" * 100, "k" * 100), ("a~20b", "a~7E20b"), (" a ", "a"), ("..a", "..a")],
)
def test_model_key_is_sanitised_for_the_filesystem(raw: str | None, expected: str) -> None:
    assert sanitize_model_key(raw, roi_id="inspection-1") == expected


@pytest.mark.parametrize("raw", [".", "..", "....", " .. ", "   ", "\t"])
def test_model_key_made_of_dots_or_blank_after_trimming_is_rejected(raw: str) -> None:
    with pytest.raises(InvalidInputError):
        sanitize_model_key(raw, roi_id="x")
    with pytest.raises(InvalidInputError):
        _ref(model_key=raw)


def test_model_ref_keeps_the_raw_effective_key() -> None:
    ref = _ref(recipe="R1", model_key="a b")
    assert (ref.recipe_id, ref.model_key, ref.model_key_fs, ref.base) == ("r1", "a b", "a~20b", BASE)
    assert _ref().model_key == "inspection-1"


def test_model_ref_rejects_an_unnormalised_recipe() -> None:
    with pytest.raises(InvalidRecipeError):
        ModelRef(recipe_id="My Layout", role_id="a", roi_id="b", model_key="b")


def test_legacy_name_replaces_unsafe_characters() -> None:
    assert legacy_name(" a/b.c ") == "a_b_c"
    assert legacy_name("..") == "__"
    assert legacy_name("  ") == "default"


def test_over_long_model_key_is_refused_not_cut() -> None:
    with pytest.raises(InvalidInputError, match="model_key too long"):
        sanitize_model_key("é" * 40, roi_id="x")  # 240 escaped characters
