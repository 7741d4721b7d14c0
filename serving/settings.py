"""Settings of the HTTP server only (CORS, host and port), apart from the library's ``bdi.config.Settings``.

Read like ``Settings``: init kwargs > ``BDI_*`` env (legacy ``BRAKEDISC_*``), exactly as spelt > the
YAML file named by ``BDI_CONFIG`` > defaults. Built once per app in the lifespan, never at import.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from bdi.settings_sources import SERVING_CONFIG_KEYS, env_aliases, read_config_file


class ServingSettings(BaseSettings):
    """What only the server reads: the CORS origins (docs/contract.md "CORS") and the address
    ``python -m serving`` binds (docs/contract.md "Other environment variables")."""

    model_config = SettingsConfigDict(populate_by_name=True, extra="forbid", frozen=True)

    # comma-separated; "*" = any origin, without credentials (serving.middleware.build_cors)
    cors_origins: str = Field("*", validation_alias=env_aliases("CORS_ORIGINS"))
    backend_host: str = Field("127.0.0.1", validation_alias=env_aliases("BACKEND_HOST", "HOST"))
    backend_port: int = Field(8000, validation_alias=env_aliases("BACKEND_PORT", "PORT"))

    @field_validator("backend_port", mode="before")
    @classmethod
    def _parse_port(cls, value: object) -> int:
        # an invalid port falls back to 8000 (docs/contract.md "Other environment variables")
        try:
            port = int(str(value))
        except ValueError:
            return 8000
        return port if 0 < port < 65536 else 8000

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
