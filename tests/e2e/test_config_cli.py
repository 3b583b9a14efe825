"""`mesh config from-modelmesh` as a user runs it: a real subprocess; the TOML it writes loads with our
settings loader and gives the mapped values; notes on stderr; bad input is exit status 2 and one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mesh.settings import load_settings

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]

CONFIGMAP = """\
apiVersion: v1
kind: ConfigMap
metadata:
  name: model-serving-config
data:
  config.yaml: |
    inferenceServicePort: 9033
    PodsPerRuntime: 3
    restProxy:
      enabled: false
    metrics:
      port: 9090
    enableAccessLogging: true
    storageSecretName: storage-config
    podsPerRuntim: 4
"""


def mesh(*args: str | Path, stdin: str | bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    data = stdin.encode() if isinstance(stdin, str) else stdin
    return subprocess.run([sys.executable, "-m", "mesh", *map(str, args)], input=data, capture_output=True,
                          cwd=ROOT, timeout=60)


def check_settings(path: Path) -> None:
    settings = load_settings(path, env={})
    assert settings.router.port == 9033 and settings.router.rest_port == -1 and settings.log.access_log is True
    assert settings.router.metrics_port == settings.runtime.metrics_port == 9090
    assert settings.controller.pods_per_runtime == 3


def test_stdout_is_toml_and_stderr_says_key_by_key(tmp_path: Path) -> None:
    source = tmp_path / "model-serving-config.yaml"
    source.write_text(CONFIGMAP)
    r = mesh("config", "from-modelmesh", source)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "mesh.toml"
    out.write_bytes(r.stdout)
    check_settings(out)
    assert b"# from inferenceServicePort: 9033\nport = 9033\n" in r.stdout
    stderr = r.stderr.decode().splitlines()
    assert stderr[0] == "warning: podsPerRuntim: unknown key, ignored (did you mean podsPerRuntime?)"
    assert "PodsPerRuntime: controller.pods_per_runtime = 3" in stderr
    assert any(line.startswith("storageSecretName: deploy/base/runtime.yaml mounts the Secret storage-config")
               for line in stderr)


def test_out_file_and_stdin(tmp_path: Path) -> None:
    out = tmp_path / "settings.toml"
    r = mesh("config", "from-modelmesh", "-", "--out", out, stdin=CONFIGMAP)
    assert r.returncode == 0, r.stderr
    assert r.stdout == b""
    assert r.stderr.decode().splitlines()[-1] == f"wrote {out}"
    check_settings(out)


@pytest.mark.parametrize("content,message", [
    (None, "No such file or directory"),
    ("inferenceServicePort: [1]", "inferenceServicePort: expected an integer from 1 to 65535, got a list"),
    ("a: [", "not YAML: "),
    (b"#" * (1024 * 1024 + 1), "larger than 1 MiB"),
    (b"\xff\xfe", "not UTF-8"),
], ids=["missing", "wrong-type", "not-yaml", "too-big", "not-utf8"])  # short ids: PYTEST_CURRENT_TEST is in the env
def test_bad_input_is_exit_status_2_and_one_line(tmp_path: Path, content: str | bytes | None, message: str) -> None:
    source = tmp_path / "config.yaml"
    if isinstance(content, str):
        source.write_text(content)
    elif content is not None:
        source.write_bytes(content)
    out = tmp_path / "never.toml"
    r = mesh("config", "from-modelmesh", source, "--out", out)
    assert r.returncode == 2
    lines = r.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mesh: error: {source}: ") and message in lines[0], lines
    assert r.stdout == b"" and not out.exists()


def test_an_unwritable_out_is_exit_status_2(tmp_path: Path) -> None:
    r = mesh("config", "from-modelmesh", "-", "--out", tmp_path / "missing" / "mesh.toml", stdin="podsPerRuntime: 3")
    assert r.returncode == 2
    assert r.stderr.decode().splitlines() == [f"mesh: error: --out {tmp_path / 'missing' / 'mesh.toml'}: "
                                              "No such file or directory"]
