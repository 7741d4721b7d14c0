"""Limits that act before the bytes land (issue 16): body cap, file count, dataset image cap."""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.helpers.servers import UvicornServer, server_env
from tests.helpers.synthetic import disc_png

from .conftest import MM, ROI, ROLE, ClientFactory, fit_from_dataset, upload

PNG = disc_png(seed=1)


def _stored_pngs(models_dir: Path) -> list[Path]:
    return list(models_dir.rglob("*.png")) if models_dir.exists() else []


def test_declared_body_over_the_cap_is_413_naming_the_limit(client_factory: ClientFactory, models_dir: Path) -> None:
    client = client_factory(max_request_bytes=50_000)
    files = [("images", (f"{i}.png", disc_png(seed=i, size=160), "image/png")) for i in range(4)]
    response = client.post("/datasets/ok/upload", data={"role_id": ROLE, "roi_id": ROI}, files=files,
                           headers={"X-Request-Id": "rid-413"})
    assert response.status_code == 413
    assert response.json() == {"detail": "request body exceeds the limit of 50000 bytes (BDI_MAX_REQUEST_BYTES)"}
    assert response.headers["x-request-id"] == "rid-413"
    assert _stored_pngs(models_dir) == []


def test_streamed_body_over_the_cap_is_413_without_content_length(client_factory: ClientFactory) -> None:
    """A chunked body (no Content-Length) is counted while it streams."""
    client = client_factory(max_request_bytes=1000)

    def chunks() -> Iterator[bytes]:
        yield b'{"role_id": "Inspection", "roi_id": "inspection-1", "ok_scores": ['
        for _ in range(500):
            yield b"1.0, "
        yield b"1.0]}"

    response = client.post("/calibrate_ng", content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413, response.text
    assert "BDI_MAX_REQUEST_BYTES" in response.json()["detail"]


def test_body_under_the_cap_is_served(client_factory: ClientFactory) -> None:
    client = client_factory(max_request_bytes=len(PNG) + 2000)
    upload(client, "ok", seeds=[1])


def test_too_many_files_is_refused_before_any_file_is_read(client_factory: ClientFactory, models_dir: Path) -> None:
    """The first file is over the per-file cap: the count error proves no file was read first."""
    client = client_factory(max_files_per_request=2, max_upload_bytes=len(PNG) + 10)
    files = [("images", ("big.png", disc_png(seed=0, size=200), "image/png"))]
    files += [("images", (f"{i}.png", PNG, "image/png")) for i in range(2)]
    response = client.post("/datasets/ok/upload", data={"role_id": ROLE, "roi_id": ROI}, files=files)
    assert response.status_code == 400
    assert "BDI_MAX_FILES_PER_REQUEST" in response.json()["detail"]
    fit = client.post("/fit_ok", data={"role_id": ROLE, "roi_id": ROI, "mm_per_px": str(MM)}, files=files)
    assert fit.status_code == 400 and "BDI_MAX_FILES_PER_REQUEST" in fit.json()["error"]
    assert _stored_pngs(models_dir) == []


def test_dataset_work_over_the_image_cap_is_400_naming_the_limit(client_factory: ClientFactory) -> None:
    client = client_factory(max_dataset_images=3, min_ok_samples=2)
    upload(client, "ok", seeds=range(3))
    assert fit_from_dataset(client).status_code == 200  # 3 images: at the cap
    upload(client, "ng", seeds=[100], defect="scratch")
    upload(client, "ok", seeds=[3])
    fit = fit_from_dataset(client)
    assert fit.status_code == 400 and "BDI_MAX_DATASET_IMAGES" in fit.json()["error"]
    body = {"role_id": ROLE, "roi_id": ROI}
    calib = client.post("/calibrate_dataset", json=body)
    assert calib.status_code == 400 and "5 dataset images exceed the limit of 3" in calib.json()["error"]
    assert client.post("/calibrate_ng", json={**body, "ok_scores": [10.0]}).status_code == 200
    infer_all = client.post("/infer_dataset", json={**body, "labels": ["ok"]})
    assert infer_all.status_code == 400 and "4 dataset images" in infer_all.json()["error"]


@pytest.mark.parametrize("name", ["max_request_bytes", "max_dataset_images"])
def test_limits_must_be_positive(client_factory: ClientFactory, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        client_factory(**{name: 0})


def test_a_bad_image_late_in_a_streamed_fit_is_400_and_keeps_the_old_model(
    fitted: TestClient, models_dir: Path
) -> None:
    """Images are decoded batch by batch inside the fit: a bad one far in still fails cleanly."""
    before = sorted(p.name for p in models_dir.rglob("*.npz"))
    memory = next(models_dir.rglob("*.npz")).read_bytes()
    files = [("images", (f"{i}.png", disc_png(seed=i), "image/png")) for i in range(20)]
    files.append(("images", ("bad.png", b"junk", "image/png")))
    response = fitted.post("/fit_ok", data={"role_id": ROLE, "roi_id": ROI, "mm_per_px": str(MM)}, files=files)
    assert response.status_code == 400 and response.json()["error"].startswith("No se pudo decodificar")
    assert sorted(p.name for p in models_dir.rglob("*.npz")) == before
    assert next(models_dir.rglob("*.npz")).read_bytes() == memory
    assert not [p for p in models_dir.rglob("*.tmp")]


# ---------------------------------------------------------------------------------------------- real server

CAP = 1 << 20  # 1 MiB


@pytest.fixture(scope="module")
def capped_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UvicornServer]:
    tmp = tmp_path_factory.mktemp("capped")
    env = server_env(tmp, tmp / "models", BDI_MAX_REQUEST_BYTES=str(CAP))
    with UvicornServer(cwd=tmp, env=env) as server:
        yield server


def _read_response(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


@pytest.mark.slow
def test_real_server_refuses_a_declared_oversize_body_before_it_is_sent(capped_server: UvicornServer) -> None:
    """Only the headers go out (Content-Length: 10 GB): the 413 comes back without waiting for a byte."""
    with socket.create_connection(("127.0.0.1", capped_server.port), timeout=10) as sock:
        sock.sendall(b"POST /datasets/ok/upload HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: multipart/form-data; boundary=xyz\r\nContent-Length: 10000000000\r\n\r\n")
        response = _read_response(sock)
    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    assert b"BDI_MAX_REQUEST_BYTES" in response and b"x-request-id" in response.lower()


@pytest.mark.slow
def test_real_server_stops_reading_a_chunked_body_at_the_cap(capped_server: UvicornServer) -> None:
    """A chunked upload of up to 64 MiB: the server stops reading at the cap and answers 413."""
    chunk = b"x" * 65536
    sent = 0
    response = b""
    with socket.create_connection(("127.0.0.1", capped_server.port), timeout=10) as sock:
        sock.sendall(b"POST /datasets/ok/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Request-Id: rid-chunked\r\n"
                     b"Content-Type: multipart/form-data; boundary=xyz\r\nTransfer-Encoding: chunked\r\n\r\n")
        part = (b'--xyz\r\nContent-Disposition: form-data; name="images"; filename="big.png"\r\n'
                b"Content-Type: image/png\r\n\r\n")
        sock.sendall(b"%x\r\n%s\r\n" % (len(part), part))
        try:
            while sent < 64 * CAP:
                if select.select([sock], [], [], 0)[0]:
                    break
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        response = _read_response(sock)
    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    deadline = time.monotonic() + 5
    while not (events := [e for e in capped_server.events("http.request_too_large")
                          if e.get("request_id") == "rid-chunked"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    (event,) = events
    assert CAP - (1 << 18) < event["accepted_bytes"] <= CAP  # what the app was handed: up to the cap, no more
    assert sent < 64 * CAP
