"""API keys (bdi.security.keys, bdi keys): the token is shown once, only its salted hash is stored, and
revocation and expiry act at the next check."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from bdi.cli import main
from bdi.errors import InvalidInputError
from bdi.security.keys import TOKEN_PREFIX, KeyStore, parse_scopes


def test_created_token_authenticates_and_only_its_salted_hash_is_stored(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    created = store.create(label="line-3-gui", scopes=("inspect",))
    principal = store.authenticate(created.token)
    assert principal is not None and principal.key_id == created.key.id and principal.scopes == {"inspect"}
    stored = store.path.read_text(encoding="utf-8")
    secret = created.token.rsplit("_", 1)[1]
    assert created.token not in stored and secret not in stored
    [entry] = json.loads(stored)["keys"]
    assert entry["hash"] != secret and len(entry["salt"]) == 32
    assert store.path.stat().st_mode & 0o077 == 0


def test_a_wrong_secret_or_an_unknown_id_is_refused(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    token = store.create(label="pipeline", scopes=("train",)).token
    assert store.authenticate(token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    assert store.authenticate("bdi_00000000_" + token.rsplit("_", 1)[1]) is None
    assert store.authenticate("not-a-bdi-token") is None


def test_a_revoked_key_is_refused_by_a_store_that_had_cached_it(tmp_path: Path) -> None:
    server, cli = KeyStore(tmp_path), KeyStore(tmp_path)  # a worker and the CLI: two processes' views
    created = cli.create(label="page", scopes=("inspect", "samples"))
    assert server.authenticate(created.token) is not None
    cli.revoke(created.key.id)
    assert server.authenticate(created.token) is None


def test_an_expired_key_is_refused(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    token = store.create(label="temp", scopes=("inspect",), expires_in=timedelta(hours=1), now=start).token
    assert store.authenticate(token, now=start + timedelta(minutes=59)) is not None
    assert store.authenticate(token, now=start + timedelta(minutes=61)) is None


def test_unknown_scopes_are_refused() -> None:
    assert parse_scopes(["train,inspect", "inspect"]) == ("inspect", "train")
    with pytest.raises(InvalidInputError, match="unknown"):
        parse_scopes(["everything"])


def test_cli_prints_the_token_alone_on_its_last_line_and_never_lists_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BDI_MODELS_DIR", str(tmp_path / "models"))
    assert main(["keys", "create", "--scope", "inspect", "--scope", "samples", "--label", "line-3-gui"]) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    assert KeyStore(tmp_path / "models" / ".security").authenticate(token) is not None
    assert main(["keys", "list"]) == 0
    listed = capsys.readouterr().out
    secret = token.removeprefix(TOKEN_PREFIX).partition("_")[2]  # bdi_<id>_<secret>; the secret may hold "_" itself
    assert "line-3-gui" in listed and secret not in listed and '"hash"' not in listed
    key_id = json.loads(listed.splitlines()[0])["id"]
    assert main(["keys", "revoke", key_id]) == 0
    assert KeyStore(tmp_path / "models" / ".security").authenticate(token) is None
    assert main(["audit", "verify"]) == 0
    assert "OK: 2 record(s)" in capsys.readouterr().out
