"""API keys with scopes: random tokens shown once, stored as a salted hash (docs/security.md).

A token is ``bdi_<id>_<secret>``: the id finds the entry, the secret is checked against its salted
sha256 in constant time. The store is one JSON file under the security folder, rewritten atomically
under a file lock; readers re-read it when its identity (inode, mtime, size) changes, so a key created
or revoked by ``bdi keys`` takes effect in every worker of a running server at its next request.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import threading
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal, get_args

from bdi.errors import InvalidInputError, NotFoundError, StorageError
from bdi.storage.fsio import FileIdentity, atomic_write_json, exclusive_lock, read_with_identity

Scope = Literal["inspect", "samples", "train", "admin"]
SCOPES: tuple[Scope, ...] = get_args(Scope)
KEYS_FILE = "keys.json"
TOKEN_PREFIX = "bdi_"
LOCK_TIMEOUT_S = 10.0


def _utc(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_utc(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)


def _digest(salt: str, secret: str) -> str:
    # the secret is 256 random bits: a salted sha256 is enough, a slow KDF would only slow every request
    return hashlib.sha256(bytes.fromhex(salt) + secret.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who a request acts as: a key's id, label and scopes (``anonymous`` when auth is off or not asked)."""

    key_id: str
    label: str
    scopes: frozenset[str]

    @classmethod
    def anonymous(cls) -> Principal:
        return cls(key_id="anonymous", label="anonymous", scopes=frozenset())


@dataclass(frozen=True)
class ApiKey:
    """One stored key: never the token, only its salted hash."""

    id: str
    label: str
    scopes: tuple[str, ...]
    salt: str
    hash: str
    created_utc: str
    expires_utc: str | None = None
    revoked_utc: str | None = None

    def active(self, now: datetime) -> bool:
        if self.revoked_utc is not None:
            return False
        return self.expires_utc is None or now < _parse_utc(self.expires_utc)

    def public(self) -> dict[str, Any]:
        """What ``bdi keys list`` shows: everything but the salt and hash."""
        return {k: v for k, v in asdict(self).items() if k not in ("salt", "hash")}


@dataclass(frozen=True)
class CreatedKey:
    key: ApiKey
    token: str  # shown once, never stored


def parse_scopes(values: list[str] | tuple[str, ...]) -> tuple[Scope, ...]:
    """Known scopes, deduplicated in the canonical order; an unknown one is an InvalidInputError."""
    wanted = {v.strip() for value in values for v in value.split(",") if v.strip()}
    unknown = sorted(wanted - set(SCOPES))
    if unknown or not wanted:
        raise InvalidInputError(f"unknown or missing scope {unknown}: choose from {', '.join(SCOPES)}")
    return tuple(s for s in SCOPES if s in wanted)


class KeyStore:
    """The key file of one security folder (``Settings.security_root()``)."""

    def __init__(self, root: Path) -> None:
        self.path = Path(root) / KEYS_FILE
        self._lock_path = Path(root) / f".{KEYS_FILE}.lock"
        self._cache: tuple[FileIdentity, dict[str, ApiKey]] | None = None
        self._guard = threading.Lock()

    def keys(self) -> dict[str, ApiKey]:
        """id → key, re-read only when the file changed."""
        ident = FileIdentity.of(self.path)
        with self._guard:
            if ident is None:
                return {}
            if self._cache is not None and self._cache[0] == ident:
                return self._cache[1]
        read = read_with_identity(self.path)
        if read is None:
            return {}
        data, ident = read
        try:
            doc = json.loads(data.decode("utf-8"))
            keys = {k["id"]: ApiKey(**{**k, "scopes": tuple(k["scopes"])}) for k in doc.get("keys", [])}
        except (ValueError, TypeError, KeyError) as exc:
            raise StorageError(f"the key file {self.path} is unreadable: {exc}") from exc
        with self._guard:
            self._cache = (ident, keys)
        return keys

    def authenticate(self, token: str, *, now: datetime | None = None) -> Principal | None:
        """The principal of a valid, unexpired, unrevoked token; None otherwise."""
        if not token.startswith(TOKEN_PREFIX):
            return None
        key_id, _, secret = token[len(TOKEN_PREFIX):].partition("_")
        key = self.keys().get(key_id)
        if key is None or not secret:
            # still hash once, so an unknown id costs what a wrong secret costs
            hmac.compare_digest(_digest("00", secret), "0" * 64)
            return None
        if not hmac.compare_digest(_digest(key.salt, secret), key.hash):
            return None
        if not key.active(now or datetime.now(timezone.utc)):
            return None
        return Principal(key_id=key.id, label=key.label, scopes=frozenset(key.scopes))

    def create(self, *, label: str, scopes: tuple[Scope, ...], expires_in: timedelta | None = None,
               now: datetime | None = None) -> CreatedKey:
        """A new key; its token is in the result only."""
        if not label.strip():
            raise InvalidInputError("a key needs a --label (who or what uses it, e.g. line-3-gui)")
        moment = now or datetime.now(timezone.utc)
        key_id, secret, salt = secrets.token_hex(4), secrets.token_urlsafe(32), secrets.token_hex(16)
        key = ApiKey(id=key_id, label=label.strip(), scopes=tuple(scopes), salt=salt, hash=_digest(salt, secret),
                     created_utc=_utc(moment), expires_utc=_utc(moment + expires_in) if expires_in else None)
        with self._locked():
            keys = dict(self._read_fresh())
            if key_id in keys:  # 32 random bits: retry rather than overwrite
                return self.create(label=label, scopes=scopes, expires_in=expires_in, now=now)
            keys[key_id] = key
            self._write(keys)
        return CreatedKey(key=key, token=f"{TOKEN_PREFIX}{key_id}_{secret}")

    def revoke(self, key_id: str, *, now: datetime | None = None) -> ApiKey:
        """Mark a key revoked (kept, so the audit trail's key ids stay resolvable)."""
        with self._locked():
            keys = dict(self._read_fresh())
            key = keys.get(key_id)
            if key is None:
                raise NotFoundError(f"no key with id {key_id!r}")
            if key.revoked_utc is None:
                key = ApiKey(**{**asdict(key), "revoked_utc": _utc(now or datetime.now(timezone.utc))})
                keys[key_id] = key
                self._write(keys)
        return key

    def _read_fresh(self) -> dict[str, ApiKey]:
        self._cache = None
        return self.keys()

    def _write(self, keys: dict[str, ApiKey]) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.path, {"keys": [asdict(k) for k in keys.values()]})
            self.path.chmod(0o600)
        except OSError as exc:
            raise StorageError(f"cannot write the key file {self.path}: {exc}") from exc

    def _locked(self) -> Any:
        return exclusive_lock(
            self._lock_path, timeout_s=LOCK_TIMEOUT_S,
            busy=lambda: StorageError(f"the key file {self.path} is locked by another process"),
            unusable=lambda exc: StorageError(f"cannot lock {self._lock_path}: {exc}"),
        )
