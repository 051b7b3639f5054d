"""Typed settings: config/default.toml, then an optional --config file, then environment.

Every key is `section.name`; its environment variable is `TIERPROXY_<SECTION>_<NAME>`
(e.g. `redis.url` -> `TIERPROXY_REDIS_URL`). Values are validated once, here; a bad value
raises `ConfigError` naming the key, and the CLI exits non-zero with that message.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

DEFAULT_FILE = Path(__file__).resolve().parent.parent / "config" / "default.toml"
ENV_PREFIX = "TIERPROXY_"


class ConfigError(ValueError):
    """A config key is missing, unknown or has a bad value; the message names the key."""


@dataclass(frozen=True)
class Api:
    host: str = "127.0.0.1"
    port: int = 8750
    token: str = ""
    max_body_bytes: int = 1_048_576
    max_content_chars: int = 65_536
    max_metadata_bytes: int = 16_384
    request_timeout_s: float = 10.0


@dataclass(frozen=True)
class Metrics:
    host: str = "0.0.0.0"
    port: int = 9750


@dataclass(frozen=True)
class Data:
    dir: str = ".tierproxy"


@dataclass(frozen=True)
class Redis:
    url: str = ""
    shards: int = 4
    window: int = 200
    pool_size: int = 64
    socket_timeout_s: float = 5.0
    health_check_interval_s: float = 5.0
    ack_replicas: int = 0
    ack_timeout_ms: int = 100
    max_memory_ratio: float = 0.9
    write_through: bool = False


@dataclass(frozen=True)
class Postgres:
    url: str = ""
    pool_max: int = 8
    command_timeout_s: float = 10.0


@dataclass(frozen=True)
class ClickHouse:
    url: str = ""
    max_batch: int = 10_000
    interval_ms: int = 1000
    store_content: bool = True
    retention_days: int = 0  # a TTL on the events table; 0 = none (issue 12.4)


@dataclass(frozen=True)
class Flush:
    max_batch: int = 1000
    max_delay_ms: int = 50
    max_inflight: int = 4
    max_attempts: int = 5
    claim_idle_ms: int = 30_000
    backoff_base_ms: int = 50
    backoff_max_ms: int = 5000
    max_backlog: int = 200_000
    trim_interval_s: float = 1.0
    max_lag_s: float = 300.0
    sinks: str = "pg,ch"

    @property
    def sink_names(self) -> tuple[str, ...]:
        return tuple(n.strip() for n in self.sinks.split(",") if n.strip())


@dataclass(frozen=True)
class Circuit:
    failure_threshold: int = 3
    open_s: float = 2.0


@dataclass(frozen=True)
class Cache:
    ttl_s: int = 3600
    recent_ids: int = 1000
    id_clock_skew_s: float = 30.0


@dataclass(frozen=True)
class WebSocket:
    queue_size: int = 1000
    max_subscriptions: int = 1000


@dataclass(frozen=True)
class Worker:
    socket: str = ""


@dataclass(frozen=True)
class Shutdown:
    deadline_s: float = 10.0


@dataclass(frozen=True)
class Log:
    level: str = "info"
    format: str = "text"


@dataclass(frozen=True)
class Debug:
    failpoint: str = ""


@dataclass(frozen=True)
class Ephemeral:
    max_event_bytes: int = 16_384
    rate_per_s: float = 50.0
    burst: int = 100


@dataclass(frozen=True)
class Settings:
    api: Api = field(default_factory=Api)
    metrics: Metrics = field(default_factory=Metrics)
    data: Data = field(default_factory=Data)
    redis: Redis = field(default_factory=Redis)
    postgres: Postgres = field(default_factory=Postgres)
    clickhouse: ClickHouse = field(default_factory=ClickHouse)
    flush: Flush = field(default_factory=Flush)
    circuit: Circuit = field(default_factory=Circuit)
    cache: Cache = field(default_factory=Cache)
    ws: WebSocket = field(default_factory=WebSocket)
    worker: Worker = field(default_factory=Worker)
    shutdown: Shutdown = field(default_factory=Shutdown)
    log: Log = field(default_factory=Log)
    debug: Debug = field(default_factory=Debug)
    ephemeral: Ephemeral = field(default_factory=Ephemeral)

    def replace(self, section: str, **values: Any) -> Settings:
        """A copy with some keys of one section changed, validated like loaded values."""
        raw = {f.name: dataclasses.asdict(getattr(self, f.name)) for f in fields(self)}
        raw[section].update(values)
        return _build(raw)


_POSITIVE = {
    "api.port", "metrics.port", "api.max_body_bytes", "api.max_content_chars",
    "api.max_metadata_bytes", "api.request_timeout_s", "redis.shards", "redis.window",
    "redis.pool_size", "redis.socket_timeout_s", "redis.health_check_interval_s",
    "redis.ack_timeout_ms", "redis.max_memory_ratio",
    "postgres.pool_max", "postgres.command_timeout_s",
    "clickhouse.max_batch", "clickhouse.interval_ms", "flush.max_batch", "flush.max_delay_ms",
    "flush.max_inflight", "flush.max_attempts", "flush.claim_idle_ms", "flush.backoff_base_ms",
    "flush.backoff_max_ms", "flush.max_backlog", "flush.trim_interval_s", "flush.max_lag_s",
    "circuit.failure_threshold", "circuit.open_s", "cache.ttl_s", "cache.recent_ids",
    "cache.id_clock_skew_s", "ws.queue_size",
    "ws.max_subscriptions", "shutdown.deadline_s",
}
_CHOICES = {"log.level": {"debug", "info", "warning", "error"}, "log.format": {"text", "json"}}
_URL_SCHEMES = {
    "redis.url": ("redis://", "rediss://", "unix://", "redis+sentinel://", "rediss+sentinel://",
                  "redis+cluster://", "rediss+cluster://"),
    "postgres.url": ("postgres://", "postgresql://"),
    "clickhouse.url": ("http://", "https://", "chdb://"),
}


def load(file: Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Defaults file, then `file`, then environment variables; validated."""
    raw: dict[str, Any] = {f.name: {} for f in fields(Settings)}
    if DEFAULT_FILE.exists():  # the documented defaults; absent from an installed wheel
        _merge(raw, _read_toml(DEFAULT_FILE), str(DEFAULT_FILE))
    if file is not None:
        _merge(raw, _read_toml(file), str(file))
    _merge(raw, _from_env(os.environ if env is None else env), "environment")
    return _build(raw)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"config file {path}: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: {e}") from e


def _merge(raw: dict[str, Any], extra: dict[str, Any], origin: str) -> None:
    for section, values in extra.items():
        if section not in raw or not isinstance(values, dict):
            raise ConfigError(f"{section}: unknown config section (in {origin})")
        raw[section].update(values)


def _from_env(env: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for f in fields(Settings):
        for k in fields(_section_type(f.name)):
            name = f"{ENV_PREFIX}{f.name}_{k.name}".upper()
            if name in env:
                out.setdefault(f.name, {})[k.name] = env[name]
    return out


def _section_type(name: str) -> type:
    return type(getattr(Settings(), name))


def _build(raw: dict[str, Any]) -> Settings:
    sections: dict[str, Any] = {}
    for f in fields(Settings):
        cls = _section_type(f.name)
        values = dict(raw.get(f.name, {}))
        known = {k.name: k for k in fields(cls)}
        for key in values:
            if key not in known:
                raise ConfigError(f"{f.name}.{key}: unknown config key")
        kwargs = {k: _coerce(f"{f.name}.{k}", v, known[k].default) for k, v in values.items()}
        sections[f.name] = cls(**kwargs)
    settings = Settings(**sections)
    _validate(settings)
    return settings


def _coerce(key: str, value: Any, default: Any) -> Any:
    kind = type(default)
    try:
        if kind is bool:
            return _to_bool(value)
        if kind in (int, float) and isinstance(value, bool):
            raise ValueError("a boolean is not a number")
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError("not a whole number")
        if kind is str and not isinstance(value, str):
            raise ValueError("not a string")
        result = kind(value)
        if kind is float and not math.isfinite(result):
            raise ValueError("not a finite number")
        return result
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{key}: expected {kind.__name__}, got {value!r} ({e})") from e


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off"}:
        return False
    raise ValueError("expected true or false")


def _validate(s: Settings) -> None:
    for key in _POSITIVE:
        section, name = key.split(".")
        if getattr(getattr(s, section), name) <= 0:
            raise ConfigError(f"{key}: must be greater than 0")
    for key, choices in _CHOICES.items():
        section, name = key.split(".")
        if getattr(getattr(s, section), name) not in choices:
            raise ConfigError(f"{key}: must be one of {', '.join(sorted(choices))}")
    for key, schemes in _URL_SCHEMES.items():
        section, name = key.split(".")
        url = getattr(getattr(s, section), name)
        if url and not url.startswith(schemes):
            raise ConfigError(f"{key}: {url!r} must start with one of {', '.join(schemes)}")
    for key in ("api.port", "metrics.port"):
        section, name = key.split(".")
        if getattr(getattr(s, section), name) > 65535:
            raise ConfigError(f"{key}: must be a TCP port (1-65535)")
    _validate_redis(s.redis)
    _validate_ephemeral(s.ephemeral)
    if s.clickhouse.retention_days < 0:
        raise ConfigError("clickhouse.retention_days: must be 0 (keep events) or more")


def _validate_redis(r: Redis) -> None:
    if r.ack_replicas < 0:
        raise ConfigError("redis.ack_replicas: must be 0 or more")
    if r.ack_timeout_ms * 2 >= r.socket_timeout_s * 1000:
        # A write of the replication lane can wait behind one WAIT and then its own.
        raise ConfigError("redis.ack_timeout_ms: must be less than half of "
                          "redis.socket_timeout_s")
    if r.max_memory_ratio > 1:
        raise ConfigError("redis.max_memory_ratio: must be at most 1 (used_memory / maxmemory)")


MAX_EVENT_BYTES = 1_048_576  # an ephemeral event is a push, not a transfer


def _validate_ephemeral(e: Ephemeral) -> None:
    for name in ("max_event_bytes", "rate_per_s", "burst"):
        if getattr(e, name) <= 0:
            raise ConfigError(f"ephemeral.{name}: must be greater than 0")
    if e.max_event_bytes > MAX_EVENT_BYTES:
        raise ConfigError(f"ephemeral.max_event_bytes: must be at most {MAX_EVENT_BYTES}")
