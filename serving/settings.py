"""Settings of the HTTP server only (CORS, address, connection limits), apart from ``bdi.config.Settings``.

Read like ``Settings``: init kwargs > ``BDI_*`` env (legacy ``BRAKEDISC_*``), exactly as spelt > the
YAML file named by ``BDI_CONFIG`` > defaults. Built once per app in the lifespan, never at import.
"""

from __future__ import annotations

import ipaddress
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from bdi.settings_sources import SERVING_CONFIG_KEYS, env_aliases, read_config_file


class ServingSettings(BaseSettings):
    """What only the server reads: the CORS origins (docs/contract.md "CORS"), the address
    ``python -m serving`` binds (docs/contract.md "Other environment variables") and how long and how many
    connections a worker holds (docs/reliability.md)."""

    model_config = SettingsConfigDict(populate_by_name=True, extra="forbid", frozen=True)

    # comma-separated; "*" = any origin, without credentials; never "*" while auth is on (serving.middleware.build_cors)
    cors_origins: str = Field("*", validation_alias=env_aliases("CORS_ORIGINS"))
    # off | required | writes (inspect open, the rest needs a key): serving.auth, docs/security.md
    auth: Literal["off", "required", "writes"] = Field("off", validation_alias=env_aliases("AUTH"))
    # failed key attempts per client address and minute, per worker, before 429 (serving.auth.FailureLimiter)
    auth_max_failures: int = Field(20, validation_alias=env_aliases("AUTH_MAX_FAILURES"))
    # comma-separated addresses whose X-Forwarded-For/-Proto uvicorn trusts ("" = none; python -m serving)
    trusted_proxies: str = Field("", validation_alias=env_aliases("TRUSTED_PROXIES"))
    backend_host: str = Field("127.0.0.1", validation_alias=env_aliases("BACKEND_HOST", "HOST"))
    backend_port: int = Field(8000, validation_alias=env_aliases("BACKEND_PORT", "PORT"))
    # connections + requests in progress per worker; past it uvicorn answers 503 (python -m serving)
    limit_concurrency: int = Field(256, validation_alias=env_aliases("LIMIT_CONCURRENCY"))
    # an idle keep-alive connection is closed after this many seconds (python -m serving)
    timeout_keep_alive_s: int = Field(5, validation_alias=env_aliases("TIMEOUT_KEEP_ALIVE_S"))
    # the longest wait for the next part of a request body; then 408 (serving.middleware)
    body_read_timeout_s: float = Field(30.0, validation_alias=env_aliases("BODY_READ_TIMEOUT_S"))
    # where each launch keeps its workers' Prometheus values, in a folder of its own (docs/metrics.md);
    # None: bdi-metrics in the system temp folder (metrics_base)
    metrics_dir: Path | None = Field(None, validation_alias=env_aliases("METRICS_DIR"))

    @field_validator("backend_port", mode="before")
    @classmethod
    def _parse_port(cls, value: object) -> int:
        # an invalid port falls back to 8000 (docs/contract.md "Other environment variables")
        try:
            port = int(str(value))
        except ValueError:
            return 8000
        return port if 0 < port < 65536 else 8000

    @field_validator("auth", mode="before")
    @classmethod
    def _parse_auth(cls, value: object) -> object:
        return str(value).strip().lower() if isinstance(value, str) else value

    @field_validator("limit_concurrency", "timeout_keep_alive_s", "body_read_timeout_s", "auth_max_failures")
    @classmethod
    def _positive(cls, value: float, info: ValidationInfo) -> float:
        if not value > 0:
            raise ValueError(f"{info.field_name} must be > 0")
        return value

    def metrics_base(self) -> Path:
        """``BDI_METRICS_DIR``, else ``bdi-metrics`` in the system temp folder."""
        return self.metrics_dir if self.metrics_dir is not None else Path(tempfile.gettempdir()) / "bdi-metrics"

    def listens_beyond_loopback(self) -> bool:
        """Whether ``backend_host`` is reachable from other machines (anything but a loopback address)."""
        host = self.backend_host.strip("[]")
        if host == "localhost":
            return False
        try:
            return not ipaddress.ip_address(host).is_loopback
        except ValueError:
            return True  # a host name: assume it resolves beyond this machine

    def base_url(self) -> str:
        """``http://<host>:<port>``: where the demo's curl lines reach the server."""
        return f"http://{self.backend_host}:{self.backend_port}"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, _AliasEnvSource(settings_cls, case_sensitive=True), _ConfigFileSource(settings_cls)


class _AliasEnvSource(EnvSettingsSource):
    """The environment under the aliases only (never a field's bare name), as ``bdi.config.Settings`` reads it."""

    def _extract_field_info(
        self, field: Any, field_name: str, model_config: Mapping[str, Any] | None = None
    ) -> list[tuple[str, str, bool]]:
        infos = super()._extract_field_info(field, field_name, model_config)
        return [(field_name, env_name, is_complex) for _, env_name, is_complex in infos if env_name != field_name]


class _ConfigFileSource(PydanticBaseSettingsSource):
    """The serving keys (``bdi.settings_sources.SERVING_CONFIG_KEYS``) of the ``BDI_CONFIG`` YAML file."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = os.environ.get("BDI_CONFIG")
        if not path:
            return {}
        flat = read_config_file(Path(path))
        return {k: v for k, v in flat.items() if k in SERVING_CONFIG_KEYS and k in self.settings_cls.model_fields}
