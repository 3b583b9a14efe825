"""Unpacking model archives: real zip, tar and tar.gz files built here, hostile ones crafted by hand
(names, links, special files, bombs, lying headers, broken bytes), and the exact outcome: good ones
byte-identical with fixed modes, hostile ones refused with a one-line reason and nothing written
outside the destination (which is left empty)."""

from __future__ import annotations

import gzip
import io
import os
import stat
import tarfile
import warnings
import zipfile
from pathlib import Path

import pytest

from mesh.errors import ModelLoadError
from mesh.storage import archives
from mesh.storage.archives import CHUNK, archive_kind, unpack

MIB = 1024 * 1024
PAYLOAD = bytes(range(256)) * 40  # 10 KiB, no run of zeros: a misplaced tar header in it is invalid


def make_zip(path: Path, entries: list[tuple[str | zipfile.ZipInfo, bytes]],
             method: int = zipfile.ZIP_DEFLATED) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile warns about the duplicates made on purpose
        with zipfile.ZipFile(path, "w", method) as zipped:
            for info, data in entries:
                zipped.writestr(info, data)
    return path


def make_tar(path: Path, entries: list[tuple[str | tarfile.TarInfo, bytes | None]],
             fmt: int = tarfile.PAX_FORMAT) -> Path:
    """A .tar, or a .tar.gz/.tgz by its name; a str entry is a regular file (data None: no data)."""
    gzipped = path.name.endswith("gz")
    with (tarfile.open(path, "w:gz", format=fmt) if gzipped else tarfile.open(path, "w", format=fmt)) as tar:
        for info, data in entries:
            member = tarfile.TarInfo(info) if isinstance(info, str) else info
            if data is None:
                tar.addfile(member)
            else:
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    return path


def make(kind: str, path_stem: Path, files: list[tuple[str, bytes]]) -> Path:
    """Regular files only, as a zip or a tar.gz: for the rules that are the same for both."""
    if kind == "zip":
        return make_zip(path_stem.with_name(path_stem.name + ".zip"), list(files))
    return make_tar(path_stem.with_name(path_stem.name + ".tar.gz"), list(files))


def member(name: str, kind: bytes, linkname: str = "", mode: int = 0o644) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, linkname, mode
    return info


def tree(dest: Path) -> dict[str, tuple[str, int, bytes | None]]:
    """Everything under dest: relative path -> (kind, permission bits, content of a file)."""
    found: dict[str, tuple[str, int, bytes | None]] = {}
    for path in sorted(dest.rglob("*")):
        st = path.lstat()
        kind = "dir" if stat.S_ISDIR(st.st_mode) else "file" if stat.S_ISREG(st.st_mode) else "other"
        found[path.relative_to(dest).as_posix()] = (kind, stat.S_IMODE(st.st_mode),
                                                    path.read_bytes() if kind == "file" else None)
    return found


def unpacked(archive: Path, max_bytes: int = 100 * MIB, max_files: int = 100) -> tuple[Path, int]:
    dest = archive.parent / "dest"
    dest.mkdir()
    return dest, unpack(archive, dest, max_bytes=max_bytes, max_files=max_files)


def refused(archive: Path, fragment: str, max_bytes: int = 100 * MIB, max_files: int = 100) -> str:
    """unpack refuses ``archive``: one line naming the archive's file name (not its path) and holding
    ``fragment``; the destination is left empty and nothing appears beside it."""
    around = archive.parent
    before = {p.name for p in around.iterdir()}
    dest = around / "dest"
    dest.mkdir()
    with pytest.raises(ModelLoadError) as caught:
        unpack(archive, dest, max_bytes=max_bytes, max_files=max_files)
    message = caught.value.message
    assert fragment in message
    assert message.startswith(f"archive {archive.name!r} ")
    assert "\n" not in message and str(archive) not in message
    assert list(dest.iterdir()) == []
    assert {p.name for p in around.iterdir()} == before | {"dest"}
    return message


# -- archive_kind ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "kind"), [
    ("model.zip", "zip"), ("MODEL.ZIP", "zip"), ("m.tar.gz", "tar.gz"), ("m.TGZ", "tar.gz"),
    ("m.Tar.Gz", "tar.gz"), ("m.tar", "tar"), ("m.gz", None), ("m.tar.bz2", None), ("model.onnx", None),
    ("zip", None), ("m.zip.part", None)])
def test_archive_kind_by_suffix(name: str, kind: str | None) -> None:
    assert archive_kind(name) == kind


def test_a_file_that_is_not_named_as_an_archive_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model.bin").write_bytes(b"weights")
    refused(tmp_path / "model.bin", "is not a .zip, .tar.gz, .tgz or .tar file")


def test_the_destination_must_be_empty(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "m.zip", [("a.txt", b"a")])
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "left.txt").write_text("from before")
    with pytest.raises(ValueError, match="empty directory"):
        unpack(archive, dest, max_bytes=MIB, max_files=10)
    assert (dest / "left.txt").read_text() == "from before"


# -- good archives --------------------------------------------------------------------------------------


def test_a_zip_unpacks_byte_identical_with_fixed_modes(tmp_path: Path) -> None:
    setuid = zipfile.ZipInfo("model/bin/run.sh")
    setuid.external_attr = (stat.S_IFREG | 0o4777) << 16
    private_dir = zipfile.ZipInfo("model/private/")
    private_dir.external_attr = (stat.S_IFDIR | 0o700) << 16
    stored = zipfile.ZipInfo("model/stored.bin")
    stored.compress_type = zipfile.ZIP_STORED
    archive = make_zip(tmp_path / "m.zip", [
        ("model/weights.bin", PAYLOAD * 30), (setuid, b"#!/bin/sh\n"), (private_dir, b""), (stored, PAYLOAD),
        ("model/empty.txt", b""), ("model/deep/er/config.json", b"{}"),
        ("model/deep/", b"")])  # a directory listed after an entry inside it
    old = os.umask(0o077)  # what is written does not depend on the umask
    try:
        dest, written = unpacked(archive)
    finally:
        os.umask(old)
    assert tree(dest) == {
        "model": ("dir", 0o755, None),  # the single top-level directory is kept
        "model/bin": ("dir", 0o755, None),
        "model/bin/run.sh": ("file", 0o644, b"#!/bin/sh\n"),
        "model/deep": ("dir", 0o755, None),
        "model/deep/er": ("dir", 0o755, None),
        "model/deep/er/config.json": ("file", 0o644, b"{}"),
        "model/empty.txt": ("file", 0o644, b""),
        "model/private": ("dir", 0o755, None),
        "model/stored.bin": ("file", 0o644, PAYLOAD),
        "model/weights.bin": ("file", 0o644, PAYLOAD * 30),
    }
    assert written == len(PAYLOAD) * 31 + 10 + 2


@pytest.mark.parametrize(("name", "fmt"), [("m.tar.gz", tarfile.PAX_FORMAT), ("m.tgz", tarfile.GNU_FORMAT),
                                           ("m.tar", tarfile.USTAR_FORMAT), ("m.TAR", tarfile.PAX_FORMAT)])
def test_a_tar_unpacks_byte_identical_with_fixed_modes(tmp_path: Path, name: str, fmt: int) -> None:
    long_name = "./" + "/".join(["d" * 40] * 3) + "/w.bin"  # over 100 characters: a pax or GNU long name
    entries: list[tuple[str | tarfile.TarInfo, bytes | None]] = [
        (member("./", tarfile.DIRTYPE, mode=0o700), None),  # tar -C dir . starts with the folder itself
        (member("./top/", tarfile.DIRTYPE, mode=0o700), None),
        (member("./top/run.sh", tarfile.REGTYPE, mode=0o6777), b"#!/bin/sh\n"),
        ("top/sub/weights.bin", PAYLOAD * 300),  # 3 MB: several chunks of the copy
        ("top/empty", b""),
        (member("top/sub", tarfile.DIRTYPE, mode=0o777), None),  # after an entry inside it
    ]
    if fmt != tarfile.USTAR_FORMAT:
        entries.append((long_name, b"long"))
    owned = member("top/owned.txt", tarfile.REGTYPE)
    owned.uid, owned.gid, owned.uname, owned.gname = 0, 0, "root", "root"
    entries.append((owned, b"mine"))
    dest, written = unpacked(make_tar(tmp_path / name, entries, fmt))
    expected = {
        "top": ("dir", 0o755, None),
        "top/empty": ("file", 0o644, b""),
        "top/owned.txt": ("file", 0o644, b"mine"),
        "top/run.sh": ("file", 0o644, b"#!/bin/sh\n"),
        "top/sub": ("dir", 0o755, None),
        "top/sub/weights.bin": ("file", 0o644, PAYLOAD * 300),
    }
    if fmt != tarfile.USTAR_FORMAT:
        expected |= {"/".join(["d" * 40] * (i + 1)): ("dir", 0o755, None) for i in range(3)}
        expected[long_name[2:]] = ("file", 0o644, b"long")
    assert tree(dest) == expected
    assert written == sum(len(content or b"") for _, _, content in expected.values())
    assert (dest / "top/owned.txt").stat().st_uid == os.getuid()


def test_backslashes_are_separators(tmp_path: Path) -> None:
    dest, _ = unpacked(make_zip(tmp_path / "m.zip", [("model\\sub\\w.bin", b"w"), ("model\\sub\\", b"")]))
    assert tree(dest) == {"model": ("dir", 0o755, None), "model/sub": ("dir", 0o755, None),
                          "model/sub/w.bin": ("file", 0o644, b"w")}


# -- names that would land outside the folder -------------------------------------------------------------


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
@pytest.mark.parametrize(("name", "fragment"), [
    ("../evil", "has a '..' component"),
    ("model/../../evil", "has a '..' component"),
    ("model/..", "has a '..' component"),
    ("..\\evil", "has a '..' component"),
    ("model\\..\\..\\evil", "has a '..' component"),
    ("{root}/abs-evil", "is an absolute path"),
    ("\\abs-evil", "is an absolute path"),
    ("\\\\server\\share\\evil", "is an absolute path"),
    ("C:/evil", "names a drive"),
    ("c:\\evil", "names a drive"),
    ("C:evil", "names a drive"),
])
def test_names_outside_the_folder_are_refused(tmp_path: Path, kind: str, name: str, fragment: str) -> None:
    name = name.format(root=tmp_path)
    archive = make(kind, tmp_path / "m", [("model/fine.bin", b"fine"), (name, b"evil")])
    refused(archive, f"refused: entry {name!r} {fragment}")  # after model/fine.bin was written: removed
    assert not (tmp_path.parent / "evil").exists() and not (tmp_path / "abs-evil").exists()


def test_a_nul_byte_in_a_zip_name_is_refused(tmp_path: Path) -> None:
    # zipfile cuts ZipInfo.filename at a NUL (orig_filename keeps it): crafted by patching the bytes.
    good = make_zip(tmp_path / "good.zip", [("aXb.bin", b"x")]).read_bytes()
    (tmp_path / "good.zip").unlink()
    archive = tmp_path / "m.zip"
    archive.write_bytes(good.replace(b"aXb.bin", b"a\0b.bin"))
    refused(archive, "refused: entry 'a\\x00b.bin' has a NUL byte in its name")


def test_a_nul_byte_in_a_tar_name_is_refused(tmp_path: Path) -> None:
    info = tarfile.TarInfo("ab.bin")
    info.pax_headers = {"path": "a\0b.bin"}  # a ustar name stops at NUL, a pax path does not
    refused(make_tar(tmp_path / "m.tar", [(info, b"x")]), "entry 'a\\x00b.bin' has a NUL byte in its name")


def test_an_empty_name_is_refused(tmp_path: Path) -> None:
    refused(make_tar(tmp_path / "m.tar", [("./", b"x")]), "entry './' has an empty name")


def test_long_names_are_cut_in_messages(tmp_path: Path) -> None:
    name = "x" * 300 + "/../evil"
    message = refused(make_tar(tmp_path / "m.tgz", [(name, b"x")]), f"entry {'x' * 200!r} has a '..' component")
    assert "x" * 201 not in message


# -- links and special files ------------------------------------------------------------------------------

LINKS = "links are not allowed in model archives"
ONLY = "only regular files and directories are allowed in model archives"


def test_a_symlink_out_of_the_folder_is_refused(tmp_path: Path) -> None:
    archive = make_tar(tmp_path / "m.tar.gz", [("model/fine.bin", b"fine"),
                                                (member("model/passwd", tarfile.SYMTYPE, "/etc/passwd"), None)])
    refused(archive, f"entry 'model/passwd' is a symbolic link (to '/etc/passwd'): {LINKS}")


def test_a_symlink_then_a_file_through_it_writes_nothing_outside(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    archive = make_tar(tmp_path / "m.tar", [(member("link", tarfile.SYMTYPE, str(outside)), None),
                                             ("link/pwned", b"pwned")])
    refused(archive, f"entry 'link' is a symbolic link (to {str(outside)!r}): {LINKS}")
    assert list(outside.iterdir()) == []


def test_a_symlink_inside_the_folder_is_refused_too(tmp_path: Path) -> None:
    # tarfile's "data" filter allows this one; we do not.
    link = member("model/alias.bin", tarfile.SYMTYPE, "weights.bin")
    assert tarfile.data_filter(link, str(tmp_path)) is not None
    archive = make_tar(tmp_path / "m.tgz", [("model/weights.bin", b"w"), (link, None)])
    refused(archive, f"entry 'model/alias.bin' is a symbolic link (to 'weights.bin'): {LINKS}")


def test_a_hard_link_is_refused(tmp_path: Path) -> None:
    archive = make_tar(tmp_path / "m.tar", [("model/weights.bin", b"w"),
                                             (member("model/hard", tarfile.LNKTYPE, "model/weights.bin"), None)])
    refused(archive, f"entry 'model/hard' is a hard link (to 'model/weights.bin'): {LINKS}")


def test_a_zip_symlink_is_refused(tmp_path: Path) -> None:
    link = zipfile.ZipInfo("model/passwd")
    link.create_system = 3
    link.external_attr = (stat.S_IFLNK | 0o777) << 16  # as Info-ZIP stores one: the target is the data
    archive = make_zip(tmp_path / "m.zip", [("model/fine.bin", b"fine"), (link, b"/etc/passwd")])
    refused(archive, f"entry 'model/passwd' is a symbolic link: {LINKS}")


@pytest.mark.parametrize(("kind", "what"), [(tarfile.FIFOTYPE, "FIFO"), (tarfile.CHRTYPE, "character device"),
                                            (tarfile.BLKTYPE, "block device")])
def test_special_tar_entries_are_refused(tmp_path: Path, kind: bytes, what: str) -> None:
    archive = make_tar(tmp_path / "m.tar.gz", [("model/fine.bin", b"fine"), (member("model/dev", kind), None)])
    refused(archive, f"entry 'model/dev' is a {what}: {ONLY}")


def test_a_zip_fifo_is_refused(tmp_path: Path) -> None:
    fifo = zipfile.ZipInfo("model/fifo")
    fifo.external_attr = (stat.S_IFIFO | 0o644) << 16
    refused(make_zip(tmp_path / "m.zip", [(fifo, b"")]), f"entry 'model/fifo' is a FIFO: {ONLY}")


# -- duplicates and clashes -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
@pytest.mark.parametrize(("names", "fragment"), [
    (["model/w.bin", "model/w.bin"], "entry 'model/w.bin' appears twice"),
    (["model/w.bin", "./model//w.bin"], "entry './model//w.bin' appears twice"),
    (["model/w.bin", "model\\w.bin"], "entry 'model\\\\w.bin' appears twice"),
    (["model/w.bin", "model/w.bin/x"], "entry 'model/w.bin/x' is inside 'model/w.bin', which is a file"),
    (["model/sub/x", "model/sub"], "entry 'model/sub' is a file, but other entries are inside it"),
])
def test_duplicates_and_clashes_are_refused(tmp_path: Path, kind: str, names: list[str], fragment: str) -> None:
    refused(make(kind, tmp_path / "m", [(name, b"data") for name in names]), fragment)


def test_a_directory_named_twice_is_refused(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "m.zip", [("model/", b""), ("model/w.bin", b"w"), ("model/", b"")])
    refused(archive, "entry 'model/' appears twice")


def test_a_directory_and_a_file_of_the_same_name_are_refused(tmp_path: Path) -> None:
    archive = make_tar(tmp_path / "m.tar", [(member("model", tarfile.DIRTYPE, mode=0o755), None), ("model", b"x")])
    refused(archive, "entry 'model' appears twice")


# -- bounds -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zip_bomb() -> bytes:
    """One entry of 200 MB of zeros, deflated to about 200 KB; its header tells the truth."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zipped, zipped.open("zeros.bin", "w") as entry:
        zeros = bytes(MIB)
        for _ in range(200):
            entry.write(zeros)
    assert len(buffer.getvalue()) < MIB
    return buffer.getvalue()


@pytest.fixture
def keep_partial(monkeypatch: pytest.MonkeyPatch) -> None:
    """unpack empties the destination after a failure; kept here, to see what was on disk when it stopped."""
    monkeypatch.setattr(archives, "_empty", lambda dest: None)


def on_disk(dest: Path) -> int:
    return sum(path.stat().st_size for path in dest.rglob("*") if path.is_file())


def test_a_zip_bomb_is_refused_before_it_is_written(tmp_path: Path, zip_bomb: bytes, keep_partial: None) -> None:
    archive = tmp_path / "bomb.zip"
    archive.write_bytes(zip_bomb)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(ModelLoadError, match=r"^archive 'bomb\.zip' unpacks to more than 1048576 bytes "
                                             r"\(storage\.cache_bytes\); refused at entry 'zeros.bin'$"):
        unpack(archive, dest, max_bytes=MIB, max_files=10)
    assert on_disk(dest) == 0  # the header's size refused it: nothing decompressed


def test_a_zip_bomb_whose_header_lies_stops_at_the_header(tmp_path: Path, zip_bomb: bytes,
                                                          keep_partial: None) -> None:
    # The central directory says 2 MiB: zipfile hands over 2 MiB, then the CRC (of 200 MB) fails.
    data = bytearray(zip_bomb)
    central = data.rfind(b"PK\x01\x02")
    data[central + 24:central + 28] = (2 * MIB).to_bytes(4, "little")
    archive = tmp_path / "bomb.zip"
    archive.write_bytes(bytes(data))
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(ModelLoadError, match=r"^archive 'bomb\.zip' is corrupt at entry 'zeros\.bin': Bad CRC-32"):
        unpack(archive, dest, max_bytes=4 * MIB, max_files=10)
    assert on_disk(dest) <= 2 * MIB


def test_a_zip_entry_shorter_than_its_header_is_corrupt(tmp_path: Path) -> None:
    data = bytearray(make_zip(tmp_path / "good.zip", [("w.bin", PAYLOAD)]).read_bytes())
    (tmp_path / "good.zip").unlink()
    central = data.rfind(b"PK\x01\x02")
    data[central + 24:central + 28] = (len(PAYLOAD) * 2).to_bytes(4, "little")
    archive = tmp_path / "m.zip"
    archive.write_bytes(bytes(data))
    refused(archive, f"is corrupt at entry 'w.bin': it holds {len(PAYLOAD)} bytes, its header says "
                     f"{len(PAYLOAD) * 2}")


def test_sizes_are_counted_as_written_not_taken_from_headers(tmp_path: Path) -> None:
    # zipfile and tarfile never hand over more than a header says, so the count that stops a lying
    # stream is fed one directly: a "decompressor" that never ends, under a header that says 10 bytes.
    class Endless:
        reads = 0

        def read(self, size: int, /) -> bytes:
            self.reads += 1
            return bytes(size)

    dest = tmp_path / "dest"
    dest.mkdir()
    unpacker = archives._Unpacker(tmp_path / "m.zip", dest, max_bytes=3 * CHUNK + 10, max_files=10)
    unpacker.entry = "w.bin"
    source = Endless()
    with pytest.raises(ModelLoadError, match=rf"unpacks to more than {3 * CHUNK + 10} bytes"):
        unpacker.write(dest / "w.bin", source, declared=10)
    assert source.reads == 4  # the fourth chunk would pass the bound: read, never written
    assert (dest / "w.bin").stat().st_size == 3 * CHUNK == unpacker.written


def test_a_tar_gz_bomb_is_refused_before_it_is_written(tmp_path: Path, keep_partial: None) -> None:
    info = tarfile.TarInfo("model/zeros.bin")
    info.size = 100 * MIB
    with tarfile.open(tmp_path / "bomb.tar.gz", "w:gz", compresslevel=1) as tar:
        tar.addfile(info, io.BufferedReader(io.BytesIO(bytes(info.size))))
    assert (tmp_path / "bomb.tar.gz").stat().st_size < 2 * MIB
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(ModelLoadError, match=r"unpacks to more than 1048576 bytes \(storage\.cache_bytes\); refused at "
                                             r"entry 'model/zeros.bin'$"):
        unpack(tmp_path / "bomb.tar.gz", dest, max_bytes=MIB, max_files=10)
    assert on_disk(dest) == 0


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_the_size_bound_is_the_total_and_stops_at_the_entry_that_passes_it(tmp_path: Path, kind: str,
                                                                           keep_partial: None) -> None:
    archive = make(kind, tmp_path / "m", [(f"model/{i}.bin", PAYLOAD * 30) for i in range(6)])  # 300 KiB each
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(ModelLoadError, match=r"unpacks to more than 1000000 bytes \(storage\.cache_bytes\); refused at "
                                             r"entry 'model/3.bin'$"):
        unpack(archive, dest, max_bytes=1_000_000, max_files=100)
    assert sorted(p.name for p in (dest / "model").iterdir()) == ["0.bin", "1.bin", "2.bin"]
    assert on_disk(dest) == 3 * len(PAYLOAD) * 30 <= 1_000_000


def test_exactly_max_bytes_is_allowed(tmp_path: Path) -> None:
    _, written = unpacked(make_zip(tmp_path / "m.zip", [("a", PAYLOAD), ("b", PAYLOAD)]), max_bytes=2 * len(PAYLOAD))
    assert written == 2 * len(PAYLOAD)


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_too_many_entries_are_refused(tmp_path: Path, kind: str) -> None:
    files = [(f"model/{i}.txt", b"x") for i in range(10)]
    ok = make(kind, tmp_path / "ok", files)
    dest, _ = unpacked(ok, max_files=10)  # exactly ten: the directory made for them is not an entry
    assert len(list((dest / "model").iterdir())) == 10
    many = make(kind, tmp_path / "many", [*files, ("model/10.txt", b"x")])
    (tmp_path / "dest").rename(tmp_path / "first")
    refused(many, "has more than 10 entries (storage.max_files); refused at entry 'model/10.txt'", max_files=10)


def test_a_zip_directory_too_large_for_max_files_is_refused(tmp_path: Path) -> None:
    # Measured before zipfile makes an object per entry: comments of 60 KB make two entries 120 KB.
    entries: list[tuple[str | zipfile.ZipInfo, bytes]] = []
    for name in ("a", "b"):
        info = zipfile.ZipInfo(name)
        info.comment = b"c" * 60_000
        entries.append((info, b"x"))
    refused(make_zip(tmp_path / "m.zip", entries), "has a zip directory of 120", max_files=10)


def test_a_tar_header_too_large_is_refused(tmp_path: Path) -> None:
    info = tarfile.TarInfo("model/w.bin")
    info.pax_headers = {"comment": "c" * 100_000}  # tarfile would read and keep it whole
    refused(make_tar(tmp_path / "m.tar.gz", [("model/a.bin", b"a"), (info, b"w")]),
            "has a tar header of 100352 bytes after entry 'model/a.bin': more than 65536")


def test_tar_headers_beyond_their_budget_are_refused(tmp_path: Path) -> None:
    # Twenty global pax headers of 60 KB each before the one file: each read is allowed, together they
    # pass the budget for two entries (1 MiB + 8 KiB an entry).
    header = tarfile.TarInfo.create_pax_global_header({"comment": "c" * 60_000})
    body = make_tar(tmp_path / "body.tar", [("w.bin", b"w")], tarfile.GNU_FORMAT).read_bytes()
    (tmp_path / "body.tar").unlink()
    archive = tmp_path / "m.tar.gz"
    archive.write_bytes(gzip.compress(header * 20 + body))
    refused(archive, f"has tar headers of more than {1024 * 1024 + 2 * 8 * 1024} bytes", max_files=2)


# -- corrupt archives -------------------------------------------------------------------------------------


def tar_header_size(data: bytearray, at: int, size: int) -> None:
    """Set the size field of the ustar header at ``at`` and its checksum."""
    data[at + 124:at + 136] = b"%011o\0" % size
    data[at + 148:at + 156] = b" " * 8
    data[at + 148:at + 156] = b"%06o\0 " % sum(data[at:at + 512])


def test_a_tar_header_that_says_less_than_its_data_is_corrupt(tmp_path: Path, keep_partial: None) -> None:
    # The next header is then read from inside the data: tarfile takes that for the end of the archive
    # and would return the model without its last files.
    data = bytearray(make_tar(tmp_path / "t.tar", [("w.bin", PAYLOAD), ("last.bin", b"last")],
                              tarfile.GNU_FORMAT).read_bytes())
    (tmp_path / "t.tar").unlink()
    tar_header_size(data, 0, 100)
    archive = tmp_path / "m.tar.gz"
    archive.write_bytes(gzip.compress(bytes(data)))
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(ModelLoadError, match=r"^archive 'm\.tar\.gz' is corrupt: a broken tar header after the "
                                             r"last entry read"):
        unpack(archive, dest, max_bytes=MIB, max_files=10)
    assert on_disk(dest) == 100


def test_a_tar_header_that_says_more_than_its_data_is_corrupt(tmp_path: Path) -> None:
    data = bytearray(make_tar(tmp_path / "t.tar", [("w.bin", PAYLOAD)], tarfile.GNU_FORMAT).read_bytes())
    (tmp_path / "t.tar").unlink()
    tar_header_size(data, 0, 10 * len(PAYLOAD))
    archive = tmp_path / "m.tar"
    archive.write_bytes(bytes(data))
    refused(archive, "is corrupt at entry 'w.bin': unexpected end of data")


def test_a_truncated_tar_gz_is_corrupt(tmp_path: Path) -> None:
    whole = make_tar(tmp_path / "whole.tar.gz", [("model/w.bin", os.urandom(200_000))]).read_bytes()
    (tmp_path / "whole.tar.gz").unlink()
    (tmp_path / "half.tar.gz").write_bytes(whole[:len(whole) // 2])
    refused(tmp_path / "half.tar.gz", "is corrupt at entry 'model/w.bin': truncated")


def test_a_tar_gz_without_its_crc_is_corrupt(tmp_path: Path) -> None:
    # The tar inside is complete: only reading the gzip stream to its end notices.
    whole = make_tar(tmp_path / "whole.tar.gz", [("model/w.bin", PAYLOAD)]).read_bytes()
    (tmp_path / "whole.tar.gz").unlink()
    (tmp_path / "m.tar.gz").write_bytes(whole[:-8])
    refused(tmp_path / "m.tar.gz", "archive 'm.tar.gz' is corrupt: truncated")


def test_a_tar_gz_with_a_wrong_crc_is_corrupt(tmp_path: Path) -> None:
    whole = bytearray(make_tar(tmp_path / "whole.tar.gz", [("model/w.bin", PAYLOAD)]).read_bytes())
    (tmp_path / "whole.tar.gz").unlink()
    whole[-8] ^= 0xFF
    (tmp_path / "m.tar.gz").write_bytes(bytes(whole))
    refused(tmp_path / "m.tar.gz", "is corrupt: CRC check failed")


def test_data_after_the_end_of_a_tar_is_corrupt(tmp_path: Path) -> None:
    first = make_tar(tmp_path / "a.tar", [("a.bin", b"a")]).read_bytes()
    second = make_tar(tmp_path / "b.tar", [("b.bin", b"b")]).read_bytes()
    (tmp_path / "a.tar").unlink()
    (tmp_path / "b.tar").unlink()
    (tmp_path / "m.tar").write_bytes(first + second)  # tar -A: tarfile alone would stop after a.bin
    refused(tmp_path / "m.tar", "is corrupt: data after the end of the tar archive")


def test_a_zip_with_a_bad_crc_is_corrupt(tmp_path: Path) -> None:
    stored = zipfile.ZipInfo("model/w.bin")
    stored.compress_type = zipfile.ZIP_STORED
    data = bytearray(make_zip(tmp_path / "good.zip", [(stored, PAYLOAD)]).read_bytes())
    (tmp_path / "good.zip").unlink()
    data[30 + len("model/w.bin") + 100] ^= 0xFF  # a byte of the stored data
    (tmp_path / "m.zip").write_bytes(bytes(data))
    refused(tmp_path / "m.zip", "is corrupt at entry 'model/w.bin': Bad CRC-32 for file 'model/w.bin'")


def test_a_truncated_zip_is_corrupt(tmp_path: Path) -> None:
    whole = make_zip(tmp_path / "whole.zip", [("model/w.bin", os.urandom(50_000))]).read_bytes()
    (tmp_path / "whole.zip").unlink()
    (tmp_path / "m.zip").write_bytes(whole[:len(whole) // 2])
    refused(tmp_path / "m.zip", "is corrupt: File is not a zip file")


@pytest.mark.parametrize(("name", "content", "reason"), [
    ("m.zip", b"just text, no archive", "File is not a zip file"),
    ("m.tgz", b"just text, no archive", "Not a gzipped file"),
    ("m.tar.gz", gzip.compress(b"just text, no archive " * 100), "invalid header"),
    ("m.tar", b"just text, no archive " * 100, "invalid header"),
    ("m.tar", b"", "empty file"),
    ("m.zip", b"", "File is not a zip file"),
])
def test_not_an_archive_is_corrupt(tmp_path: Path, name: str, content: bytes, reason: str) -> None:
    (tmp_path / name).write_bytes(content)
    refused(tmp_path / name, f"is corrupt: {reason}")


def test_an_encrypted_zip_entry_is_refused(tmp_path: Path) -> None:
    data = bytearray(make_zip(tmp_path / "good.zip", [("model/w.bin", PAYLOAD)]).read_bytes())
    (tmp_path / "good.zip").unlink()
    data[data.rfind(b"PK\x01\x02") + 8] |= 0x1  # the central directory's flag: encrypted
    (tmp_path / "m.zip").write_bytes(bytes(data))
    refused(tmp_path / "m.zip", "entry 'model/w.bin' is encrypted")


def test_a_zip_entry_in_bzip2_is_refused(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "m.zip", [("model/w.bin", PAYLOAD)], method=zipfile.ZIP_BZIP2)
    refused(archive, "entry 'model/w.bin' is compressed with zip method 12: only stored and deflate are unpacked")
