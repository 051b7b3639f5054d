"""Settings: config/default.toml documents every key with its real default; a --config file
and TIERPROXY_* variables override; every bad value is refused with the key named."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from proxy import settings as config
from proxy.settings import DEFAULT_FILE, ConfigError, Settings

# A valid value other than the default, for every string key.
OTHER_TEXT = {
    "api.host": "0.0.0.0", "api.token": "t0k", "metrics.host": "127.0.0.1", "data.dir": "/d",
    "redis.url": "redis://h:1/0", "postgres.url": "postgresql://u@h:5/db",
    "clickhouse.url": "chdb:///var/ch", "log.level": "debug", "log.format": "json",
    "debug.failpoint": "after-read:raise", "flush.sinks": "pg", "worker.socket": "/run/w.sock",
}

OTHER_NUMBER = {"redis.max_memory_ratio": 0.5}  # default + 1 would be out of range


def all_keys() -> dict[str, Any]:
    """Every `section.key` of Settings with its dataclass default."""
    defaults = Settings()
    return {f"{s.name}.{k.name}": getattr(getattr(defaults, s.name), k.name)
            for s in dataclasses.fields(Settings)
            for k in dataclasses.fields(getattr(defaults, s.name))}


def value_of(s: Settings, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(s, section), name)


def env_name(key: str) -> str:
    return "TIERPROXY_" + key.replace(".", "_").upper()


def refused(key: str, problem: str, env: dict[str, str] | None = None,
            file: Path | None = None) -> None:
    with pytest.raises(ConfigError) as failed:
        config.load(file, env or {})
    assert str(failed.value).startswith(f"{key}: "), str(failed.value)
    assert problem in str(failed.value)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "extra.toml"
    path.write_text(text)
    return path


# ---- default.toml is the documentation of the dataclass defaults


def test_default_file_values_equal_the_dataclass_defaults() -> None:
    defaults = all_keys()
    for section, values in tomllib.loads(DEFAULT_FILE.read_text()).items():
        for name, value in values.items():
            key = f"{section}.{name}"
            assert key in defaults, f"{key} is in default.toml but not in Settings"
            assert (type(value), value) == (type(defaults[key]), defaults[key]), key
    assert config.load(env={}) == Settings()


def documented(text: str) -> dict[str, bool]:
    """`section.key` -> whether a comment heads it: the comment line right above it, or above
    the group of keys it belongs to (keys on consecutive lines share one comment)."""
    out: dict[str, bool] = {}
    section, commented = "", False
    for line in (raw.strip() for raw in text.splitlines()):
        if line.startswith("["):
            section, commented = line.strip("[]"), False
        elif line.startswith("#"):
            commented = True
        elif "=" in line:
            out[f"{section}.{line.split('=')[0].strip()}"] = commented
        else:
            commented = False  # a blank line ends a comment's reach
    return out


def test_every_key_is_in_default_file_with_a_comment() -> None:
    keys = documented(DEFAULT_FILE.read_text())
    assert set(keys) == set(all_keys())
    assert [key for key, commented in keys.items() if not commented] == []


def test_documented_detects_an_uncommented_key() -> None:
    assert documented("[a]\n# x\nb = 1\nc = 2\n\nd = 3\n[e]\nf = 1\n") == {
        "a.b": True, "a.c": True, "a.d": False, "e.f": False}


# ---- overrides


def test_every_key_has_an_environment_variable() -> None:
    for key, default in all_keys().items():
        want: Any
        if isinstance(default, bool):
            raw, want = str(not default).lower(), not default
        elif key in OTHER_NUMBER:
            raw, want = str(OTHER_NUMBER[key]), OTHER_NUMBER[key]
        elif isinstance(default, int | float):
            raw, want = str(default + 1), default + 1
        else:
            raw = want = OTHER_TEXT[key]
        got = value_of(config.load(env={env_name(key): raw}), key)
        assert (type(got), got) == (type(default), want), key


def test_named_environment_overrides() -> None:
    s = config.load(env={
        "TIERPROXY_REDIS_URL": "redis://10.0.0.1:6380/2",
        "TIERPROXY_POSTGRES_URL": "postgres://app@db/chat",
        "TIERPROXY_CLICKHOUSE_URL": "https://u:p@ch:8443/analytics",
        "TIERPROXY_API_TOKEN": "s3cret",
        "TIERPROXY_API_PORT": "9000",
        "TIERPROXY_FLUSH_TRIM_INTERVAL_S": "0.5",
    })
    assert (s.redis.url, s.postgres.url, s.clickhouse.url, s.api.token) == (
        "redis://10.0.0.1:6380/2", "postgres://app@db/chat", "https://u:p@ch:8443/analytics",
        "s3cret")
    assert (s.api.port, s.flush.trim_interval_s) == (9000, 0.5)
    assert config.load(env={"TIERPROXY_CLICKHOUSE_URL": "chdb:///data/ch"}).clickhouse.url == \
        "chdb:///data/ch"


def test_load_reads_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIERPROXY_API_TOKEN", "from-env")
    assert config.load().api.token == "from-env"


def test_file_overrides_defaults_and_environment_overrides_file(tmp_path: Path) -> None:
    file = write(tmp_path, '[redis]\nshards = 8\nurl = "redis://file/0"\n[api]\nport = 9100\n')
    s = config.load(file, {"TIERPROXY_REDIS_URL": "redis://env/0"})
    assert (s.redis.shards, s.redis.url, s.api.port) == (8, "redis://env/0", 9100)
    assert s.redis.window == Settings().redis.window  # untouched keys keep their default


@pytest.mark.parametrize(("raw", "want"), [
    ("1", True), ("true", True), ("TRUE", True), ("yes", True), (" On ", True),
    ("0", False), ("false", False), ("No", False), ("off", False),
])
def test_bool_parsing(raw: str, want: bool) -> None:
    env = {"TIERPROXY_CLICKHOUSE_STORE_CONTENT": raw}
    assert config.load(env=env).clickhouse.store_content is want


def test_replace_validates_like_load() -> None:
    assert Settings().replace("api", token="x").api.token == "x"
    with pytest.raises(ConfigError, match=r"^redis\.shards: must be greater than 0"):
        Settings().replace("redis", shards=0)


# ---- every bad value names its key


@pytest.mark.parametrize(("key", "raw", "problem"), [
    ("redis.shards", "abc", "expected int, got 'abc'"),
    ("redis.shards", "1.5", "expected int"),
    ("redis.shards", "0", "must be greater than 0"),
    ("redis.shards", "-3", "must be greater than 0"),
    ("api.port", "", "expected int"),
    ("api.port", "70000", "must be a TCP port"),
    ("metrics.port", "0", "must be greater than 0"),
    ("flush.max_backlog", "-1", "must be greater than 0"),
    ("api.request_timeout_s", "soon", "expected float"),
    ("shutdown.deadline_s", "0", "must be greater than 0"),
    ("cache.ttl_s", "-60", "must be greater than 0"),
    ("clickhouse.store_content", "maybe", "expected bool"),
    ("clickhouse.store_content", "", "expected bool"),
    ("clickhouse.store_content", "2", "expected bool"),
    ("redis.url", "http://localhost:6379", "must start with one of redis://"),
    ("redis.url", "localhost:6379", "must start with one of redis://"),
    ("postgres.url", "mysql://db/x", "must start with one of postgres://"),
    ("clickhouse.url", "tcp://ch:9000", "must start with one of http://"),
    ("log.level", "verbose", "must be one of debug, error, info, warning"),
    ("log.format", "xml", "must be one of json, text"),
    ("redis.ack_replicas", "-1", "must be 0 or more"),
    ("redis.ack_timeout_ms", "2500", "must be less than half of redis.socket_timeout_s"),
    ("redis.ack_timeout_ms", "0", "must be greater than 0"),
    ("redis.max_memory_ratio", "1.5", "must be at most 1"),
    ("redis.max_memory_ratio", "0", "must be greater than 0"),
])
def test_bad_environment_values_name_the_key(key: str, raw: str, problem: str) -> None:
    refused(key, problem, env={env_name(key): raw})


@pytest.mark.parametrize(("text", "key", "problem"), [
    ("[redis]\nshard = 3\n", "redis.shard", "unknown config key"),
    ("[api]\ntokn = 'x'\n", "api.tokn", "unknown config key"),
    ("[rediss]\nshards = 3\n", "rediss", "unknown config section"),
    ("shards = 3\n", "shards", "unknown config section"),
    ("[redis]\nshards = 2.5\n", "redis.shards", "not a whole number"),
    ("[redis]\nshards = true\n", "redis.shards", "a boolean is not a number"),
    ("[redis]\nshards = 0\n", "redis.shards", "must be greater than 0"),
    ("[api]\nrequest_timeout_s = -1.0\n", "api.request_timeout_s", "must be greater than 0"),
    ("[log]\nlevel = 'trace'\n", "log.level", "must be one of"),
    ("[clickhouse]\nstore_content = 'sometimes'\n", "clickhouse.store_content", "expected bool"),
])
def test_bad_config_file_names_the_key(tmp_path: Path, text: str, key: str,
                                       problem: str) -> None:
    refused(key, problem, file=write(tmp_path, text))


def test_whole_floats_are_accepted_for_ints(tmp_path: Path) -> None:
    assert config.load(write(tmp_path, "[redis]\nshards = 8.0\n"), {}).redis.shards == 8


def test_unreadable_config_file_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigError, match=f"^config file {missing}: No such file"):
        config.load(missing, {})
    broken = write(tmp_path, "[redis\nshards = 3\n")
    with pytest.raises(ConfigError, match=f"^config file {broken}: "):
        config.load(broken, {})


def test_nan_is_refused() -> None:
    refused("api.request_timeout_s", "", env={"TIERPROXY_API_REQUEST_TIMEOUT_S": "nan"})


def test_non_string_for_a_string_key_is_refused(tmp_path: Path) -> None:
    refused("data.dir", "expected str", file=write(tmp_path, "[data]\ndir = [1, 2]\n"))


# ---- the command line refuses a bad config before starting anything


def serve(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TIERPROXY_")}
    return subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--data-dir", str(tmp_path / "data"), *args],
        env={**clean, **env}, cwd=tmp_path, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("args", "env", "message"), [
    ((), {"TIERPROXY_REDIS_SHARDS": "0"}, "redis.shards: must be greater than 0"),
    ((), {"TIERPROXY_REDIS_URL": "http://x"},
     "redis.url: 'http://x' must start with one of redis://, rediss://, unix://, "
     "redis+sentinel://, rediss+sentinel://, redis+cluster://, rediss+cluster://"),
    (("--port", "70000"), {}, "api.port: must be a TCP port (1-65535)"),
    (("--config", "missing.toml"), {},
     "config file missing.toml: No such file or directory"),
])
def test_serve_with_a_bad_config_exits_naming_the_key(tmp_path: Path, args: tuple[str, ...],
                                                      env: dict[str, str], message: str) -> None:
    done = serve(tmp_path, *args, **env)
    assert done.returncode == 1
    assert done.stderr.strip() == f"tierproxy: config error: {message}"
    assert done.stdout == ""
    assert not (tmp_path / "data").exists()  # no embedded server was started
    assert list(tmp_path.iterdir()) == []


def test_serve_with_an_unknown_key_in_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text("[flush]\nmax_batchs = 10\n")
    done = serve(tmp_path, "--config", "bad.toml")
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr.strip() == "tierproxy: config error: flush.max_batchs: unknown config key"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.toml"]
