"""Keys and the audit trail across two real uvicorn workers (``python -m serving --workers 2``): a key that
``bdi keys`` creates, revokes or lets expire acts in both workers without a restart, and both workers' writes
land in one verifiable trail, with the client address forwarded by a trusted proxy."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from bdi.security.audit import AuditLog, verify
from tests.helpers.servers import UvicornServer, server_env
from tests.helpers.synthetic import disc_png

pytestmark = pytest.mark.slow

ROLE, ROI = "Inspection", "inspection-1"
BURST = 8


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UvicornServer]:
    tmp = tmp_path_factory.mktemp("auth-workers")
    env = server_env(tmp, BDI_AUTH="writes", BDI_TRUSTED_PROXIES="127.0.0.1")
    with UvicornServer(cwd=tmp, env=env, workers=2, launcher="serving") as started:
        yield started


def bdi(server: UvicornServer, *args: str) -> str:
    """``bdi ARGS`` with the server's own settings (its environment); stdout."""
    out = subprocess.run([sys.executable, "-m", "bdi.cli", *args], env=server.env, cwd=server.cwd,
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout


def new_key(server: UvicornServer, *args: str) -> tuple[str, str]:
    """(id, token) of a new key: the token is the last line, the id is in the line before."""
    lines = bdi(server, "keys", "create", *args).strip().splitlines()
    key_id = lines[0].split()[2]
    return key_id, lines[-1]


def _get(server: UvicornServer, path: str, token: str) -> tuple[str, int]:
    request_id = str(uuid.uuid4())
    response = httpx.get(f"{server.base_url}{path}", timeout=60,
                         headers={"X-API-Key": token, "X-Request-Id": request_id, "Connection": "close"})
    return request_id, response.status_code


def statuses_by_worker(server: UvicornServer, path: str, token: str) -> dict[int, set[int]]:
    """Bursts of simultaneous requests until both workers answered: worker pid → statuses it answered."""
    seen: dict[int, set[int]] = {}
    deadline = time.monotonic() + 60
    while len(seen) < 2 and time.monotonic() < deadline:
        with ThreadPoolExecutor(BURST) as pool:
            answers = list(pool.map(lambda _: _get(server, path, token), range(BURST)))
        time.sleep(0.3)  # the workers' http log lines
        pids = {e["request_id"]: e["pid"] for e in server.events("http")}
        for request_id, status in answers:
            if request_id in pids:
                seen.setdefault(pids[request_id], set()).add(status)
    assert len(seen) == 2, f"only workers {sorted(seen)} answered"
    return seen


def test_a_key_opens_both_workers_and_its_revocation_closes_both_without_a_restart(server: UvicornServer) -> None:
    key_id, token = new_key(server, "--scope", "admin", "--label", "it-desk")
    assert all(s == {200} for s in statuses_by_worker(server, "/audit", token).values())
    bdi(server, "keys", "revoke", key_id)
    assert all(s == {401} for s in statuses_by_worker(server, "/audit", token).values())


def test_an_expired_key_is_refused_by_both_workers(server: UvicornServer) -> None:
    _, token = new_key(server, "--scope", "admin", "--label", "short", "--expires-days", "0.00005")  # ~4 s
    assert _get(server, "/audit", token)[1] == 200
    time.sleep(5)
    assert all(s == {401} for s in statuses_by_worker(server, "/audit", token).values())


def test_writes_from_both_workers_land_in_one_verifiable_trail(server: UvicornServer) -> None:
    _, token = new_key(server, "--scope", "samples", "--label", "line-3-gui")
    audit = AuditLog(Path(server.env["BDI_MODELS_DIR"]) / ".security")
    before = sum(1 for _ in audit.records())

    def send(i: int) -> str:
        request_id = f"upload-{i}"
        response = httpx.post(
            f"{server.base_url}/datasets/ok/upload", timeout=60,
            data={"role_id": ROLE, "roi_id": ROI}, files=[("images", (f"{i}.png", disc_png(seed=i), "image/png"))],
            headers={"Authorization": f"Bearer {token}", "X-Request-Id": request_id, "Connection": "close",
                     "X-Forwarded-For": f"10.0.3.{i}"})
        assert response.status_code == 200, response.text
        return request_id

    with ThreadPoolExecutor(BURST) as pool:
        sent = list(pool.map(send, range(32)))
    time.sleep(0.3)
    pids = {e["request_id"]: e["pid"] for e in server.events("http")}
    assert len({pids[r] for r in sent}) == 2, "one worker took every upload"
    report = verify(audit.path)
    assert report.ok and report.records == before + 32
    uploads = {r["request_id"]: r for r in audit.records() if r["action"] == "samples.upload"}
    assert set(sent) <= set(uploads)
    assert {uploads[r]["client"] for r in sent} == {f"10.0.3.{i}" for i in range(32)}  # the trusted proxy's X-F-F
    assert bdi(server, "audit", "verify").startswith(str(audit.path))


@pytest.mark.parametrize("tamper", ["edit", "delete", "swap"])
def test_bdi_audit_verify_names_the_record_after_the_servers_trail_is_tampered_with(
    server: UvicornServer, tmp_path: Path, tamper: str
) -> None:
    _, token = new_key(server, "--scope", "samples", "--label", f"tamper-{tamper}")
    for i in range(3):
        response = httpx.post(f"{server.base_url}/datasets/ng/upload", timeout=60,
                              data={"role_id": ROLE, "roi_id": ROI},
                              files=[("images", (f"t{i}.png", disc_png(seed=50 + i), "image/png"))],
                              headers={"X-API-Key": token})
        assert response.status_code == 200, response.text
    lines = (Path(server.env["BDI_MODELS_DIR"]) / ".security" / "audit.jsonl").read_text().splitlines(keepends=True)
    target = len(lines) - 2  # the second-to-last record (0-based line index)
    if tamper == "edit":
        lines[target] = lines[target].replace('"outcome":"ok"', '"outcome":"ok "')
    elif tamper == "delete":
        del lines[target]
    else:
        lines[target], lines[target + 1] = lines[target + 1], lines[target]
    (tmp_path / "audit.jsonl").write_text("".join(lines))
    out = subprocess.run([sys.executable, "-m", "bdi.cli", "audit", "verify"],
                         env={**server.env, "BDI_SECURITY_DIR": str(tmp_path)}, capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 1, out.stdout
    named = f"line {target + 1} (seq "
    assert named in out.stderr and "FAILED" in out.stderr, out.stderr
