"""Bounded under hostile input (issue 30 items 1-3), against a real 2-worker server started as in production
(``python -m serving``, deploy/compose.yaml): a decompression bomb is refused from its header in well under a
second without the server's memory growing; the dataset routes score 30 large samples within a stated memory
bound; a client that sends headers and then stalls is answered 408 and cut off after the body-read timeout,
``/health`` stays fast while many do, and connections past the concurrency limit get an immediate 503."""

from __future__ import annotations

import selectors
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.helpers.bombs import png_bomb, radiance_bomb
from tests.helpers.servers import UvicornServer, server_env
from tests.helpers.synthetic import disc_png, png_bytes

from .conftest import MM, ROI, ROLE

pytestmark = pytest.mark.slow

MAX_PIXELS = 2_560_000  # the server's BDI_MAX_IMAGE_PIXELS
SIDE = 1600  # the dataset test's samples: 1600 x 1600 = MAX_PIXELS, 10 MB decoded with their ROI mask
N_SAMPLES = 30
DATASET_BOUND = 160 << 20  # a worker's peak RSS growth while it scores all N_SAMPLES (all held: > 300 MB)
BOMB_BOUND = 128 << 20  # a worker's peak RSS growth while it refuses the bombs (a decoded PNG bomb: 1.2 GB)
BODY_TIMEOUT_S = 2.0  # the server's BDI_BODY_READ_TIMEOUT_S
CONCURRENCY = 150  # the server's BDI_LIMIT_CONCURRENCY, per worker


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UvicornServer]:
    tmp = tmp_path_factory.mktemp("bounds")
    env = server_env(tmp, BDI_MAX_IMAGE_PIXELS=str(MAX_PIXELS), BDI_BODY_READ_TIMEOUT_S=str(BODY_TIMEOUT_S),
                     BDI_LIMIT_CONCURRENCY=str(CONCURRENCY))
    with UvicornServer(cwd=tmp, env=env, workers=2, launcher="serving") as started:
        yield started


def _workers(server: UvicornServer) -> dict[int, tuple[int, int]]:
    """``{pid: (rss, hwm)}`` of uvicorn's worker processes: the children of uvicorn's parent that
    multiprocessing spawned (the group's other processes are the parent, its resource tracker and the
    workers' own short-lived children)."""
    workers = {}
    for pid, mem in server.memory().items():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == server.pid and b"spawn_main" in cmdline:
            workers[pid] = mem
    assert len(workers) == server.workers, workers
    return workers


def _measured(server: UvicornServer) -> dict[int, tuple[int, int]]:
    """The workers' memory, their peak (VmHWM) reset to it: the start of a measurement."""
    server.reset_peak_memory()
    return _workers(server)


def _peak_growth(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]) -> int:
    """The largest rise of a worker's peak RSS since ``before`` (:func:`_measured`) above its RSS then: what the
    requests in between needed at most (memory freed again is seen too)."""
    assert set(after) == set(before), "a worker was replaced meanwhile"
    return max(after[pid][1] - before[pid][0] for pid in before)


# ------------------------------------------------------------------------------------------ item 1: bombs


def test_the_workers_get_opencvs_own_limit_from_the_setting(server: UvicornServer) -> None:
    for pid in _workers(server):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert f"OPENCV_IO_MAX_IMAGE_PIXELS={MAX_PIXELS}".encode() in environ


def test_decompression_bombs_are_refused_at_once_without_memory_growth(server: UvicornServer) -> None:
    # the 48 KB-class PNG that declares 20000 x 20000 (1.2 GB decoded), the 6 MB Radiance HDR of 10000 x 10000
    bombs = {"bomb.png": png_bomb(width=20000, height=20000), "bomb.hdr": radiance_bomb(width=10000, height=10000)}
    refusal = {"bomb.png": "20000x20000 = 400000000 pixels", "bomb.hdr": "No se pudo decodificar"}
    form = {"role_id": ROLE, "roi_id": ROI, "mm_per_px": str(MM)}
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        for seed in range(4):  # each worker decodes an image and answers an error once, unmeasured
            warm = client.post("/infer", data=form, files={"image": ("ok.png", disc_png(seed=seed), "image/png")})
            assert warm.status_code == 400 and "Memoria no encontrada" in warm.text
        before = _measured(server)
        rss_before = sum(rss for rss, _ in server.memory().values())
        for name, data in bombs.items():
            for _ in range(2):  # both workers, most likely
                started = time.perf_counter()
                response = client.post("/infer", data=form, files={"image": (name, data, "image/png")})
                elapsed = time.perf_counter() - started
                assert response.status_code == 400 and refusal[name] in response.json()["error"]
                assert elapsed < 1.0, f"{name} took {elapsed:.2f} s"
            upload = client.post("/datasets/ok/upload", data={"role_id": ROLE, "roi_id": ROI},
                                 files=[("images", (name, data, "image/png"))])
            assert upload.status_code == 400 and refusal[name] in upload.json()["detail"]
    after = _workers(server)
    growth = _peak_growth(before, after)
    rss_after = sum(rss for rss, _ in server.memory().values())
    sys.stdout.write(f"\nbombs: group RSS {rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB, "
                     f"worst worker peak growth {growth / 2**20:.1f} MiB")
    assert growth < BOMB_BOUND
    assert rss_after - rss_before < BOMB_BOUND


# ------------------------------------------------------------------------------------ item 2: dataset routes


def test_dataset_routes_score_30_large_samples_within_a_memory_bound(server: UvicornServer) -> None:
    """30 samples at the pixel limit: held all at once they would cost > 300 MB per worker; streamed, a worker
    holds one batch (here one sample) and its maps."""
    role = "Bounds"
    with httpx.Client(base_url=server.base_url, timeout=120) as client:
        files = [("images", (f"{i}.png", disc_png(seed=i), "image/png")) for i in range(3)]
        fit = client.post("/fit_ok", data={"role_id": role, "roi_id": ROI, "mm_per_px": str(MM)}, files=files)
        assert fit.status_code == 200, fit.text
        for i in range(N_SAMPLES):
            flat = np.full((SIDE, SIDE, 3), 100 + i, dtype=np.uint8)
            stored = client.post("/datasets/ok/upload", data={"role_id": role, "roi_id": ROI},
                                 files=[("images", (f"big{i}.png", png_bytes(flat), "image/png"))])
            assert stored.status_code == 200, stored.text
        body = {"role_id": role, "roi_id": ROI, "default_mm_per_px": MM}
        before = _measured(server)
        started = time.perf_counter()
        calib = client.post("/calibrate_dataset", json={**body, "require_ng": False})
        calibrate_s = time.perf_counter() - started
        assert calib.status_code == 200, calib.text
        assert calib.json()["n_ok"] == N_SAMPLES
        started = time.perf_counter()
        scored = client.post("/infer_dataset", json={**body, "labels": ["ok"]})
        infer_s = time.perf_counter() - started
        assert scored.status_code == 200, scored.text
        assert scored.json()["n_total"] == N_SAMPLES and scored.json()["n_errors"] == 0
    growth = _peak_growth(before, _workers(server))
    sys.stdout.write(f"\ndataset routes: /calibrate_dataset {calibrate_s:.1f} s, /infer_dataset {infer_s:.1f} s, "
                     f"worst worker peak growth {growth / 2**20:.1f} MiB (bound {DATASET_BOUND >> 20} MiB)")
    assert growth < DATASET_BOUND


# ---------------------------------------------------------------------------------- item 3: stalled clients

STALLED_HEAD = (b"POST /calibrate_ng HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100\r\n\r\n{\"role_id\": ")  # 13 of the 100 bytes, then nothing


def _stall(port: int, n: int) -> dict[socket.socket, float]:
    """``n`` connections that send their headers and 13 of 100 body bytes; each with when it did."""
    socks = {}
    for _ in range(n):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(STALLED_HEAD)
        socks[sock] = time.monotonic()
    return socks


def _answers(socks: dict[socket.socket, float], *, within_s: float) -> dict[socket.socket, tuple[bytes, float]]:
    """What each socket received until the server closed it or ``within_s`` passed, and how long after its
    request the first byte came (inf: none)."""
    received = {sock: b"" for sock in socks}
    first = dict.fromkeys(socks, float("inf"))
    open_ = set(socks)
    with selectors.DefaultSelector() as sel:
        for sock in socks:
            sock.setblocking(False)
            sel.register(sock, selectors.EVENT_READ)
        deadline = time.monotonic() + within_s
        while open_ and (left := deadline - time.monotonic()) > 0:
            for key, _ in sel.select(timeout=left):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    chunk = b""
                if chunk and not received[sock]:
                    first[sock] = time.monotonic() - socks[sock]
                received[sock] += chunk
                if not chunk:  # closed by the server
                    sel.unregister(sock)
                    open_.discard(sock)
    return {sock: (received[sock], first[sock]) for sock in socks}


def _status(raw: bytes) -> int | None:
    return int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/1.1 ") else None


def test_a_client_that_stalls_after_its_headers_gets_408_and_is_cut_off(server: UvicornServer) -> None:
    socks = _stall(server.port, 1)
    started = time.monotonic()
    try:
        ((raw, first_byte_s),) = _answers(socks, within_s=BODY_TIMEOUT_S + 10).values()
    finally:
        for sock in socks:
            sock.close()
    closed_s = time.monotonic() - started
    assert _status(raw) == 408, raw[:300]
    assert b'{"detail": "request body not received: nothing came for 2 s (BDI_BODY_READ_TIMEOUT_S)"}' in raw
    assert b"x-request-id" in raw.lower()
    assert BODY_TIMEOUT_S - 0.1 <= first_byte_s < BODY_TIMEOUT_S + 3
    assert closed_s < BODY_TIMEOUT_S + 5, "the connection is closed after the 408"


def test_health_stays_fast_while_many_clients_stall(server: UvicornServer) -> None:
    """140 stalled connections (fewer than one worker's limit, wherever they land), then /health 20 times."""
    socks = _stall(server.port, 140)
    try:
        latencies = []
        with httpx.Client(base_url=server.base_url, timeout=10) as client:
            for _ in range(20):
                started = time.perf_counter()
                assert client.get("/health").status_code == 200
                latencies.append(time.perf_counter() - started)
        answers = _answers(socks, within_s=BODY_TIMEOUT_S + 10)
    finally:
        for sock in socks:
            sock.close()
    sys.stdout.write(f"\n/health with 140 stalled clients: max {max(latencies) * 1e3:.0f} ms, "
                     f"median {sorted(latencies)[10] * 1e3:.0f} ms")
    assert max(latencies) < 1.0
    assert [_status(raw) for raw, _ in answers.values()] == [408] * len(socks)


def test_connections_past_the_concurrency_limit_get_503_at_once(server: UvicornServer) -> None:
    """400 stalled clients against 2 workers x 150: at least 100 are refused at once, the rest time out."""
    n = 400
    socks = _stall(server.port, n)
    try:
        answers = _answers(socks, within_s=BODY_TIMEOUT_S + 10)
    finally:
        for sock in socks:
            sock.close()
    statuses = [_status(raw) for raw, _ in answers.values()]
    refused_after = [first for raw, first in answers.values() if _status(raw) == 503]
    sys.stdout.write(f"\n{n} stalled: {statuses.count(503)} x 503 (slowest after {max(refused_after):.2f} s), "
                     f"{statuses.count(408)} x 408")
    assert statuses.count(503) >= n - 2 * CONCURRENCY
    assert statuses.count(503) + statuses.count(408) == n
    assert max(refused_after) < BODY_TIMEOUT_S / 2
