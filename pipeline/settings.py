"""The one settings object, read from IMAGEBATCH_* environment variables once."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from urllib.parse import urlsplit

from pipeline.redact import redact_url, url_secrets

DEFAULT_API_BASE = "https://api.airforce/v1"


class SettingsError(ValueError):
    """An IMAGEBATCH_* variable holds a value we cannot use."""


@dataclass(frozen=True)
class Settings:
    api_base: str = DEFAULT_API_BASE
    # repr=False: a Settings printed into a log or a traceback never shows the key (and
    # __repr__ masks the URLs' credentials).
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
    # 429s in a row after which a render fails (a 429 costs it no attempt): the bound that
    # keeps a provider answering 429 forever from keeping a render going forever.
    max_rate_limited: int = 20
    max_media_bytes: int = 64 * 1024 * 1024
    models_ttl: int = 3600
    render_deadline: float = 900.0
    read_timeout: float = 120.0
    connect_timeout: float = 30.0
    allow_private_media: bool = False
    # Webhooks (pipeline/webhooks.py): the HMAC key of their signatures, never shown, and
    # whether a notify URL may be on a private or loopback address.
    webhook_secret: str | None = field(default=None, repr=False)
    allow_private_webhooks: bool = False
    # Models priced 0 in /models are refused unless this is set: no cap bounds their calls.
    allow_free_models: bool = False
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

    def __repr__(self) -> str:
        """Printable into a log or a traceback: every URL's credentials masked, no key."""
        shown = []
        for spec in fields(self):
            if not spec.repr:
                continue
            value = getattr(self, spec.name)
            if isinstance(value, str) and (spec.name.endswith("_url") or spec.name == "api_base"):
                value = redact_url(value)
            shown.append(f"{spec.name}={value!r}")
        return f"Settings({', '.join(shown)})"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """The settings from IMAGEBATCH_* variables, each checked against its range (and the
        ones that depend on each other together): a bad value raises SettingsError naming
        the variable, its value and what it may be."""
        env = os.environ if env is None else env

        def get(name: str) -> str | None:
            value = env.get(f"IMAGEBATCH_{name}")
            return value if value not in (None, "") else None

        kwargs: dict[str, object] = {"data_dir": _data_dir(get("DATA_DIR"))}
        for attr, name in TEXTS.items():
            if (value := get(name)) is not None:
                kwargs[attr] = value
        for spec in NUMBERS:
            if (value := get(spec.env)) is not None:
                kwargs[spec.attr] = spec.parse(value)
        for attr, name in FLAGS.items():
            if (value := get(name)) is not None:
                kwargs[attr] = _parse_flag(name, value)
        settings = cls(**kwargs).with_defaults()  # type: ignore[arg-type]
        settings.check()
        return settings

    def check(self) -> None:
        """The checks that need more than one value, or a parser of their own."""
        if self.backoff_cap < self.backoff_base:
            raise SettingsError(
                f"IMAGEBATCH_BACKOFF_CAP={self.backoff_cap:g} is below IMAGEBATCH_BACKOFF_BASE="
                f"{self.backoff_base:g}: the longest wait between two attempts cannot be "
                "shorter than the first")
        check_api_base(self.api_base)
        if self.api_key and url_secrets(self.api_base):
            # One Authorization header: the key (Bearer) or the base's credentials (Basic).
            raise SettingsError(
                f"IMAGEBATCH_API_BASE={redact_url(self.api_base)!r} holds credentials and an "
                "API key is set too (IMAGEBATCH_API_KEY); only one can be sent")
        if self.api_key is not None and not self.api_key.isprintable():
            # Never echoed: the value is the secret.
            raise SettingsError("IMAGEBATCH_API_KEY: holds a line break or another control "
                                "character (it goes into an HTTP header as it is)")
        if self.api_key is not None and not self.api_key.isascii():
            raise SettingsError("IMAGEBATCH_API_KEY: holds a character that is not ASCII (an "
                                "HTTP header carries ASCII only: a typographic quote or dash?)")
        check_database_url(self.database_url, self.database_label)
        _check_scheme("BROKER_URL", self.broker_url, BROKER_SCHEMES)
        if self.redis_url:
            _check_scheme("REDIS_URL", self.redis_url, ("redis", "rediss"))
        from pipeline.limits import parse_rates  # it raises SettingsError itself

        parse_rates(self.model_rates)

    def with_defaults(self) -> Settings:
        """Fill the embedded defaults that depend on data_dir."""
        return replace(
            self,
            api_base=self.api_base.rstrip("/"),
            requeue_after=(self.lease_seconds if self.requeue_after is None
                           else self.requeue_after),
            sweep_interval=(self.lease_seconds / 2 if self.sweep_interval is None
                            else self.sweep_interval),
            database_url=self.database_url or _embedded_database(self.data_dir),
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
    def database_label(self) -> str:
        """The variable the database comes from and its value (password masked), for
        messages: the embedded SQLite file is IMAGEBATCH_DATA_DIR's."""
        if self.database_url == _embedded_database(self.data_dir):
            return f"IMAGEBATCH_DATA_DIR={str(self.data_dir)!r}"
        return f"IMAGEBATCH_DATABASE_URL={mask_url(self.database_url)!r}"

    @property
    def shared_redis_url(self) -> str | None:
        """Redis for limits shared by all workers: IMAGEBATCH_REDIS_URL, else a Redis broker."""
        if self.redis_url:
            return self.redis_url
        if self.broker_url.startswith(("redis://", "rediss://")):
            return self.broker_url
        return None


# --- what each variable may hold -----------------------------------------------------------

DAY, WEEK = 86_400, 604_800
TEXTS = {
    "api_base": "API_BASE", "api_key": "API_KEY", "database_url": "DATABASE_URL",
    "broker_url": "BROKER_URL", "storage_url": "STORAGE_URL",
    "model_rates": "MODEL_RATES", "redis_url": "REDIS_URL", "webhook_secret": "WEBHOOK_SECRET",
}
FLAGS = {"allow_private_media": "ALLOW_PRIVATE_MEDIA", "allow_free_models": "ALLOW_FREE_MODELS",
         "allow_private_webhooks": "ALLOW_PRIVATE_WEBHOOKS"}
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
BROKER_SCHEMES = ("filesystem", "redis", "rediss", "memory")
# The drivers the pipeline is tested with; others (async ones, MySQL) cannot run its SQL.
DATABASE_DRIVERS = {"sqlite": ("pysqlite",), "postgresql": ("psycopg", "psycopg2")}
DATABASE_EXAMPLE = ("sqlite:////path/to/imagebatch.db or "
                    "postgresql+psycopg://USER:PASSWORD@HOST:5432/DATABASE")


@dataclass(frozen=True)
class Number:
    """A numeric variable: its attribute, its name, whole or not, and its range. `zero`, when
    set, says what 0 means where 0 is allowed below the range."""

    attr: str
    env: str
    kind: type[int] | type[float]
    low: float
    high: float
    unit: str = ""
    zero: str | None = None

    def parse(self, text: str) -> int | float:
        try:
            number = self.kind(text.strip())
        except ValueError:
            raise SettingsError(f"IMAGEBATCH_{self.env}={text!r}: not a "
                                f"{'whole number' if self.kind is int else 'number'}; "
                                f"{self.allowed}") from None
        if not math.isfinite(number):
            raise SettingsError(f"IMAGEBATCH_{self.env}={text!r}: not a finite number; "
                                f"{self.allowed}")
        if not (self.low <= number <= self.high or (number == 0 and self.zero)):
            raise SettingsError(f"IMAGEBATCH_{self.env}={text!r}: {self.allowed}")
        return number

    @property
    def allowed(self) -> str:
        unit = f" {self.unit}" if self.unit else ""
        span = f"from {_figure(self.low)} to {_figure(self.high)}{unit}"
        return f"must be 0 ({self.zero}) or {span}" if self.zero else f"must be {span}"


NUMBERS = (
    Number("concurrency", "CONCURRENCY", int, 1, 10_000),
    Number("renders_ahead", "RENDERS_AHEAD", int, 0, 10_000),
    Number("committers", "COMMITTERS", int, 1, 64),
    Number("max_attempts", "MAX_ATTEMPTS", int, 1, 100),
    Number("max_rate_limited", "MAX_RATE_LIMITED", int, 1, 10_000),
    Number("max_media_bytes", "MAX_MEDIA_BYTES", int, 1, 2**36, "bytes"),
    Number("models_ttl", "MODELS_TTL", int, 0, 365 * DAY, "seconds"),
    Number("media_concurrency", "MEDIA_CONCURRENCY", int, 1, 10_000),
    Number("max_in_flight", "MAX_IN_FLIGHT", int, 1, 1_000_000, zero="no shared limit"),
    Number("broker_window", "BROKER_WINDOW", int, 1, 10_000_000,
           zero="twice the live workers' render slots"),
    # Every duration ends up in a timedelta, an asyncio timeout or a Redis option: finite,
    # and bounded so that none of them overflows.
    Number("render_deadline", "RENDER_DEADLINE", float, 1, WEEK, "seconds"),
    Number("read_timeout", "READ_TIMEOUT", float, 0.1, DAY, "seconds"),
    Number("connect_timeout", "CONNECT_TIMEOUT", float, 0.1, 3_600, "seconds"),
    # Below a second, messages held by a busy live worker would be sent again every sweep.
    Number("requeue_after", "REQUEUE_AFTER", float, 1, WEEK, "seconds"),
    Number("backoff_base", "BACKOFF_BASE", float, 0.01, 3_600, "seconds"),
    Number("backoff_cap", "BACKOFF_CAP", float, 0.01, DAY, "seconds"),
    Number("sweep_interval", "SWEEP_INTERVAL", float, 0.1, DAY, "seconds"),
    # A lease is renewed every third of it, in a transaction that may wait for the database
    # on a busy machine; a renewal later than the lease gets a live call swept and sent again
    # (paid twice). 0 sent every render max_attempts times.
    Number("lease_seconds", "LEASE_SECONDS", float, 2, DAY, "seconds"),
    # Redis only. Shorter than a render, Redis delivers a running task again: the copy finds
    # the live lease and does nothing, but the default outlasts every render.
    Number("visibility_timeout", "VISIBILITY_TIMEOUT", float, 1, 30 * DAY, "seconds",
           zero="twice the render deadline plus 10 minutes"),
)
# SERVE_TOKEN: read by `imagebatch serve` alone (web/app.py), kept out of Settings.
KNOWN = {"DATA_DIR", "SERVE_TOKEN", *TEXTS.values(), *FLAGS.values(), *(n.env for n in NUMBERS)}


def _figure(number: float) -> str:
    return f"{int(number):,}" if number == int(number) else f"{number:g}"


def unknown_settings(env: Mapping[str, str] | None = None) -> list[str]:
    """IMAGEBATCH_* variables that are no setting (a typo is otherwise silently ignored)."""
    env = os.environ if env is None else env
    return sorted(name for name in env
                  if name.startswith("IMAGEBATCH_") and name[11:] not in KNOWN)


def _parse_flag(name: str, text: str) -> bool:
    if text.strip().lower() in TRUE + FALSE:
        return text.strip().lower() in TRUE
    raise SettingsError(f"IMAGEBATCH_{name}={text!r}: must be one of "
                        f"{', '.join(TRUE)} (on) or {', '.join(FALSE)} (off)")


def _data_dir(text: str | None) -> Path:
    path = Path(text or "imagebatch-data").expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise SettingsError(f"IMAGEBATCH_DATA_DIR={text!r}: is a file, not a folder")
    return path


def mask_url(url: str) -> str:
    """`url` with any password replaced by ***, even when it is not a valid URL."""
    return re.sub(r"(://[^/@:\s]*:)[^@\s]*@", r"\1***@", url)


def check_api_base(url: str) -> None:
    try:
        parts = urlsplit(url)
        port_ok = parts.port is None or parts.port > 0  # .port raises on a port out of range
    except ValueError:  # "http://[::1" and the like
        parts, port_ok = urlsplit(""), False
    if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
        raise SettingsError(f"IMAGEBATCH_API_BASE={mask_url(url)!r}: not an http(s) URL "
                            f"(e.g. {DEFAULT_API_BASE})")


def _check_scheme(name: str, url: str, schemes: tuple[str, ...]) -> None:
    try:
        scheme = urlsplit(url).scheme
    except ValueError as exc:  # "redis://[::1" and the like
        raise SettingsError(f"IMAGEBATCH_{name}={mask_url(url)!r}: not a valid URL ({exc})"
                            ) from None
    if scheme not in schemes:
        raise SettingsError(f"IMAGEBATCH_{name}={mask_url(url)!r}: must start with "
                            f"{' or '.join(s + '://' for s in schemes)}")


def check_database_url(url: str, where: str | None = None) -> None:
    """The URL's form and dialect: SQLite in a file, or PostgreSQL with an installed driver.
    Whether the database can be opened is for `pipeline.db.open_engine` to find out. `where`
    names the setting and its value in messages."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    where = where or f"IMAGEBATCH_DATABASE_URL={mask_url(url)!r}"

    def refuse(reason: str) -> SettingsError:
        return SettingsError(f"{where}: {reason}")

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:  # ValueError: a port that is not a number
        detail = "" if isinstance(exc, ArgumentError) else f" ({mask_url(str(exc))})"
        raise refuse(f"not a database URL{detail} (e.g. {DATABASE_EXAMPLE})") from None
    backend, driver = parsed.get_backend_name(), parsed.get_driver_name()
    if backend not in DATABASE_DRIVERS:
        raise refuse(f"{backend} is not supported: use {DATABASE_EXAMPLE}")
    if driver not in DATABASE_DRIVERS[backend]:
        raise refuse(f"the driver {driver} is not supported: use "
                     f"{' or '.join(f'{backend}+{d}' for d in DATABASE_DRIVERS[backend])}")
    try:
        parsed.get_dialect().import_dbapi()
    except ImportError:
        raise refuse(f"the driver {driver} is not installed") from None
    if backend == "sqlite" and _in_memory(parsed.database, parsed.query):
        raise refuse("an in-memory SQLite database cannot be used: every worker thread and "
                     "process would see its own empty database; give a file, "
                     "e.g. sqlite:////path/to/imagebatch.db")
    if backend == "postgresql" and not parsed.database:
        raise refuse("no database name (…/DATABASE at the end)")


def _in_memory(database: str | None, query: Mapping[str, object]) -> bool:
    return (not database or database == ":memory:" or database.startswith("file::memory:")
            or query.get("mode") == "memory")


def _embedded_database(data_dir: Path) -> str:
    return f"sqlite:///{data_dir / 'imagebatch.db'}"
