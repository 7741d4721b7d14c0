"""Named deliberate breaks of the core modules, each run against the tests that claim to catch it (issue 31).

    python -m tests.mutations                  # every break (several minutes: some tests start servers)
    python -m tests.mutations --list           # the breaks and their tests
    python -m tests.mutations --only fsio.fit-lock-noop --report /tmp/mutations.md

A break is a file, a search string (it must occur exactly once) and its replacement. Each is applied on its
own to a temporary copy of the working tree (``git ls-files``: tracked and untracked, not ignored), its
tests run there with pytest (the copy's ``src`` first on ``PYTHONPATH``), and the copy is restored. A break
is *killed* when its tests fail, *survived* when they pass; a search string no longer in the file is
*stale* (update the break with the code). The table it prints is the one in docs/testing.md; a break kept
on the list while it survives says why in its ``note``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Break:
    name: str
    path: str
    search: str
    replace: str
    tests: tuple[str, ...]
    note: str = ""


BREAKS: tuple[Break, ...] = (
    # ------------------------------------------------------------------ bdi.storage.fsio / store
    Break("fsio.delete-before-replace", "src/bdi/storage/fsio.py",
          "        tmp = write_temp_file(path.parent, data)\n",
          "        path.unlink(missing_ok=True)\n        tmp = write_temp_file(path.parent, data)\n",
          ("tests/unit/test_store.py", "tests/serving/test_crash_recovery.py")),
    Break("fsio.no-fsync", "src/bdi/storage/fsio.py",
          "        os.fsync(fd)\n    except BaseException:",
          "        pass\n    except BaseException:",
          ("tests/unit/test_store.py",),
          note="expected to survive: a missing fsync only loses data on power loss, which no test can cause"),
    Break("fsio.orphans-young-removed", "src/bdi/storage/fsio.py",
          "path.lstat().st_mtime <= cutoff", "path.lstat().st_mtime >= cutoff",
          ("tests/serving/test_startup_recovery.py",)),
    Break("fsio.fit-lock-noop", "src/bdi/storage/fsio.py",
          "        lock.acquire()\n", "        pass\n",
          ("tests/unit/test_fsio_lock.py", "tests/unit/test_fit_lock.py", "tests/serving/test_fit_lock_http.py")),
    Break("model_lock.flock-noop", "src/bdi/storage/model_lock.py",
          "            fcntl.flock(fd, flags)\n", "            pass\n",
          ("tests/unit/test_sync.py::test_a_second_writer_times_out_with_a_storage_error",
           "tests/unit/test_sync.py::test_infer_waits_for_a_sync_in_progress_and_sees_the_whole_new_version")),
    # ------------------------------------------------------------------ bdi.patchcore.calibration
    Break("calibration.overlap-rule-dropped", "src/bdi/patchcore/calibration.py",
          "threshold = cfg.overlap_factor * p_ok if p_ng <= p_ok else (p_ok + p_ng) / 2.0",
          "threshold = (p_ok + p_ng) / 2.0",
          ("tests/unit/test_calibration.py",)),
    Break("calibration.overlap-boundary", "src/bdi/patchcore/calibration.py",
          "if p_ng <= p_ok else", "if p_ng < p_ok else",
          ("tests/unit/test_calibration.py", "tests/unit/test_decision_boundaries.py")),
    Break("calibration.decide-strict", "src/bdi/patchcore/calibration.py",
          'return "ng" if score >= threshold else "ok"', 'return "ng" if score > threshold else "ok"',
          ("tests/unit/test_calibration.py", "tests/unit/test_inference.py", "tests/unit/test_decision_boundaries.py")),
    Break("calibration.unbound-accepted", "src/bdi/patchcore/calibration.py",
          "    if not calib.memory_fingerprint:\n        raise",
          "    if False:\n        raise",
          ("tests/unit/test_calibration.py",)),
    # ------------------------------------------------------------------ bdi.mlops.promotion (the gate)
    Break("promotion.auroc-may-drop", "src/bdi/mlops/promotion.py",
          "GateCheck(metric, value >= held, value, held,", "GateCheck(metric, value >= held - 0.05, value, held,",
          ("tests/unit/test_promotion.py",)),
    Break("promotion.limits-ignored", "src/bdi/mlops/promotion.py",
          "return GateCheck(name, value <= limit, value, limit,", "return GateCheck(name, True, value, limit,",
          ("tests/unit/test_promotion.py",)),
    Break("promotion.limit-boundary", "src/bdi/mlops/promotion.py",
          "return GateCheck(name, value <= limit, value, limit,", "return GateCheck(name, value < limit, value, limit,",
          ("tests/unit/test_promotion.py",)),
    Break("promotion.latency-boundary", "src/bdi/mlops/promotion.py",
          "    if value <= limit:\n", "    if value < limit:\n",
          ("tests/unit/test_promotion.py::test_gate_passes_a_value_exactly_at_each_limit",)),
    Break("cli.promote-verdict-ignored", "src/bdi/cli.py",
          "    if not result.moved:\n", "    if False:\n",
          ("tests/unit/test_promotion.py::test_cli_promote_with_the_gate_refuses_a_worse_version_exits_1_and_keeps_the_alias",)),
    # ------------------------------------------------------------------ bdi.patchcore.weights (the sha256 pin)
    Break("weights.package-file-unchecked", "src/bdi/patchcore/weights.py",
          "        if got != official.sha256:\n",
          "        if official.package is None and got != official.sha256:\n",
          ("tests/unit/test_backbones.py", "tests/unit/test_features.py")),
    Break("weights.official-name-unchecked", "src/bdi/patchcore/weights.py",
          "    if path.name == official.filename and got != official.sha256:",
          "    if False:",
          ("tests/unit/test_backbones.py", "tests/unit/test_features.py")),
    # ------------------------------------------------------------------ issue 31's other holes
    Break("cli.watch-syncs-once", "src/bdi/cli.py",
          "        follower.run()\n", "        follower.interval_s = 0\n        follower.run()\n",
          ("tests/unit/test_sync.py::test_bdi_sync_watch_follows_a_promotion_made_while_it_runs_until_sigterm",)),
    Break("outages.check-calls-a-missing-api", "src/bdi/mlops/outages.py",
          "search_experiments(max_results=1)", "search_experiment(max_results=1)",
          ("tests/unit/test_tracking.py::test_each_mlflow_call_times_out_against_a_server_that_accepts_and_stalls",)),
    Break("shadow.champion-score-logged", "src/bdi/mlops/shadow.py",
          'challenger={"score": float(outcome.result.score),', 'challenger={"score": float(champion["score"]),',
          ("tests/serving/test_registry_follow.py::test_shadow_mode_logs_the_challengers_score_while_the_champion_decides",)),
    Break("features.bf16-not-applied", "src/bdi/patchcore/features.py",
          "            return torch.autocast(device_type=self._device.type, dtype=torch.bfloat16)\n",
          "            return nullcontext()\n",
          ("tests/serving/test_precision_setting.py",)),
    Break("features.intensity-not-standardized", "src/bdi/patchcore/features.py",
          '        standardize = (intensity or self._cfg.intensity) == "standardize"\n',
          "        standardize = False\n",
          ("tests/unit/test_intensity.py",)),
    Break("model.fitted-intensity-ignored", "src/bdi/patchcore/model.py",
          "        intensity = fitted_intensity(self.memory.metadata)\n",
          "        intensity = None\n",
          ("tests/unit/test_intensity.py",)),
    Break("metrics.per-class-pixel-pooled", "src/bdi/data/metrics.py",
          "                per_class[cls][\"pixel_auroc\"], per_class[cls][\"aupro\"] = class_auroc, class_pro\n",
          "                per_class[cls][\"pixel_auroc\"], per_class[cls][\"aupro\"] = pix_auroc, pro\n",
          ("tests/unit/test_evaluation.py",)),
    Break("inference.self-contrast-off", "src/bdi/patchcore/inference.py",
          "    if cfg.self_contrast:\n", "    if False:\n",
          ("tests/unit/test_inference.py", "tests/unit/test_self_contrast.py")),
    Break("inference.self-contrast-peak-not-kept", "src/bdi/patchcore/inference.py",
          "    out: np.ndarray = (sharpened * (before / after)).astype(np.float32)\n",
          "    out: np.ndarray = sharpened.astype(np.float32)\n",
          ("tests/unit/test_inference.py",)),
    Break("inference.self-contrast-padding-in-part", "src/bdi/patchcore/inference.py",
          "    part: np.ndarray = (inside & on_rows[:, None] & on_cols[None, :]).ravel()\n",
          "    part: np.ndarray = inside.ravel()\n",
          ("tests/unit/test_inference.py",)),
    # ------------------------------------------------------------------ issue 28: access control and audit trail
    Break("auth.checked-after-the-body", "serving/auth.py",
          "        if route_scope_ is None:  # no route: the router answers 404/405\n",
          "        if True:  # the middleware lets everything through: only the route dependency checks\n",
          ("tests/serving/test_auth.py::test_upload_without_key_is_refused_before_body_is_read",)),
    Break("auth.route-without-scope", "serving/routes/state.py",
          'dependencies=[error_style("resource"), scoped("inspect")]', 'dependencies=[error_style("resource")]',
          ("tests/serving/test_auth.py::test_every_operation_of_the_app_is_a_route_of_the_routers_with_a_declared_scope",)),
    Break("keys.secret-not-compared", "src/bdi/security/keys.py",
          "        if not hmac.compare_digest(_digest(key.salt, secret), key.hash):\n",
          "        if False:\n",
          ("tests/unit/test_security_keys.py",)),
    Break("keys.revocation-ignored", "src/bdi/security/keys.py",
          "        if self.revoked_utc is not None:\n            return False\n",
          "        if self.revoked_utc is not None:\n            pass\n",
          ("tests/unit/test_security_keys.py", "tests/serving/test_auth_workers.py")),
    Break("audit.chain-not-checked", "src/bdi/security/audit.py",
          '        elif record.get("prev") != prev_hash:\n', "        elif False:\n",
          ("tests/unit/test_security_audit.py",)),
    Break("audit.append-unlocked", "src/bdi/security/audit.py",
          "            fcntl.flock(fd, fcntl.LOCK_EX)\n", "            pass\n",
          ("tests/unit/test_security_audit.py::test_two_processes_appending_at_once_never_interleave_or_lose_records",),
          note="may survive on a quiet machine: two processes must read the same last record between lock and write"),
    Break("audit.torn-line-chained", "src/bdi/security/audit.py",
          '                prefix = b"\\n"  # ends the fragment', '                prefix = b""  # ends the fragment',
          ("tests/unit/test_security_audit.py",)),
)


def _tree_files(repo: Path) -> list[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=repo, capture_output=True,
                         check=True)
    return [name for name in out.stdout.decode().split("\0") if name and (repo / name).is_file()]


def _copy_tree(repo: Path, dest: Path) -> None:
    for name in _tree_files(repo):
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / name, target, follow_symlinks=False)


def run_break(brk: Break, copy: Path, *, timeout_s: float) -> tuple[str, float, str]:
    """Apply ``brk`` in ``copy``, run its tests, restore. Returns (outcome, seconds, last output line)."""
    target = copy / brk.path
    original = target.read_text(encoding="utf-8")
    if original.count(brk.search) != 1:
        return "stale", 0.0, f"search string found {original.count(brk.search)} times in {brk.path}"
    target.write_text(original.replace(brk.search, brk.replace), encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(copy / "src"), str(copy)]))
    started = time.monotonic()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *brk.tests],
            cwd=copy, env=env, capture_output=True, text=True, timeout=timeout_s, check=False)
        code, tail = result.returncode, (result.stdout.strip().splitlines() or [""])[-1]
    except subprocess.TimeoutExpired:
        code, tail = -1, f"timed out after {timeout_s:.0f} s"
    finally:
        target.write_text(original, encoding="utf-8")
    outcome = {0: "survived", 1: "killed"}.get(code, "error")
    return outcome, time.monotonic() - started, tail


def report(rows: list[tuple[Break, str, float, str]]) -> str:
    lines = ["| break | file | tests | outcome | s | note |", "|---|---|---|---|---|---|"]
    for brk, outcome, seconds, tail in rows:
        note = brk.note or ("" if outcome == "killed" else tail)
        tests = "<br>".join(f"`{t}`" for t in brk.tests)
        lines.append(f"| `{brk.name}` | `{brk.path}` | {tests} | **{outcome}** | {seconds:.0f} | {note} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.mutations", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", default=[], help="run only this break (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the breaks and exit")
    parser.add_argument("--report", type=Path, help="also write the markdown table here")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per break (default: %(default)s)")
    args = parser.parse_args(argv)
    names = {b.name for b in BREAKS}
    unknown = sorted(set(args.only) - names)
    if unknown:
        parser.error(f"unknown breaks {unknown}; --list shows them")
    chosen = [b for b in BREAKS if not args.only or b.name in args.only]
    if args.list:
        for brk in chosen:
            sys.stdout.write(f"{brk.name}: {brk.path} -> {' '.join(brk.tests)}\n")
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="bdi-mutations-") as tmp:
        copy = Path(tmp) / "repo"
        _copy_tree(REPO, copy)
        for brk in chosen:
            outcome, seconds, tail = run_break(brk, copy, timeout_s=args.timeout)
            sys.stderr.write(f"{brk.name}: {outcome} ({seconds:.0f} s) {tail}\n")
            rows.append((brk, outcome, seconds, tail))
    table = report(rows)
    sys.stdout.write(table)
    if args.report:
        args.report.write_text(table, encoding="utf-8")
    return 0 if all(outcome in {"killed", "survived"} for _, outcome, _, _ in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
