"""The one settings object, read from IMAGEBATCH_* environment variables once."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

DEFAULT_API_BASE = "https://api.airforce/v1"


class SettingsError(ValueError):
    """An IMAGEBATCH_* variable holds a value we cannot use."""


@dataclass(frozen=True)
class Settings:
    api_base: str = DEFAULT_API_BASE
    # repr=False: a Settings printed into a log or a traceback never shows the key.
    api_key: str | None = field(default=None, repr=False)
    data_dir: Path = Path("imagebatch-data")
    database_url: str = ""
    broker_url: str = ""
    storage_url: str = ""
    # Upstream calls in flight per worker. The worker runs more renders than that at once
    # (render_slots): the renders ahead reserve, store and settle meanwhile.
    concurrency: int = 64
    # None: half of concurrency (bench/README.md: what keeps every call slot busy).
    renders_ahead: int | None = None
    max_attempts: int = 4
    max_media_bytes: int = 64 * 1024 * 1024
    models_ttl: int = 3600
    render_deadline: float = 900.0
    read_timeout: float = 120.0
    connect_timeout: float = 30.0
    allow_private_media: bool = False
    # A render sent to the broker this long ago and still not started, when renders sent after
    # it have started (or none has for this long), lost its message: it goes back to SQL.
    # None: lease_seconds, so a dead worker's received messages come back as soon as its
    # leases would (with sweep_interval, within 1.5 x lease_seconds).
    requeue_after: float | None = None
    # Broker messages at most (renders sent, not started). 0: twice the live workers' slots.
    broker_window: int = 0
    backoff_base: float = 1.0
    backoff_cap: float = 60.0
    media_concurrency: int = 32
    # Threads committing the renders' transactions in groups. One on PostgreSQL too: more
    # overlap their round trips, but split the work into smaller groups, each with its own
    # COMMIT and job-row update; on 2 cores that cost more CPU than the overlap saved
    # (bench/README.md: distributed-1 at latency 0, 112-119 against 79-80 renders/s with 4).
    committers: int = 1
    max_in_flight: int = 0
    model_rates: str = ""
    redis_url: str = ""
    # None: half of lease_seconds (a dead worker's renders run again within 1.5 leases).
    sweep_interval: float | None = None
    # A worker renews the leases of the renders it holds every lease_seconds / 3; a render
    # whose lease ran out lost its worker and is swept.
    lease_seconds: float = 60.0
    # Redis broker only: 0 = derived from the render deadline (it must outlast a render).
    visibility_timeout: float = 0.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env

        def get(name: str) -> str | None:
            value = env.get(f"IMAGEBATCH_{name}")
            return value if value not in (None, "") else None

        data_dir = Path(get("DATA_DIR") or "imagebatch-data").expanduser().resolve()
        kwargs: dict[str, object] = {"data_dir": data_dir}
        text = {
            "api_base": "API_BASE", "api_key": "API_KEY", "database_url": "DATABASE_URL",
            "broker_url": "BROKER_URL", "storage_url": "STORAGE_URL",
            "model_rates": "MODEL_RATES", "redis_url": "REDIS_URL",
        }
        for attr, name in text.items():
            if (value := get(name)) is not None:
                kwargs[attr] = value
        ints = {
            "concurrency": "CONCURRENCY", "max_attempts": "MAX_ATTEMPTS",
            "max_media_bytes": "MAX_MEDIA_BYTES", "models_ttl": "MODELS_TTL",
            "media_concurrency": "MEDIA_CONCURRENCY", "max_in_flight": "MAX_IN_FLIGHT",
            "committers": "COMMITTERS", "renders_ahead": "RENDERS_AHEAD",
            "broker_window": "BROKER_WINDOW",
        }
        for attr, name in ints.items():
            if (value := get(name)) is not None:
                kwargs[attr] = _parse_number(name, value, int)
        floats = {
            "render_deadline": "RENDER_DEADLINE", "read_timeout": "READ_TIMEOUT",
            "connect_timeout": "CONNECT_TIMEOUT", "requeue_after": "REQUEUE_AFTER",
            "backoff_base": "BACKOFF_BASE", "backoff_cap": "BACKOFF_CAP",
            "sweep_interval": "SWEEP_INTERVAL", "lease_seconds": "LEASE_SECONDS",
            "visibility_timeout": "VISIBILITY_TIMEOUT",
        }
        for attr, name in floats.items():
            if (value := get(name)) is not None:
                kwargs[attr] = _parse_number(name, value, float)
        if (value := get("ALLOW_PRIVATE_MEDIA")) is not None:
            kwargs["allow_private_media"] = value.lower() in ("1", "true", "yes", "on")
        return cls(**kwargs).with_defaults()  # type: ignore[arg-type]

    def with_defaults(self) -> Settings:
        """Fill the embedded defaults that depend on data_dir."""
        return replace(
            self,
            api_base=self.api_base.rstrip("/"),
            requeue_after=(self.lease_seconds if self.requeue_after is None
                           else self.requeue_after),
            sweep_interval=(self.lease_seconds / 2 if self.sweep_interval is None
                            else self.sweep_interval),
            database_url=self.database_url or f"sqlite:///{self.data_dir / 'imagebatch.db'}",
            storage_url=self.storage_url or (self.data_dir / "media").as_uri(),
            broker_url=self.broker_url or "filesystem://localhost//",
        )

    @property
    def render_slots(self) -> int:
        """Renders a worker runs at once: one per call slot, and the renders ahead, which
        take their reservation before a call slot frees and store and settle after it, so no
        call slot waits on the database or the store."""
        ahead = self.concurrency // 2 if self.renders_ahead is None else self.renders_ahead
        return self.concurrency + ahead

    @property
    def broker_dir(self) -> Path:
        return self.data_dir / "broker"

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def shared_redis_url(self) -> str | None:
        """Redis for limits shared by all workers: IMAGEBATCH_REDIS_URL, else a Redis broker."""
        if self.redis_url:
            return self.redis_url
        if self.broker_url.startswith(("redis://", "rediss://")):
            return self.broker_url
        return None


def _parse_number(name: str, value: str, kind: type[int] | type[float]) -> int | float:
    try:
        number = kind(value)
    except ValueError:
        raise SettingsError(
            f"IMAGEBATCH_{name}={value!r} is not a{'n integer' if kind is int else ' number'}"
        ) from None
    if number < 0:
        raise SettingsError(f"IMAGEBATCH_{name}={value!r} must not be negative")
    return number
