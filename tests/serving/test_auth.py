"""Access control over the app's own route table (serving.auth): every route declares a scope, each scope
opens exactly its routes, refusals come before the body and in shape B, and writes land in the audit trail."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from starlette.routing import BaseRoute

from bdi.security.audit import AuditLog, verify
from bdi.security.keys import SCOPES, KeyStore
from serving.app import create_app
from serving.auth import route_scope
from serving.routes import ROUTERS
from tests.helpers.servers import UvicornServer, server_env
from tests.helpers.synthetic import disc_png

from .conftest import ROI, ROLE, ClientFactory, upload

ROUTES: list[BaseRoute] = [route for router in ROUTERS for route in router.routes]

# The scope table of docs/security.md, written out: a route's declaration must agree with it, so a new route
# fails here until it is given a scope in both places.
EXPECTED: dict[tuple[str, str], str] = {
    ("GET", "/health"): "inspect", ("POST", "/infer"): "inspect", ("POST", "/infer_dataset"): "inspect",
    ("GET", "/state"): "inspect", ("GET", "/manifest"): "inspect", ("GET", "/datasets/list"): "inspect",
    ("GET", "/datasets/file"): "inspect", ("GET", "/datasets/meta"): "inspect",
    ("POST", "/datasets/ok/upload"): "samples", ("POST", "/datasets/ng/upload"): "samples",
    ("DELETE", "/datasets/file"): "samples", ("DELETE", "/datasets/clear"): "samples",
    ("POST", "/fit_ok"): "train", ("POST", "/calibrate_ng"): "train", ("POST", "/calibrate_dataset"): "train",
    ("POST", "/calibrate_manual"): "train", ("GET", "/progress"): "inspect", ("GET", "/metrics"): "inspect",
    ("GET", "/inspections"): "inspect", ("GET", "/monitor"): "inspect", ("POST", "/feedback"): "samples",
    ("GET", "/audit"): "admin", ("GET", "/keys"): "admin", ("POST", "/keys"): "admin",
    ("DELETE", "/keys/{key_id}"): "admin",
    ("GET", "/ui"): "public", ("GET", "/ui/"): "public", ("GET", "/ui/{name}"): "public",
}


def _route_id(route: BaseRoute) -> str:
    return f"{'/'.join(sorted(getattr(route, 'methods', ())))} {getattr(route, 'path', route)}"


def _key(route: BaseRoute) -> tuple[str, str]:
    [method] = getattr(route, "methods", ())
    return method, getattr(route, "path", "")


def _keys(root: Path) -> dict[str, str]:
    """One key per scope: scope → token."""
    store = KeyStore(root)
    return {scope: store.create(label=f"only-{scope}", scopes=(scope,)).token for scope in SCOPES}


def _call(client: TestClient, route: BaseRoute, headers: dict[str, str]) -> int:
    method = sorted(getattr(route, "methods", {"GET"}))[0]
    path = getattr(route, "path", "/").replace("{name}", "index.html").replace("{key_id}", "00000000")
    return client.request(method, path, headers=headers, follow_redirects=False).status_code


def test_every_operation_of_the_app_is_a_route_of_the_routers_with_a_declared_scope() -> None:
    """A route added without ``scoped(...)`` (or outside ROUTERS, where the key check cannot see it) fails here."""
    declared = {(m, getattr(r, "path", "")) for r in ROUTES if route_scope(r) for m in getattr(r, "methods", ())}
    operations = {(method.upper(), path) for path, item in create_app().openapi()["paths"].items() for method in item}
    assert operations - declared == set()
    assert [_route_id(r) for r in ROUTES if route_scope(r) is None] == []
    assert {_key(r): route_scope(r) for r in ROUTES} == EXPECTED


@pytest.mark.parametrize("route", [r for r in ROUTES if EXPECTED.get(_key(r)) != "public"], ids=_route_id)
def test_each_scope_opens_exactly_its_routes(route: BaseRoute, client_factory: ClientFactory,
                                             tmp_path: Path) -> None:
    client = client_factory(auth="required", auth_max_failures=1000)
    tokens = _keys(tmp_path / "models" / ".security")
    needed = EXPECTED.get(_key(route), "a scope in EXPECTED")
    refused = _call(client, route, {})
    assert refused == 401
    for scope, token in tokens.items():
        status = _call(client, route, {"Authorization": f"Bearer {token}"})
        if scope == needed:
            assert status not in (401, 403), (scope, status)
        else:
            assert status == 403, (scope, status)


def test_the_page_loads_without_a_key_so_it_can_ask_for_one(client_factory: ClientFactory) -> None:
    client = client_factory(auth="required")
    assert client.get("/ui/").status_code == 200
    assert client.get("/ui/app.js").status_code == 200


def test_refusals_are_shape_b_and_a_key_may_come_as_x_api_key(client_factory: ClientFactory, tmp_path: Path) -> None:
    client = client_factory(auth="required")
    token = KeyStore(tmp_path / "models" / ".security").create(label="gui", scopes=("inspect",)).token
    missing = client.get("/health")
    assert missing.status_code == 401 and isinstance(missing.json()["detail"], str)
    assert missing.headers["www-authenticate"] == "Bearer" and missing.headers["x-request-id"]
    assert client.get("/health", headers={"X-API-Key": "bdi_nope_nope"}).status_code == 401
    health = client.get("/health", headers={"X-API-Key": token})
    assert health.status_code == 200 and health.json()["auth"] == "required"
    forbidden = client.post("/calibrate_manual", json={}, headers={"X-API-Key": token})
    assert forbidden.status_code == 403 and "'train' scope" in forbidden.json()["detail"]


def test_auth_off_keeps_every_route_open_and_health_says_so(client: TestClient) -> None:
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["auth"] == "off"
    assert client.get("/state", params={"role_id": ROLE, "roi_id": ROI}).status_code == 200


def test_writes_mode_keeps_inspection_open_and_closes_writes(client_factory: ClientFactory) -> None:
    client = client_factory(auth="writes")
    assert client.get("/health").status_code == 200
    assert client.get("/state", params={"role_id": ROLE, "roi_id": ROI}).status_code == 200
    assert client.post("/calibrate_manual", json={}).status_code == 401
    assert client.delete("/datasets/clear", params={"role_id": ROLE, "roi_id": ROI, "label": "ok"}).status_code == 401


def test_failed_attempts_from_one_address_are_rate_limited(client_factory: ClientFactory, tmp_path: Path) -> None:
    client = client_factory(auth="required", auth_max_failures=3)
    token = KeyStore(tmp_path / "models" / ".security").create(label="gui", scopes=("inspect",)).token
    assert [client.get("/health").status_code for _ in range(3)] == [401, 401, 401]
    limited = client.get("/health", headers={"Authorization": f"Bearer {token}"})
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) > 0
    assert "too many failed" in limited.json()["detail"]


def test_cors_allows_no_wildcard_while_auth_is_on(client_factory: ClientFactory) -> None:
    preflight = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    open_client = client_factory()
    assert open_client.options("/infer", headers=preflight).headers.get("access-control-allow-origin") == "*"
    closed = client_factory(auth="required")
    assert "access-control-allow-origin" not in closed.options("/infer", headers=preflight).headers
    listed = client_factory(auth="required", cors_origins="*,https://hmi.plant.example")
    ok = listed.options("/infer", headers={**preflight, "Origin": "https://hmi.plant.example"})
    assert ok.headers["access-control-allow-origin"] == "https://hmi.plant.example"


def test_manual_threshold_is_audited_with_who_and_the_threshold_before_and_after(
    client_factory: ClientFactory, tmp_path: Path
) -> None:
    client = client_factory(auth="required")
    root = tmp_path / "models" / ".security"
    store = KeyStore(root)
    samples = {"Authorization": f"Bearer {store.create(label='line-3-gui', scopes=('samples',)).token}"}
    train = store.create(label="qa-engineer", scopes=("train",))
    auth = {"Authorization": f"Bearer {train.token}", "X-Request-Id": "req-42"}
    upload(client, "ok", seeds=range(10), headers=samples)
    fit = client.post("/fit_ok", data={"role_id": ROLE, "roi_id": ROI, "mm_per_px": "0.2", "use_dataset": "true"},
                      headers=auth)
    assert fit.status_code == 200, fit.text
    body = {"role_id": ROLE, "roi_id": ROI, "threshold": 1.5}
    assert client.post("/calibrate_manual", json=body, headers=auth).status_code == 200
    assert client.post("/calibrate_manual", json={**body, "threshold": 2.5}, headers=auth).status_code == 200
    records = list(AuditLog(root).records())
    assert [r["action"] for r in records] == ["samples.upload"] * 10 + ["fit", "calibrate", "calibrate"]
    last = records[-1]
    assert last["key_id"] == train.key.id and last["key_label"] == "qa-engineer"
    assert last["client"] == "testclient" and last["request_id"] == "req-42"
    assert last["route"] == "POST /calibrate_manual" and last["roi"]["roi_id"] == ROI
    assert last["before"]["threshold"] == 1.5 and last["after"]["threshold"] == 2.5
    assert last["before"]["memory_fingerprint"] == last["after"]["memory_fingerprint"] is not None
    assert records[-3]["before"]["memory_fingerprint"] is None and records[-3]["after"]["memory_fingerprint"]
    assert verify(AuditLog(root).path).ok


def test_a_failed_write_is_audited_with_its_outcome(client: TestClient, models_dir: Path) -> None:
    response = client.post("/calibrate_manual", json={"role_id": ROLE, "roi_id": ROI, "threshold": 1.0})
    assert response.status_code == 400
    [record] = AuditLog(models_dir / ".security").records()
    assert record["outcome"] == "NotFittedError" and record["key_id"] == "anonymous"


def test_audit_pages_for_admin_keys_only(client_factory: ClientFactory, tmp_path: Path) -> None:
    client = client_factory(auth="required")
    root = tmp_path / "models" / ".security"
    store = KeyStore(root)
    admin = {"X-API-Key": store.create(label="it", scopes=("admin",)).token}
    samples = {"X-API-Key": store.create(label="gui", scopes=("samples",)).token}
    for seed in range(3):
        upload(client, "ok", seeds=[seed], headers=samples)
    assert client.get("/audit", headers=samples).status_code == 403
    first = client.get("/audit", params={"limit": 2}, headers=admin).json()
    assert [r["seq"] for r in first["records"]] == [1, 2] and first["next_after_seq"] == 2
    rest = client.get("/audit", params={"after_seq": 2}, headers=admin).json()
    assert [r["seq"] for r in rest["records"]] == [3] and rest["next_after_seq"] is None
    assert client.get("/audit", params={"limit": 0}, headers=admin).status_code == 422


def _raw_upload_headers_only(port: int, content_length: int) -> bytes:
    """Send an upload's headers, never its body, and return what the server answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall((f"POST /datasets/ok/upload HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
                      f"boundary=b\r\nContent-Length: {content_length}\r\n\r\n").encode())
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < _content_length(answer):
            chunk = sock.recv(65536)  # the head and the body may come in separate packets
            if not chunk:
                break
            answer += chunk
        return answer


def _content_length(answer: bytes) -> int:
    """The Content-Length of a response whose head ``answer`` holds (0 when it has none)."""
    head = answer.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower()
    match = re.search(r"^content-length:\s*(\d+)", head, re.MULTILINE)
    return int(match.group(1)) if match else 0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UvicornServer]:
    """``python -m serving`` with BDI_AUTH=writes (/health stays open for the helper's readiness probe) and no
    trusted proxy (the default)."""
    tmp = tmp_path_factory.mktemp("auth-server")
    with UvicornServer(cwd=tmp, env=server_env(tmp, BDI_AUTH="writes"), launcher="serving") as started:
        yield started


@pytest.mark.slow
def test_upload_without_key_is_refused_before_body_is_read(server: UvicornServer) -> None:
    answer = _raw_upload_headers_only(server.port, 10_000_000)  # no body byte is sent: only a refusal
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]  # can answer without waiting for it
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert "API key" in body["detail"]
    models = Path(server.env["BDI_MODELS_DIR"])
    assert not [p for p in models.rglob("*") if p.is_file() and ".security" not in p.parts]


@pytest.mark.slow
def test_a_forwarded_address_from_an_untrusted_peer_is_not_believed(server: UvicornServer) -> None:
    root = Path(server.env["BDI_MODELS_DIR"]) / ".security"
    token = KeyStore(root).create(label="gui", scopes=("samples",)).token
    response = httpx.post(f"{server.base_url}/datasets/ok/upload", data={"role_id": ROLE, "roi_id": ROI},
                          files=[("images", ("a.png", disc_png(seed=1), "image/png"))],
                          headers={"X-API-Key": token, "X-Forwarded-For": "10.9.9.9"}, timeout=60)
    assert response.status_code == 200, response.text
    [record] = [r for r in AuditLog(root).records() if r["action"] == "samples.upload"]
    assert record["client"] == "127.0.0.1" and record["key_label"] == "gui"




def _events(tmp_path: Path, name: str) -> list[dict[str, object]]:
    log = tmp_path / "logs" / "backend_diagnostics.jsonl"
    return [e for e in map(json.loads, log.read_text().splitlines()) if e.get("event") == name]


def test_auth_off_beyond_loopback_warns_loudly_at_start_up(client_factory: ClientFactory, tmp_path: Path) -> None:
    client_factory(backend_host="127.0.0.1")
    assert _events(tmp_path, "security.auth_off") == []
    client_factory(backend_host="0.0.0.0")
    [warning] = _events(tmp_path, "security.auth_off")
    assert "ACCESS CONTROL IS OFF" in str(warning["message"]) and "BDI_AUTH=required" in str(warning["message"])
    client_factory(backend_host="0.0.0.0", auth="required")
    assert len(_events(tmp_path, "security.auth_off")) == 1


def test_an_admin_key_manages_keys_over_http_and_each_change_is_audited(
    client_factory: ClientFactory, tmp_path: Path
) -> None:
    client = client_factory(auth="required")
    root = tmp_path / "models" / ".security"
    admin = KeyStore(root).create(label="it", scopes=("admin",))
    auth = {"Authorization": f"Bearer {admin.token}"}
    created = client.post("/keys", json={"label": "line-4-gui", "scopes": ["inspect", "samples"]}, headers=auth)
    assert created.status_code == 200, created.text
    token, key_id = created.json()["token"], created.json()["id"]
    assert client.get("/health", headers={"X-API-Key": token}).status_code == 200
    listed = client.get("/keys", headers=auth).json()["keys"]
    assert {k["label"] for k in listed} == {"it", "line-4-gui"} and token not in json.dumps(listed)
    assert client.delete(f"/keys/{key_id}", headers=auth).json()["revoked_utc"]
    assert client.get("/health", headers={"X-API-Key": token}).status_code == 401
    assert client.delete("/keys/nope", headers=auth).status_code == 404
    bad = client.post("/keys", json={"label": "x", "scopes": ["root"]}, headers=auth)
    assert bad.status_code == 400 and "root" in bad.json()["detail"]
    records = list(AuditLog(root).records())
    assert [(r["action"], r["outcome"]) for r in records] == [
        ("keys.create", "ok"), ("keys.revoke", "ok"), ("keys.revoke", "NotFoundError"),
        ("keys.create", "InvalidInputError")]
    assert records[0]["key_label"] == "it" and token not in json.dumps(records)


def test_an_unreadable_key_file_is_a_json_500_not_a_crash(client_factory: ClientFactory, tmp_path: Path) -> None:
    client = client_factory(auth="required")
    root = tmp_path / "models" / ".security"
    root.mkdir(parents=True)
    (root / "keys.json").write_text("{not json", encoding="utf-8")
    response = client.get("/health", headers={"X-API-Key": "bdi_abc_def"})
    assert response.status_code == 500 and "key file" in response.json()["error"]
    assert response.json()["request_id"] == response.headers["x-request-id"]


def test_key_management_over_http_is_refused_while_auth_is_off(client: TestClient, models_dir: Path) -> None:
    response = client.post("/keys", json={"label": "sneaky", "scopes": ["admin"]})
    assert response.status_code == 403 and "BDI_AUTH" in response.json()["detail"]
    assert client.get("/keys").status_code == 403
    assert not (models_dir / ".security" / "keys.json").exists()
