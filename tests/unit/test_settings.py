"""Settings: one typed object from defaults, a TOML file, MESH_* variables and overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh.errors import InvalidArgument
from mesh.settings import describe, load_settings, parse_bytes


def test_later_sources_win(tmp_path: Path) -> None:
    config = tmp_path / "mesh.toml"
    config.write_text('[runtime]\ncapacity_bytes = "1GiB"\nmax_concurrent_loads = 3\n'
                      '[registry]\nurl = "etcd://10.0.0.1:2379"\n')
    s = load_settings(config, env={"MESH_RUNTIME_MAX_CONCURRENT_LOADS": "5"},
                      overrides={"registry": {"url": "memory://x"}})
    assert s.runtime.capacity_bytes == 1 << 30
    assert s.runtime.max_concurrent_loads == 5
    assert s.registry.url == "memory://x"
    assert s.router.port == 8033  # untouched default


def test_types_are_parsed() -> None:
    s = load_settings(env={"MESH_RUNTIME_LABELS": "gpu, fast", "MESH_RUNTIME_LOAD_TIMEOUT_S": "2.5",
                           "MESH_LOG_LEVEL": "debug", "MESH_OTHER_TOOL_SETTING": "ignored"})
    assert s.runtime.labels == ("gpu", "fast")
    assert s.runtime.load_timeout_s == 2.5
    assert s.log.level == "debug"
    assert parse_bytes("1.5GB") == 1_500_000_000 and parse_bytes("512MiB") == 512 << 20
    assert parse_bytes("1024") == 1024


@pytest.mark.parametrize(("env", "message"), [
    ({"MESH_RUNTIME_CAPACITY_BYTE": "1"}, "unknown setting runtime.capacity_byte"),
    ({"MESH_RUNTIME_CAPACITY_BYTES": "lots"}, "runtime.capacity_bytes: not a byte size"),
    ({"MESH_ROUTER_PORT": "eighty"}, "router.port"),
])
def test_mistakes_are_errors_that_name_the_setting(env: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        load_settings(env=env)


def test_bad_config_file_is_reported(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[runtime\n")
    with pytest.raises(InvalidArgument, match=r"bad\.toml"):
        load_settings(bad, env={})
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[cache]\nsize = 1\n")
    with pytest.raises(InvalidArgument, match=r"unknown settings group \[cache\]"):
        load_settings(unknown, env={})


def test_every_setting_is_documented() -> None:
    rows = describe()
    assert len(rows) > 20
    assert all(doc for _, _, _, doc in rows)


def test_the_cli_variables_do_not_stop_a_component() -> None:
    """A shell that exports MESH_TLS_CA, MESH_TOKEN... for `mesh model` can still run `mesh serve`:
    they are the CLI's, not settings (they used to be read as the unknown setting tls.ca)."""
    env = {"MESH_TLS_CA": "/ca.pem", "MESH_TLS_CERT": "/c.pem", "MESH_TLS_KEY": "/k.pem",
           "MESH_TLS_SERVER_NAME": "router", "MESH_TOKEN": "t" * 20, "MESH_TOKEN_FILE": "/t",
           "MESH_ROUTER": "127.0.0.1:8033", "MESH_RUNTIME_CAPACITY_BYTES": "1MiB"}
    settings = load_settings(env=env)
    assert settings.runtime.capacity_bytes == 1024 * 1024
    assert settings.tls.cert_file == ""
