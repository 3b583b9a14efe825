"""Unpacking a downloaded model archive (``.zip``, ``.tar.gz``/``.tgz``, ``.tar``) into the model's folder.

The archive is uploaded by a tenant, so every byte of it is hostile until checked: a name, a type,
a size in a header, the number of entries. :func:`unpack` refuses the archive (``ModelLoadError``
naming the archive's file name and the entry at fault) rather than repair it, because a repaired
archive is a model laid out differently from what its owner uploaded, and nobody would be told:

- names that could land outside the folder: absolute (``/x``, ``\\x``), a drive (``C:x``), a ``..``
  component, a NUL byte. ``\\`` is a separator (zips made on Windows), so ``..\\x`` is refused too.
- anything but regular files and directories: symbolic and hard links, devices, FIFOs. tarfile's
  ``data`` filter allows links that stay inside the folder; we do not, since a model never needs
  one and a link lets a later entry or a loader reach a path nobody checked. The filter still
  runs on every tar entry as a second layer, and files are opened with ``O_NOFOLLOW | O_EXCL``.
- more than ``max_files`` entries, or more than ``max_bytes`` unpacked. Sizes are counted as they
  are written, a chunk at a time, and the chunk that would pass the bound is never written; the
  sizes in headers only ever refuse earlier, never allow. Three ways the standard library would
  spend memory before any of that are closed first: zip entries compressed with bzip2 or LZMA are
  refused (zipfile decompresses them with no bound on the output), a zip's central directory is
  measured before zipfile builds an object for each of its entries, and tar headers (a pax header,
  a GNU long name, read whole and kept by tarfile) are bounded one by one and all together.
- duplicate entries, and a file where another entry has a directory: an archive naming a path
  twice is broken or an attack, and which copy wins would be an accident.
- corrupt archives: a bad CRC, a truncated or damaged gzip stream, a broken tar header, not an
  archive at all: one line saying so in a few words, never a traceback. A tar is read to its end,
  so that gzip checks its CRC and a broken header mid-archive (which tarfile takes for the end of
  the archive) is an error rather than a model missing its last files.

What is written: files 0o644 and directories 0o755, whatever the archive says (no setuid, no
executable bits, no ownership; times are the time of unpacking). A single top-level directory is
kept as it is: the caller decides what the model's root is. A tar.gz is decompressed as a stream
through a buffer of :data:`CHUNK` bytes, never held whole. On any failure the destination, which
must be empty when :func:`unpack` starts, is emptied again, so a failed load leaves no half model.

KServe's storage initializer (``_unpack_archive_file`` in kserve/storage/storage.py) unpacks a
downloaded ``application/x-tar`` or ``application/zip`` with ``extractall``: zipfile's, which
silently drops ``..`` and leading ``/`` and writes a symbolic link as a file holding its target,
and tarfile's (with ``filter="data"`` in recent releases: older ones extracted tar names as given,
a reported path traversal). It bounds neither the size nor the number of entries, and maps
``TarError``/``BadZipFile`` to one "The file format is not valid" error. We refuse what it repairs
or allows, and bound what it does not.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

from mesh.errors import ModelLoadError

CHUNK = 1024 * 1024  # bytes read and written at a time: the one buffer an entry's data goes through
_CUT = 200  # characters of a name shown in an error
_DRIVE = re.compile(r"^[A-Za-z]:")
_LINKS = "links are not allowed in model archives"
_ONLY = "only regular files and directories are allowed in model archives"
_SPECIAL = {stat.S_IFCHR: "character device", stat.S_IFBLK: "block device", stat.S_IFIFO: "FIFO",
            stat.S_IFSOCK: "socket"}
# zipfile bounds the output of deflate by what is asked for; of bzip2 and LZMA it does not (a few KiB
# of bzip2 decompress to gigabytes in one call), so those are refused. Models are zipped with deflate.
_ZIP_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate"}
# A central directory entry is 46 bytes and a name, so one of a few MiB may hold 100,000 entries, each
# a ZipInfo in memory before the count can be checked. Real entries take 100-300 bytes.
_ZIP_DIRECTORY_FIXED = 64 * 1024
_ZIP_DIRECTORY_PER_ENTRY = 1024
# An entry's tar headers (512 bytes, and a pax header of a few hundred when names are long or times
# precise) are read whole and kept by tarfile: bounded one read at a time and all together.
_TAR_HEADER_MAX = 64 * 1024
_TAR_HEADERS_FIXED = 1024 * 1024
_TAR_HEADERS_PER_ENTRY = 8 * 1024
# After the end-of-archive blocks tar writers pad to a 10 KiB record with zeros; more is refused.
_TAR_TRAILER_MAX = 1024 * 1024


class _Source(Protocol):
    def read(self, size: int, /) -> bytes: ...


class _Stream(_Source, Protocol):
    def seek(self, offset: int, whence: int = ..., /) -> int: ...

    def tell(self) -> int: ...


def archive_kind(name: str) -> str | None:
    """"zip", "tar.gz" or "tar" by the file name's suffix (any case; ``.tgz`` is tar.gz), else None."""
    lower = name.lower()
    if lower.endswith(".zip"):
        return "zip"
    if lower.endswith((".tar.gz", ".tgz")):
        return "tar.gz"
    if lower.endswith(".tar"):
        return "tar"
    return None


def unpack(archive: Path, dest: Path, *, max_bytes: int, max_files: int) -> int:
    """Unpack ``archive`` into ``dest`` (an existing, empty directory); the bytes written.

    ModelLoadError for an archive refused or corrupt (module docstring), ``dest`` then empty again.
    Synchronous: run it in a thread.
    """
    unpacker = _Unpacker(archive, dest, max_bytes, max_files)
    kind = archive_kind(archive.name)
    if kind is None:
        raise unpacker.error("is not a .zip, .tar.gz, .tgz or .tar file")
    if any(dest.iterdir()):
        raise ValueError(f"unpack needs an empty directory, {dest} is not")
    try:
        try:
            if kind == "zip":
                _unpack_zip(unpacker, archive)
            else:
                _unpack_tar(unpacker, archive, gzipped=kind == "tar.gz")
        # BadGzipFile is an OSError: it comes before the OSError below. RecursionError: tarfile reads
        # chained pax headers recursively, within the headers' budget.
        except (zipfile.BadZipFile, tarfile.TarError, zlib.error, gzip.BadGzipFile, EOFError, ValueError,
                NotImplementedError, RecursionError) as exc:
            raise unpacker.corrupt(_reason(exc)) from None
        except OSError as exc:  # reading the archive; errors writing are ModelLoadErrors already
            raise unpacker.error(f"cannot be read ({exc.strerror or type(exc).__name__})") from None
    except BaseException:
        _empty(dest)
        raise
    return unpacker.written


class _Unpacker:
    """One unpack: where each entry goes, what was claimed, what was written. Every check of an
    entry is made here, the same for zip and tar."""

    def __init__(self, archive: Path, dest: Path, max_bytes: int, max_files: int) -> None:
        self.label = repr(archive.name[:_CUT])
        self.dest = Path(os.path.realpath(dest))
        self.max_bytes = max_bytes
        self.max_files = max_files
        self.entries = 0
        self.written = 0
        self.entry: str | None = None  # the entry being unpacked, named by errors
        # path parts -> "file" or "dir" (entries), or "parent" (a directory made for an entry in it)
        self._claimed: dict[tuple[str, ...], str] = {}

    def error(self, what: str) -> ModelLoadError:
        return ModelLoadError(f"archive {self.label} {what}")

    def refuse(self, what: str) -> ModelLoadError:
        return self.error(f"refused: entry {_quote(self.entry or '')} {what}")

    def corrupt(self, reason: str) -> ModelLoadError:
        at = f" at entry {_quote(self.entry)}" if self.entry is not None else ""
        return self.error(f"is corrupt{at}: {reason}")

    def start(self, name: str) -> tuple[str, ...]:
        """Count the entry and check its name: its path's parts under the destination."""
        self.entry = name
        self.entries += 1
        if self.entries > self.max_files:
            raise self.too_many()
        if "\0" in name:
            raise self.refuse("has a NUL byte in its name")
        unix = name.replace("\\", "/")  # a separator in zips made on Windows; never a name's character here
        if unix.startswith("/"):
            raise self.refuse("is an absolute path")
        if _DRIVE.match(unix):
            raise self.refuse("names a drive")
        parts = tuple(part for part in unix.split("/") if part not in ("", "."))
        if ".." in parts:
            raise self.refuse("has a '..' component: it would land outside the model's folder")
        return parts

    def place(self, parts: tuple[str, ...], kind: str) -> Path | None:
        """Claim the entry's path (kind "file" or "dir"), make its parents and, for a directory, itself:
        the file's path to write, None when there is nothing more to do."""
        held = self._claimed.get(parts)
        if held in ("file", "dir"):
            raise self.refuse("appears twice in the archive (duplicate entries are not allowed)")
        if held == "parent":
            if kind == "file":
                raise self.refuse("is a file, but other entries are inside it as a directory")
            self._claimed[parts] = "dir"  # made already, for an entry inside it listed first
            return None
        if not parts:
            if kind == "dir":
                return None  # "./": the folder itself
            raise self.refuse("has an empty name")
        for depth in range(1, len(parts)):
            parent = parts[:depth]
            held = self._claimed.get(parent)
            if held == "file":
                raise self.refuse(f"is inside {_quote('/'.join(parent))}, which is a file")
            if held is None:
                self._mkdir(parent)
                self._claimed[parent] = "parent"
        path = self.dest.joinpath(*parts)
        # Second layer: we make no links and the destination started empty, so nothing on the way can
        # be one; checked all the same before anything is written there.
        if os.path.realpath(path.parent) != str(path.parent):
            raise self.refuse("would be written through a link")
        self._claimed[parts] = kind
        if kind == "dir":
            self._mkdir(parts)
            return None
        return path

    def write(self, path: Path, source: _Source, declared: int) -> int:
        """Copy ``source`` to a new file at ``path``, counting against ``max_bytes`` as it goes; the
        bytes written. ``declared`` (the header's size) may only refuse earlier."""
        if declared > self.max_bytes - self.written:
            raise self._too_big()
        with self._writing():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        size = 0
        try:
            with self._writing():
                os.fchmod(fd, 0o644)  # not whatever the umask leaves
            while chunk := source.read(CHUNK):  # read errors go to unpack's corrupt-archive handler
                if len(chunk) > self.max_bytes - self.written:
                    raise self._too_big()  # a header that lied: stop before writing past the bound
                with self._writing():
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view):]
                self.written += len(chunk)
                size += len(chunk)
        finally:
            os.close(fd)
        if size != declared:
            raise self.corrupt(f"it holds {size} bytes, its header says {declared}")
        return size

    def too_many(self) -> ModelLoadError:
        return self.error(f"has more than {self.max_files} entries (storage.max_files); refused at entry "
                          f"{_quote(self.entry or '')}")

    def _too_big(self) -> ModelLoadError:
        return self.error(f"unpacks to more than {self.max_bytes} bytes (storage.cache_bytes); refused at entry "
                          f"{_quote(self.entry or '')}")

    def _mkdir(self, parts: tuple[str, ...]) -> None:
        path = self.dest.joinpath(*parts)
        with self._writing():
            os.mkdir(path, 0o755)
            os.chmod(path, 0o755)  # not whatever the umask leaves

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """OSError writing (a full disk, a name too long, a clash on a case-insensitive disk)."""
        try:
            yield
        except OSError as exc:
            raise self.error(f"cannot be unpacked: writing entry {_quote(self.entry or '')} failed "
                             f"({exc.strerror or type(exc).__name__})") from None


def _unpack_zip(unpacker: _Unpacker, archive: Path) -> None:
    with archive.open("rb") as file:
        directory = _zip_directory_size(file)
        bound = _ZIP_DIRECTORY_FIXED + _ZIP_DIRECTORY_PER_ENTRY * unpacker.max_files
        if directory is not None and directory > bound:
            raise unpacker.error(f"has a zip directory of {directory} bytes, more than {unpacker.max_files} "
                                 f"entries need (max_files; at most {bound} bytes)")
        with zipfile.ZipFile(file) as zipped:
            infos = zipped.infolist()
            if len(infos) > unpacker.max_files:  # refused before anything is written
                unpacker.entry = infos[unpacker.max_files].orig_filename
                raise unpacker.too_many()
            for info in infos:
                parts = unpacker.start(info.orig_filename)  # orig_filename: zipfile cuts its filename at a NUL
                kind = _zip_kind(unpacker, info)
                if info.flag_bits & 0x1:
                    raise unpacker.refuse("is encrypted: model archives cannot be")
                if kind == "file" and info.compress_type not in _ZIP_METHODS:
                    raise unpacker.refuse(f"is compressed with zip method {info.compress_type}: only "
                                          f"{' and '.join(_ZIP_METHODS.values())} are unpacked")
                path = unpacker.place(parts, kind)
                if path is not None:
                    with zipped.open(info) as source:
                        unpacker.write(path, source, info.file_size)


def _zip_kind(unpacker: _Unpacker, info: zipfile.ZipInfo) -> str:
    """"file" or "dir" by the entry's Unix mode (the high half of its external attributes) and name."""
    kind = stat.S_IFMT(info.external_attr >> 16)
    if kind == stat.S_IFLNK:
        raise unpacker.refuse(f"is a symbolic link: {_LINKS}")
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise unpacker.refuse(f"is a {_SPECIAL.get(kind, 'special file')}: {_ONLY}")
    return "dir" if kind == stat.S_IFDIR or info.orig_filename.replace("\\", "/").endswith("/") else "file"


def _zip_directory_size(file: BinaryIO) -> int | None:
    """The size of the central directory that zipfile will read (its ``_EndRecData`` rules, Python
    3.11-3.12: the end record at the very end or the last one in the final 64 KiB, then a zip64 record
    just before it when its locator is there); None when there is no end record, which zipfile reports."""
    size = file.seek(0, os.SEEK_END)
    tail_length = min(size, 22 + 0xFFFF)
    file.seek(size - tail_length)
    tail = file.read(tail_length)
    if tail[-22:-18] == b"PK\x05\x06" and tail[-2:] == b"\0\0":
        at = len(tail) - 22
    else:
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or len(tail) - at < 22:
            return None
    directory = int.from_bytes(tail[at + 12:at + 16], "little")
    end = size - tail_length + at
    if end >= 20 + 56:
        file.seek(end - 20)
        if file.read(4) == b"PK\x06\x07":
            file.seek(end - 20 - 56)
            record = file.read(56)
            if record[:4] == b"PK\x06\x06":
                directory = int.from_bytes(record[40:48], "little")
    return directory


def _unpack_tar(unpacker: _Unpacker, archive: Path, *, gzipped: bool) -> None:
    budget = _TAR_HEADERS_FIXED + _TAR_HEADERS_PER_ENTRY * unpacker.max_files
    with contextlib.ExitStack() as stack:
        file = stack.enter_context(archive.open("rb"))
        raw: _Stream = stack.enter_context(gzip.GzipFile(fileobj=file, mode="rb")) if gzipped else file
        stream = _TarStream(raw, budget, unpacker)
        # Not tarfile's stream mode ("r|gz"): there its own buffer, which we cannot bound, reads the
        # headers. Reading a gzip file forward is a stream all the same; tarfile never seeks back here.
        with tarfile.TarFile(fileobj=stream, mode="r") as tar:
            for member in tar:
                parts = unpacker.start(member.name)
                kind = _tar_kind(unpacker, member)
                try:
                    tarfile.data_filter(member, str(unpacker.dest))  # the second layer (module docstring)
                except tarfile.FilterError as exc:
                    raise unpacker.refuse(f"is refused by tarfile's data filter ({type(exc).__name__})") from None
                except OSError:
                    # Python 3.13's filter resolves the path strictly: an entry under a file fails with
                    # ENOTDIR. place() names that precisely; anything else is refused all the same.
                    unpacker.place(parts, kind)
                    raise unpacker.refuse("is refused by tarfile's data filter (its path cannot be resolved)") from None
                path = unpacker.place(parts, kind)
                if path is not None:
                    source = tar.extractfile(member)
                    if source is None:  # not a regular file after all: cannot happen after _tar_kind
                        raise unpacker.corrupt("a file entry without data")
                    with stream.reading_data():
                        unpacker.write(path, source, member.size)
            unpacker.entry = None
            stream.check_end(tar.offset)


def _tar_kind(unpacker: _Unpacker, member: tarfile.TarInfo) -> str:
    if member.isreg():
        return "file"
    if member.isdir():
        return "dir"
    if member.issym():
        raise unpacker.refuse(f"is a symbolic link (to {_quote(member.linkname)}): {_LINKS}")
    if member.islnk():
        raise unpacker.refuse(f"is a hard link (to {_quote(member.linkname)}): {_LINKS}")
    what = ("character device" if member.ischr() else "block device" if member.isblk()
            else "FIFO" if member.isfifo() else f"tar entry of type {member.type!r}")
    raise unpacker.refuse(f"is a {what}: {_ONLY}")


class _TarStream(io.RawIOBase):
    """The uncompressed tar stream, as tarfile reads it.

    tarfile reads a pax header or a GNU long name whole, in one read of the size its header gives,
    and keeps it with the entry: reads outside an entry's data are bounded here, one by
    ``_TAR_HEADER_MAX`` and all together by ``budget``. The last header block read is kept for
    :meth:`check_end`.
    """

    def __init__(self, raw: _Stream, budget: int, unpacker: _Unpacker) -> None:
        super().__init__()
        self._raw = raw
        self._budget = budget
        self._left = budget
        self._unpacker = unpacker
        self._in_data = False
        self._last_block: tuple[int, bytes] = (-1, b"")

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int = -1, /) -> bytes:
        if self._in_data:
            return self._raw.read(size)
        if size < 0 or size > _TAR_HEADER_MAX:
            after = f" after entry {_quote(self._unpacker.entry)}" if self._unpacker.entry is not None else ""
            raise self._unpacker.error(f"has a tar header of {size} bytes{after}: more than {_TAR_HEADER_MAX}")
        if size > self._left:
            raise self._unpacker.error(f"has tar headers of more than {self._budget} bytes, more than "
                                       f"{self._unpacker.max_files} entries need (max_files)")
        at = self._raw.tell()
        data = self._raw.read(size)
        self._left -= len(data)
        if size == tarfile.BLOCKSIZE:
            self._last_block = (at, data)
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET, /) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()

    @contextlib.contextmanager
    def reading_data(self) -> Iterator[None]:
        """While an entry's data is read (by :data:`CHUNK`, bounded by the unpacker's count)."""
        self._in_data = True
        try:
            yield
        finally:
            self._in_data = False

    def check_end(self, offset: int) -> None:
        """After tarfile's last entry: the block it stopped at (``offset``) is an end-of-archive block
        of zeros or the end of the file, not a header it could not read; zeros follow, read to the
        end so that gzip checks its CRC and length."""
        at, block = self._last_block
        if at == offset and block.count(0) != len(block):
            raise self._unpacker.corrupt("a broken tar header after the last entry read (a wrong size in "
                                         "a header, or damaged data)")
        left = _TAR_TRAILER_MAX
        while chunk := self._raw.read(min(CHUNK, left + 1)):
            left -= len(chunk)
            if left < 0 or chunk.count(0) != len(chunk):
                raise self._unpacker.corrupt("data after the end of the tar archive")


def _quote(name: str) -> str:
    return repr(name[:_CUT])


def _reason(exc: BaseException) -> str:
    """A corrupt archive's reason in a few words, on one line."""
    if isinstance(exc, EOFError):
        return "truncated (it ends before its end marker)"
    if isinstance(exc, RecursionError):
        return "tar headers nested too deep"
    text = " ".join(str(exc).split())
    return text[:120] if text else type(exc).__name__


def _empty(dest: Path) -> None:
    """Remove what a failed unpack wrote (the destination was empty); best effort, the error that
    made it fail is the one worth reporting."""
    with contextlib.suppress(OSError):
        for child in dest.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)


__all__ = ["CHUNK", "archive_kind", "unpack"]
