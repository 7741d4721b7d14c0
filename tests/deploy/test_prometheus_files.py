"""deploy/prometheus: the scrape config and the alert rules pass ``promtool check``, the rules pass their unit
tests (tests/deploy/alerts_test.yml) and compose runs Prometheus on them. promtool comes with Debian's
``prometheus`` package (.ci/run installs it; under CI=true a missing promtool fails instead of skipping)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

PROJECT = Path(__file__).resolve().parents[2]
PROMETHEUS = PROJECT / "deploy" / "prometheus"
RULE_TESTS = Path(__file__).resolve().parent / "alerts_test.yml"


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        reason = "promtool is not installed (apt-get install prometheus)"
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(f"{reason}; CI=true: .ci/run installs it", pytrace=False)
        pytest.skip(reason)
    return found


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=120, check=False, cwd=PROJECT)


def test_promtool_accepts_the_alert_rules() -> None:
    out = run_promtool("check", "rules", str(PROMETHEUS / "alerts.yml"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_promtool_accepts_the_scrape_config() -> None:
    out = run_promtool("check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 rule files found" in out.stdout


def test_alert_rules_pass_their_unit_tests() -> None:
    out = run_promtool("test", "rules", str(RULE_TESTS))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_scrape_config_scrapes_each_replica_at_metrics() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text(encoding="utf-8"))
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "bdi"]
    assert job["metrics_path"] == "/metrics"
    targets = {t for group in job["static_configs"] for t in group["targets"]}
    assert targets == {"bdi-a:8000", "bdi-b:8000"}  # the replicas themselves, not nginx
    assert config["rule_files"] == ["alerts.yml"]


def test_compose_runs_prometheus_on_these_files() -> None:
    compose = yaml.safe_load((PROJECT / "deploy" / "compose.yaml").read_text(encoding="utf-8"))
    prometheus = compose["services"]["prometheus"]
    assert any(v.startswith("./prometheus:/etc/prometheus") for v in prometheus["volumes"])
    assert {"bdi-a", "bdi-b"} <= set(prometheus["depends_on"])
