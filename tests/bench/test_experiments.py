"""bench.experiments: every variant is a valid setting, and each fold chooses on its own calibration half only."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.experiments import DEFAULT, VARIANTS, choose_per_fold, variant_settings, verdict


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_variant_is_a_valid_library_setting(name: str, tmp_path: Path) -> None:
    settings = variant_settings(VARIANTS[name], tmp_path)
    for group, changed in VARIANTS[name].items():
        for key, value in changed.items():
            got = getattr(getattr(settings.model, group), key)
            assert (list(got) if isinstance(got, tuple) else got) == value


def test_a_fold_chooses_on_its_calibration_half_and_never_on_the_half_it_reports() -> None:
    keys = {DEFAULT: {"calib": (0.90, 0.7), "eval": (0.90, 0.7)},
            "good-on-calib": {"calib": (0.99, 0.7), "eval": (0.80, 0.7)},
            "good-on-eval": {"calib": (0.80, 0.7), "eval": (0.95, 0.7)}}
    assert choose_per_fold(keys) == ("good-on-calib", "good-on-eval")


def test_pixel_auroc_breaks_an_image_auroc_tie_and_the_default_wins_a_full_tie() -> None:
    keys = {DEFAULT: {"calib": (0.9, 0.7), "eval": (0.9, 0.7)},
            "sharper": {"calib": (0.9, 0.8), "eval": (0.9, 0.7)}}
    assert choose_per_fold(keys) == ("sharper", DEFAULT)


def _diffs(**verdicts: str) -> dict[str, dict[str, object]]:
    return {k: {"diff": 0.0, "ci": (0.0, 0.0), "verdict": v} for k, v in verdicts.items()}


def test_a_variant_both_folds_choose_replaces_the_default_only_where_the_intervals_say_it_is_better() -> None:
    same = ("blocks4", "blocks4")
    assert verdict(same, [_diffs(image_auroc="no difference shown")] * 2)[0] is None
    assert verdict(same, [_diffs(image_auroc="better"), _diffs(image_auroc="no difference shown")])[0] == "blocks4"
    winner, why = verdict(same, [_diffs(image_auroc="better"), _diffs(escape_rate="worse")])
    assert winner is None and "escape_rate" in why
    assert verdict(("blocks4", DEFAULT), [_diffs(image_auroc="better"), None])[0] is None
    assert verdict((DEFAULT, DEFAULT), [None, None])[0] is None
