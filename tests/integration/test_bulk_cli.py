"""``mesh model register --from FILE`` as a user runs it (a subprocess) against a real router and
etcd on 127.0.0.1: JSON lines and CSV, stdin, a summary and the failures with their line numbers,
exit 1 when an item failed, exit 2 with the line number for a malformed file (nothing sent), and
the progress output (a bar on a terminal, plain lines otherwise)."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mesh.gen.mmesh import model_mesh_pb2 as mm
from mesh.registry.etcd_server import EtcdProcess
from tests.support.inprocess import InProcessMesh

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


@pytest.fixture
async def mesh(etcd: EtcdProcess) -> AsyncIterator[InProcessMesh]:
    m = await InProcessMesh(etcd.url).start(runtimes=1)
    try:
        yield m
    finally:
        await m.stop()


async def cli(mesh: InProcessMesh, *args: str, stdin: bytes | None = None,
              stderr_fd: int | None = None) -> tuple[int, str, str]:
    """``mesh ARGS --router ROUTER`` in a subprocess (the router runs in this event loop, so the
    subprocess is awaited, never waited for)."""
    assert mesh.router is not None
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mesh", *args, "--router", mesh.router.endpoint,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=stderr_fd if stderr_fd is not None else asyncio.subprocess.PIPE,
        env={**os.environ, "MESH_TOKEN": ""})
    out, err = await asyncio.wait_for(proc.communicate(stdin), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), (err or b"").decode()


async def status(mesh: InProcessMesh, model_id: str) -> int:
    return (await mesh.mesh.getModelStatus(mm.GetStatusRequest(modelId=model_id), timeout=10)).status


async def test_json_lines_register_in_batches_with_a_summary(mesh: InProcessMesh, tmp_path: Path) -> None:
    await mesh.register("taken", "sklearn", "/m/other.joblib")
    lines = [json.dumps({"id": f"jl-{i}", "type": "sklearn", "path": f"/m/{i}.joblib", "labels": ["a"],
                         "min_copies": 0, "storage_params": {}}) for i in range(2_500)]
    lines.insert(10, "")  # blank lines are skipped
    lines.append(json.dumps({"id": "taken", "type": "sklearn", "path": "/m/model.joblib"}))
    lines.append(json.dumps({"id": "bad-copies", "type": "sklearn", "min_copies": 3, "max_copies": 1}))
    path = tmp_path / "models.jsonl"
    path.write_text("\n".join(lines) + "\n")
    code, out, err = await cli(mesh, "model", "register", "--from", str(path), "--batch-size", "1000")
    assert code == 1, (out, err)  # two items failed
    assert "Traceback" not in out + err
    assert "registered 2,500 of 2,502 models" in out and "2,500 created" in out and "2 failed" in out
    assert "line 2502: taken: ALREADY_EXISTS" in out
    assert "line 2503: bad-copies: INVALID_ARGUMENT" in out
    assert "progress: 2,502/2,502 sent, 2 failed" in err  # not a terminal: plain progress lines
    assert await status(mesh, "jl-2499") == mm.ModelStatusInfo.NOT_LOADED

    # JSON output, the same file again: all there already (OK, not created).
    code, out, err = await cli(mesh, "model", "register", "--from", str(path), "--json")
    summary = json.loads(out)
    assert code == 1 and summary["registered"] == 2_500 and summary["created"] == 0 and summary["failed"] == 2
    assert {f["line"] for f in summary["failures"]} == {2502, 2503}


async def test_csv_and_stdin(mesh: InProcessMesh, tmp_path: Path) -> None:
    csv_text = ("id,type,path,labels,min_copies,size_hint,storage_key,storage_params,load_now\n"
                "csv-1,sklearn,/m/1.joblib,a;b,0,20MiB,,,false\n"
                'csv-2,onnx,s3://bucket/2.onnx,,1,,my-s3,"bucket=models;region=x",\n'
                "\n")
    path = tmp_path / "models.csv"
    path.write_text(csv_text)
    code, out, err = await cli(mesh, "model", "register", "--from", str(path))
    assert code == 0, (out, err)
    assert "registered 2 of 2 models" in out
    listed = await mesh.mesh.listModels(mm.ListModelsRequest(prefix="csv-"), timeout=10)
    info = {m.modelId: m.modelInfo for m in listed.models}
    assert list(info["csv-1"].labels) == ["a", "b"] and info["csv-1"].sizeHintBytes == 20 * 2**20
    assert info["csv-2"].minCopies == 1
    assert json.loads(info["csv-2"].key) == {"storage_key": "my-s3",
                                             "storage_params": {"bucket": "models", "region": "x"}}

    stdin = b'{"id": "stdin-1", "type": "sklearn", "path": "/m/s.joblib"}\n'
    code, out, err = await cli(mesh, "model", "register", "--from", "-", stdin=stdin)
    assert code == 0 and "registered 1 of 1 models from -" in out, (out, err)
    # a line separator (U+2028) inside a JSON string is part of the line, not the end of one
    stdin = '{"id": "stdin-2", "type": "sklearn", "path": "/m/a\u2028b.joblib"}\n'.encode()
    code, out, err = await cli(mesh, "model", "register", "--from", "-", stdin=stdin)
    assert code == 0 and "registered 1 of 1 models from -" in out, (out, err)


@pytest.mark.parametrize(("content", "where", "why"), [
    ('{"id": "a", "type": "sklearn"}\n{"id": "b", "type": \n', ":2:", "not JSON"),
    ('{"id": "a", "type": "sklearn"}\n\n["x"]\n', ":3:", "must be a JSON object"),
    ('{"id": "a", "type": "sklearn", "colour": "red"}\n', ":1:", "unknown field(s) colour"),
    ('{"id": "a"}\n', ":1:", "type is required"),
    ('{"id": "a", "type": "sklearn", "min_copies": "many"}\n', ":1:", "min_copies must be a whole number"),
    ("id,type\na,sklearn\nb,sklearn,extra\n", ":3:", "3 cells; the header has 2"),
    ("id,type,colour\na,sklearn,red\n", ":1:", "unknown column(s) colour"),
    ("", "", "holds no models"),
    pytest.param('{"id": "a", "type": "sklearn"}\n' + "[" * 200_000 + "]" * 200_000 + "\n", ":2:",
                 "nested too deeply", id="a-line-nested-deep"),
])
async def test_a_malformed_file_is_exit_2_with_its_line_and_nothing_sent(
        mesh: InProcessMesh, tmp_path: Path, content: str, where: str, why: str) -> None:
    path = tmp_path / "bad.txt"
    path.write_text(content)
    code, out, err = await cli(mesh, "model", "register", "--from", str(path))
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mesh: error: ") and "Traceback" not in err
    assert f"{path}{where}" in lines[0] and why in lines[0], lines[0]
    assert await status(mesh, "a") == mm.ModelStatusInfo.NOT_FOUND  # the valid first line was not sent


async def test_usage_errors_and_all_or_nothing(mesh: InProcessMesh, tmp_path: Path) -> None:
    code, _, err = await cli(mesh, "model", "register", "--from", str(tmp_path / "missing.jsonl"))
    assert code == 2 and "mesh: error: --from" in err and "No such file" in err
    code, _, err = await cli(mesh, "model", "register", "x")
    assert code == 2 and "give MODEL_ID and --type" in err
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps({"id": f"aon-{i}", "type": "sklearn" if i < 4 else ""}) + "\n"
                            for i in range(5)).replace('"type": ""', '"type": "sklearn", "max_copies": 99'))
    code, out, _ = await cli(mesh, "model", "register", "--from", str(path), "--all-or-nothing")
    assert code == 1 and "registered 0 of 5" in out and "ABORTED" in out and "INVALID_ARGUMENT" in out
    assert await status(mesh, "aon-0") == mm.ModelStatusInfo.NOT_FOUND
    code, _, err = await cli(mesh, "model", "register", "--from", str(path), "--all-or-nothing", "--batch-size", "2")
    assert code == 2 and "--all-or-nothing needs every model in one call" in err


async def test_a_terminal_gets_a_progress_bar(mesh: InProcessMesh, tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps({"id": f"tty-{i}", "type": "sklearn"}) + "\n" for i in range(300)))
    primary, secondary = pty.openpty()
    try:
        code, out, _ = await cli(mesh, "model", "register", "--from", str(path), "--batch-size", "100",
                                 stderr_fd=secondary)
        os.close(secondary)
        secondary = -1
        shown = b""
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:
                break
            if not chunk:
                break
            shown += chunk
    finally:
        if secondary >= 0:
            os.close(secondary)
        os.close(primary)
    assert code == 0 and "registered 300 of 300" in out
    text = shown.decode()
    assert "\r[" in text and "300/300" in text and "#" * 30 in text, text
