"""The puller and its disk cache (mesh.storage.puller, mesh.storage.disk) against a real HTTP
server on 127.0.0.1 (a stdlib server in a thread of the test): one download however often a
model is loaded, atomic and bounded on disk, archives unpacked, claims read in place."""

from __future__ import annotations

import asyncio
import hashlib
import http.server
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.errors import ModelLoadError
from mesh.registry.records import ModelSpec
from mesh.settings import StorageSettings
from mesh.storage.disk import MANIFEST, DiskCache
from mesh.storage.puller import Puller
from tests.support.object_stores import tarball


class _Files(http.server.SimpleHTTPRequestHandler):
    gets: list[str] = []

    def do_GET(self) -> None:
        type(self).gets.append(self.path)
        if self.path.startswith("/redirect-"):  # /redirect-here/<file>: same origin; /redirect-away/<file>
            target = self.path.split("/", 2)[2]
            away = self.path.startswith("/redirect-away/")
            self.send_response(302)
            host = f"localhost:{self.server.server_address[1]}" if away else self.headers["Host"]
            self.send_header("Location", f"http://{host}/{target}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path.startswith("/drip/"):  # no length, a byte every 50 ms: a store that never ends
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(2000):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.05)
            except OSError:
                pass
            return
        if self.headers.get("Authorization") != "Bearer good" and self.path.startswith("/private/"):
            self.send_error(403)
            return
        super().do_GET()

    def end_headers(self) -> None:
        path = self.translate_path(self.path)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                digest = hashlib.md5(f.read()).hexdigest()
            if "corrupt" in self.path:  # the bytes are not what the store says it holds
                digest = hashlib.md5(b"something else").hexdigest()
            self.send_header("ETag", '"' + digest + '"')
        super().end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "served"
    root.mkdir()
    _Files.gets = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             lambda *a: _Files(*a, directory=str(root)))  # type: ignore[misc]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()


def _puller(tmp_path: Path, keys: dict[str, object] | None = None, **settings: object) -> Puller:
    config = tmp_path / "keys"
    config.mkdir(exist_ok=True)
    for name, value in (keys or {}).items():
        (config / name).write_text(json.dumps(value))
    puller = Puller(StorageSettings(config_dir=str(config), cache_dir=str(tmp_path / "cache"),
                                    pvc_mounts_dir=str(tmp_path / "pvc"), retries=1, **settings))  # type: ignore[arg-type]
    puller.start()
    return puller


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _spec(path: str, key: dict[str, object] | None = None, model_id: str = "m") -> ModelSpec:
    return ModelSpec(model_id=model_id, type="sklearn", path=path, key=json.dumps(key or {}), registered_ms=1)


async def test_one_download_then_the_disk(tmp_path: Path, served: tuple[str, Path]) -> None:
    url, root = served
    (root / "m.joblib").write_bytes(b"model-bytes" * 1000)
    puller = _puller(tmp_path, {"web": {"type": "http", "url": url}})
    spec = _spec("m.joblib", {"storage_key": "web"})
    first = await puller.pull(spec)
    assert first is not None and not first.from_disk and first.downloaded_bytes == 11000
    assert _read(first.path) == b"model-bytes" * 1000
    puller.done(first)
    again = await puller.pull(spec)
    assert again is not None and again.from_disk and again.path == first.path
    assert _Files.gets == ["/m.joblib"]
    # 100 loads asking at once for a new registration of it: one download.
    _Files.gets = []
    many = await asyncio.gather(*(puller.pull(_spec("m.joblib", {"storage_key": "web"}, model_id="n"))
                                  for _ in range(100)))
    assert len({p.path for p in many if p}) == 1 and _Files.gets == ["/m.joblib"]


async def test_local_registrations_pass_and_may_not_name_the_cache(tmp_path: Path, served: tuple[str, Path]) -> None:
    puller = _puller(tmp_path)
    assert await puller.pull(_spec("/anywhere/m.joblib")) is None
    with pytest.raises(ModelLoadError, match="storage folders"):
        await puller.pull(_spec(str(tmp_path / "cache" / "0" / "x" / "m.joblib")))
    with pytest.raises(ModelLoadError, match="storage folders"):
        await puller.pull(_spec("file://" + str(tmp_path / "pvc" / "claim" / "m.joblib")))


async def test_errors_name_the_key_and_path_never_the_secret(tmp_path: Path, served: tuple[str, Path]) -> None:
    url, root = served
    (root / "private").mkdir()
    (root / "private" / "m.joblib").write_bytes(b"x")
    puller = _puller(tmp_path, {"bad": {"type": "http", "url": url, "headers": {"Authorization": "Bearer s3cr3t"}},
                                "good": {"type": "http", "url": url, "headers": {"Authorization": "Bearer good"}}})
    cases = [({"storage_key": "bad"}, "private/m.joblib", "access denied: 'private/m.joblib'.*'bad'"),
             ({"storage_key": "good"}, "private/none.joblib", "object not found: 'private/none.joblib'"),
             ({"storage_key": "absent"}, "m.joblib", "storage key 'absent' is not configured"),
             ({"storage_key": "good", "storage_params": {"url": "http://127.0.0.1:9"}}, "m.joblib",
              "may not change storage key 'good'"),
             ({}, "http://127.0.0.1:9/m.joblib", "unreachable after 1 retries")]
    for key, path, message in cases:
        with pytest.raises(ModelLoadError, match=message) as caught:
            await puller.pull(_spec(path, key))
        assert "s3cr3t" not in caught.value.message and "good" not in caught.value.message.split("'good'")[-1]
    assert await puller.pull(_spec("private/m.joblib", {"storage_key": "good"})) is not None
    assert not [p for p in (tmp_path / "cache" / "0").iterdir() if p.name.startswith(".partial")]


async def test_archives_unpack_into_a_folder(tmp_path: Path, served: tuple[str, Path]) -> None:
    url, root = served
    (root / "bundle.tar.gz").write_bytes(tarball({"model/1/model.onnx": b"onnx", "model/config.pbtxt": b"cfg"}))
    puller = _puller(tmp_path)
    pulled = await puller.pull(_spec(f"{url}/bundle.tar.gz"))
    assert pulled is not None and pulled.path.endswith("/bundle")
    assert (Path(pulled.path) / "model" / "1" / "model.onnx").read_bytes() == b"onnx"
    assert not (Path(pulled.path).parent / "bundle.tar.gz").exists()
    (root / "broken.zip").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ModelLoadError, match="corrupt"):
        await puller.pull(_spec(f"{url}/broken.zip"))


async def test_claims_are_read_in_place_and_confined(tmp_path: Path) -> None:
    claim = tmp_path / "pvc" / "claim-a"
    (claim / "dir").mkdir(parents=True)
    (claim / "dir" / "m.joblib").write_bytes(b"x")
    (claim / "escape").symlink_to("/etc")
    puller = _puller(tmp_path)
    pulled = await puller.pull(_spec("pvc://claim-a/dir/m.joblib"))
    assert pulled is not None and pulled.path == str(claim / "dir" / "m.joblib") and pulled.type == "pvc"
    with pytest.raises(ModelLoadError, match="outside claim 'claim-a'"):
        await puller.pull(_spec("pvc://claim-a/escape/passwd"))
    with pytest.raises(ModelLoadError, match="claim 'claim-b' is not mounted"):
        await puller.pull(_spec("pvc://claim-b/m.joblib"))


def test_the_disk_cache_is_bounded_least_recently_used_and_cleans_interrupted_pulls(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path / "c", max_bytes=100)
    cache.start()
    for digest, size in (("a", 40), ("b", 40)):
        cache.reserve(size, digest)
        partial = cache.partial(digest)
        (partial / "f").write_bytes(b"x" * size)
        cache.commit(partial, digest, {"model_path": "f"}, size)
        cache.release(size)
        cache.unpin(digest)
    assert cache.lookup("a") is not None  # a is now the most recent, and pinned
    cache.reserve(40, "c")  # b goes; a is in use
    assert not (cache.root / "b").exists() and (cache.root / "a").exists()
    with pytest.raises(ModelLoadError, match=r"storage\.cache_bytes"):
        cache.reserve(101, "too big")
    with pytest.raises(ModelLoadError, match="disk cache is full"):
        cache.reserve(30, "no room while a is pinned")
    cache.release(40)
    # A second runtime on the same folder gets a slot of its own; nothing of the first is touched.
    other = DiskCache(tmp_path / "c", max_bytes=100)
    other.start()
    assert other.root == tmp_path / "c" / "1" and other.lookup("a") is None
    # A runtime killed mid-pull: the partial folder goes at the next start, the entries stay.
    leftover = cache.partial("d")
    (leftover / "half").write_bytes(b"x")
    (cache.root / "junk").mkdir()
    cache.close()
    again = DiskCache(tmp_path / "c", max_bytes=100)
    again.start()
    assert again.root == cache.root and not leftover.exists() and not (cache.root / "junk").exists()
    assert again.lookup("a") is not None and (cache.root / "a" / MANIFEST).exists()
    assert oct((tmp_path / "c").stat().st_mode & 0o777) == "0o700"
    other.close()
    again.close()


async def test_an_unreachable_s3_endpoint_fails_after_bounded_retries(tmp_path: Path) -> None:
    import socket

    # A port bound but not listening: connections are refused, and no other process can take the
    # port meanwhile (a port merely found free once can be, by a server another test starts).
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        key = {"type": "s3", "access_key_id": "AKIAEXAMPLE", "secret_access_key": "s3cr3t-value",
               "endpoint_url": f"http://127.0.0.1:{port}", "region": "us-east-1", "default_bucket": "models"}
        puller = _puller(tmp_path, {"s3": key})
        with pytest.raises(ModelLoadError, match="unreachable after 1 retries") as caught:
            await puller.pull(_spec("m.joblib", {"storage_key": "s3"}))
    assert f"s3 bucket 'models' at http://127.0.0.1:{port}" in caught.value.message
    assert "s3cr3t" not in caught.value.message and "AKIAEXAMPLE" not in caught.value.message


async def test_a_checksum_mismatch_fails_the_load_and_deletes_the_files(tmp_path: Path,
                                                                        served: tuple[str, Path]) -> None:
    url, root = served
    (root / "corrupt.joblib").write_bytes(b"model-bytes")
    (root / "good.joblib").write_bytes(b"model-bytes")
    puller = _puller(tmp_path)
    good = await puller.pull(_spec(f"{url}/good.joblib"))
    await puller.verified(good)  # the ETag is the bytes' MD5: nothing to say
    corrupt = await puller.pull(_spec(f"{url}/corrupt.joblib", model_id="c"))
    assert corrupt is not None
    with pytest.raises(ModelLoadError, match="does not match its ETag"):
        await puller.verified(corrupt)
    assert puller.disk.lookup(corrupt.digest) is None
    with pytest.raises(FileNotFoundError):
        _read(corrupt.path)
    puller.close()


def test_entries_whose_checksums_were_never_compared_are_removed_at_start(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path / "c", max_bytes=100)
    cache.start()
    for digest, verified in (("checked", True), ("unchecked", False)):
        partial = cache.partial(digest)
        (partial / "f").write_bytes(b"x")
        cache.commit(partial, digest, {"model_path": "f"}, 1, verified=verified)
    cache.mark_verified("late")  # an entry that is gone: nothing happens
    cache.close()
    again = DiskCache(tmp_path / "c", max_bytes=100)
    again.start()
    assert again.lookup("checked") is not None and again.lookup("unchecked") is None
    assert not (again.root / "unchecked").exists()
    again.close()


async def test_redirects_stay_on_the_keys_origin(tmp_path: Path, served: tuple[str, Path]) -> None:
    url, root = served
    (root / "m.joblib").write_bytes(b"model-bytes")
    puller = _puller(tmp_path, {"web": {"type": "http", "url": url, "headers": {"Authorization": "Bearer good"}}})
    here = await puller.pull(_spec("redirect-here/m.joblib", {"storage_key": "web"}))
    assert here is not None and _read(here.path) == b"model-bytes"
    _Files.gets = []
    with pytest.raises(ModelLoadError, match="redirected to another host or scheme"):
        await puller.pull(_spec("redirect-away/m.joblib", {"storage_key": "web"}, model_id="away"))
    assert _Files.gets == ["/redirect-away/m.joblib"]  # the key's header never went to the other host
    puller.close()


async def test_a_pull_past_its_loads_deadline_stops(tmp_path: Path, served: tuple[str, Path]) -> None:
    url, _ = served
    puller = _puller(tmp_path)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(puller.pull(_spec(f"{url}/drip/m.joblib")), 0.5)
    deadline = time.monotonic() + 5
    while puller._flights or any(p.name.startswith(".partial") for p in _entries(puller.disk.root)):
        assert time.monotonic() < deadline, "the abandoned pull kept going"
        await asyncio.sleep(0.05)
    puller.close()


def _entries(folder: Path) -> list[Path]:
    return list(folder.iterdir())


async def test_links_in_a_claim_or_a_local_folder_may_not_lead_to_other_claims_or_pulls(tmp_path: Path) -> None:
    pvc = tmp_path / "pvc"
    for team in ("team-a", "team-b"):
        (pvc / team / "m").mkdir(parents=True)
        (pvc / team / "m" / "own.joblib").write_bytes(team.encode())
    (pvc / "team-a" / "m" / "model.joblib").symlink_to(pvc / "team-b" / "m" / "own.joblib")
    (pvc / "team-a" / "inner").mkdir()
    (pvc / "team-a" / "inner" / "model.joblib").symlink_to(pvc / "team-a" / "m" / "own.joblib")  # stays inside
    local = tmp_path / "models" / "team-a"
    local.mkdir(parents=True)
    (local / "model.joblib").symlink_to(pvc / "team-b" / "m" / "own.joblib")
    puller = _puller(tmp_path)
    with pytest.raises(ModelLoadError, match="in claim 'team-a' holds a link out of the claim"):
        await puller.pull(_spec("pvc://team-a/m"))
    assert await puller.pull(_spec("pvc://team-a/inner")) is not None
    with pytest.raises(ModelLoadError, match="holds a link into the runtime's storage folders"):
        await puller.pull(_spec(str(local)))
    puller.close()


async def test_unknown_sizes_share_the_disk_bound(tmp_path: Path, served: tuple[str, Path]) -> None:
    url, root = served
    for i in range(4):
        (root / f"m{i}.joblib").write_bytes(os.urandom(600_000))
    puller = _puller(tmp_path, cache_bytes=1_000_000)  # room for one, not two
    results = await asyncio.gather(*(puller.pull(_spec(f"{url}/m{i}.joblib", model_id=f"m{i}")) for i in range(4)),
                                   return_exceptions=True)
    done = [r for r in results if not isinstance(r, BaseException)]
    assert done and all(isinstance(r, ModelLoadError) for r in results if isinstance(r, BaseException))
    assert puller.disk.used_bytes <= 1_000_000
    puller.close()


def test_a_cache_folder_of_another_user_is_refused(tmp_path: Path) -> None:
    from mesh.errors import InvalidArgument

    folder = tmp_path / "shared"
    folder.mkdir()
    os.chown(folder, 1, 1)  # what another user made first (the tests run as root)
    with pytest.raises(InvalidArgument, match="belongs to another user"):
        DiskCache(folder, max_bytes=100).start()


async def test_a_urls_password_never_shows(tmp_path: Path) -> None:
    puller = _puller(tmp_path, {"web": {"type": "http", "url": "http://svc:Pa55w0rd@127.0.0.1:9"}})
    with pytest.raises(ModelLoadError) as caught:
        await puller.pull(_spec("m.joblib", {"storage_key": "web"}))
    assert "Pa55w0rd" not in caught.value.message and "http://127.0.0.1:9" in caught.value.message
    puller.close()
