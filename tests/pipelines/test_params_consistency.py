"""params.yaml (what DVC tracks) must equal the composition of conf/, and dvc.yaml must only name keys it has."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from pipelines.config import compose_config, params_diff, to_plain, validate

PROJECT = Path(__file__).resolve().parents[2]


def _params() -> dict[str, Any]:
    return yaml.safe_load((PROJECT / "params.yaml").read_text(encoding="utf-8"))


def _lookup(data: dict[str, Any], dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        assert isinstance(node, dict) and part in node, f"dvc.yaml names ${{{dotted}}}, absent from params.yaml"
        node = node[part]
    return node


def test_params_yaml_equals_composed_conf() -> None:
    expected = to_plain(compose_config())
    diff = params_diff(expected, _params())
    assert not diff, (
        "params.yaml differs from conf/ (regenerate: python -m pipelines.config --write params.yaml):\n" + diff
    )


def test_params_yaml_matches_the_schema() -> None:
    validate(_params(), source="params.yaml")


def test_dvc_yaml_interpolations_exist_in_params() -> None:
    text = (PROJECT / "dvc.yaml").read_text(encoding="utf-8")
    keys = set(re.findall(r"\$\{([^}]+)\}", text))
    assert keys, "dvc.yaml should take its paths from params.yaml"
    params = _params()
    for key in keys:
        assert isinstance(_lookup(params, key), str)


def test_dvc_stage_params_are_whole_sections_of_params() -> None:
    dvc = yaml.safe_load((PROJECT / "dvc.yaml").read_text(encoding="utf-8"))
    params = _params()
    for name, stage in dvc["stages"].items():
        assert stage["cmd"] == f"python -m pipelines.{name}"
        assert f"pipelines/{name}.py" in stage["deps"] and "src/bdi" in stage["deps"]
        for section in stage["params"]:
            assert section in params, f"stage {name} tracks unknown params section {section}"


def test_every_output_path_is_a_stage_output() -> None:
    dvc = yaml.safe_load((PROJECT / "dvc.yaml").read_text(encoding="utf-8"))
    outs = {next(iter(o)) if isinstance(o, dict) else o for s in dvc["stages"].values() for o in s.get("outs", [])}
    paths = {k for k in _params()["paths"] if k != "weights_cache_dir"}
    assert {f"${{paths.{k}}}" for k in paths} == outs
