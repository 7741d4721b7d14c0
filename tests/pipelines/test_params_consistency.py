"""params.yaml (what DVC tracks) must equal the composition of conf/, and dvc.yaml must only name keys it has."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from pipelines.config import compose_config, compose_params, params_diff, to_plain, validate

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


def test_params_yaml_is_byte_for_byte_what_dvc_composes(tmp_path: Path) -> None:
    composed = tmp_path / "params.yaml"
    compose_params(composed)  # DVC's own compose_and_dump, as `dvc exp run -S ...` calls it
    assert (PROJECT / "params.yaml").read_text(encoding="utf-8") == composed.read_text(encoding="utf-8")


def test_dvc_hydra_composition_is_enabled_and_finds_the_schema_plugin(tmp_path: Path) -> None:
    import configparser

    config = configparser.ConfigParser()
    config.read(PROJECT / ".dvc" / "config")
    assert config["hydra"]["enabled"] == "true" and config["hydra"]["config_dir"] == "conf"
    composed = tmp_path / "params.yaml"
    # In a fresh process that never imported pipelines.config (as DVC's is), outside the project: only the
    # plugin under the project root (DVC's hydra.plugins_path default) can register bdi_schema.
    code = ("import sys; from dvc.utils.hydra import compose_and_dump; "
            "compose_and_dump(sys.argv[1], sys.argv[2], None, 'config', sys.argv[3], sys.argv[4:])")
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
             if p and Path(p).resolve() != PROJECT]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    out = subprocess.run([sys.executable, "-c", code, str(composed), str(PROJECT / "conf"), str(PROJECT),
                          "model=tiny", "model.memory.coreset_rate=0.05"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    model = yaml.safe_load(composed.read_text(encoding="utf-8"))["model"]
    features, memory = model["features"], model["memory"]
    assert (features["weights"], features["depth"], memory["coreset_rate"]) == ("random", 4, 0.05)


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
    outs = {next(iter(o)) if isinstance(o, dict) else o for s in dvc["stages"].values()
            for o in [*s.get("outs", []), *s.get("metrics", [])]}
    paths = {k for k in _params()["paths"] if k != "weights_cache_dir"}
    assert {f"${{paths.{k}}}" for k in paths} == outs
