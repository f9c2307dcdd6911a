"""Settings from BROKER_* environment variables: the only module that reads the environment."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from starlette.config import Config

JOURNAL_SYNC_MODES = ("full", "normal")
TLS_MODES = ("off", "self-signed")


class SettingsError(ValueError):
    """A BROKER_* value that cannot be used; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8777
    data_dir: Path = Path("data")
    redis_url: str | None = None
    journal_sync: str = "full"
    jwt_secret: str | None = None
    admin_username: str = "admin"
    admin_password: str | None = None
    tls: str = "off"
    tls_certfile: str | None = None
    tls_keyfile: str | None = None
    workers: int = 1
    log_level: str = "info"
    access_log: bool = True  # a line per request at `info`: about a third of a publish's CPU
    max_message_bytes: int = 262_144
    max_body_bytes: int = 10 * 1024 * 1024
    metrics_token: str | None = None
    cors_origins: tuple[str, ...] = ()
    access_token_seconds: int = 3600
    refresh_token_seconds: int = 7 * 24 * 3600
    login_rate_limit: str = "10/minute"
    reaper_interval_seconds: float = 1.0
    promoter_interval_seconds: float = 0.25
    retention_interval_seconds: float = 60.0
    redis_check_interval_seconds: float = 1.0
    journal_batch_max: int = 2000
    sse_max_streams_per_user: int = 20
    sse_buffer_events: int = 2000
    graphiql: bool = False
    graphql_introspection: bool = False

    def __post_init__(self) -> None:
        if self.journal_sync not in JOURNAL_SYNC_MODES:
            raise SettingsError(f"BROKER_JOURNAL_SYNC must be one of {JOURNAL_SYNC_MODES}, not {self.journal_sync!r}")
        if self.tls not in TLS_MODES:
            raise SettingsError(f"BROKER_TLS must be one of {TLS_MODES}, not {self.tls!r}")
        if bool(self.tls_certfile) != bool(self.tls_keyfile):
            raise SettingsError("BROKER_TLS_CERTFILE and BROKER_TLS_KEYFILE must be set together")
        if not 1 <= self.workers <= 64:
            raise SettingsError("BROKER_WORKERS must be between 1 and 64")
        for name in ("port", "max_message_bytes", "max_body_bytes", "access_token_seconds", "journal_batch_max"):
            if getattr(self, name) <= 0:
                raise SettingsError(f"BROKER_{name.upper()} must be a positive number")
        if self.port > 65535:
            raise SettingsError("BROKER_PORT must be at most 65535")
        for f in fields(self):
            if f.name.endswith("_interval_seconds"):
                value = getattr(self, f.name)
                if not (math.isfinite(value) and 0 < value <= 3600):
                    raise SettingsError(f"BROKER_{f.name.upper()} must be a number of seconds in (0, 3600]")

    @property
    def journal_path(self) -> Path:
        return self.data_dir / "journal.sqlite3"

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def metrics_dir(self) -> Path | None:
        """Where worker processes share metric values (prometheus-client multiprocess mode), if there are several."""
        return self.data_dir / "metrics" if self.workers > 1 else None

    @property
    def uses_tls(self) -> bool:
        return self.tls != "off" or bool(self.tls_certfile)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read every field from BROKER_<FIELD>; keyword overrides (CLI flags) win when not None."""
        config = Config(environ=dict(os.environ if environ is None else environ))
        values: dict[str, Any] = {}
        for field in fields(cls):
            key = "BROKER_" + field.name.upper()
            raw = config.get(key, default=None)
            if raw is None or raw == "":
                continue
            values[field.name] = _convert(key, field.default, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        if isinstance(values.get("data_dir"), str):
            values["data_dir"] = Path(values["data_dir"])
        try:
            return cls(**values)
        except TypeError as exc:  # unknown override name: a programming error, said plainly
            raise SettingsError(str(exc)) from exc

    def with_changes(self, **changes: Any) -> Settings:
        return replace(self, **changes)

    def export(self) -> None:
        """Write these settings to this process's environment as BROKER_* so worker processes read the same."""
        for f in fields(self):
            value = getattr(self, f.name)
            key = "BROKER_" + f.name.upper()
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = ",".join(value) if isinstance(value, tuple) else str(value)
        if self.metrics_dir is not None:  # read by prometheus-client itself when it is imported
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(self.metrics_dir.absolute())


def _convert(key: str, default: Any, raw: str) -> Any:
    try:
        if isinstance(default, bool):
            return raw.strip().lower() in ("1", "true", "yes", "on")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        if isinstance(default, Path):
            return Path(raw)
        if isinstance(default, tuple):
            return tuple(part.strip() for part in raw.split(",") if part.strip())
    except ValueError as exc:
        raise SettingsError(f"{key}={raw!r} is not a valid {type(default).__name__}") from exc
    if key in ("BROKER_JOURNAL_SYNC", "BROKER_TLS", "BROKER_LOG_LEVEL"):
        return raw.strip().lower()
    return raw
