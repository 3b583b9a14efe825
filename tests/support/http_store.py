"""A plain HTTP(S) file server for the ``http`` storage tests, run as a process of its own.

``python -m tests.support.http_store --port 0 --root DIR [--cert PEM --key PEM [--client-ca PEM]]
[--require-header 'Name: value' ...]`` serves the files under DIR read-only, with the contract of
:mod:`tests.support.model_servers`: it binds 127.0.0.1, prints ``ready <port>`` once it serves and
stops on SIGTERM. The test side is :func:`tests.support.object_stores.http_store`.

What it answers, and why each rule is there (pullman's ``http`` provider GETs one URL per model):

- GET and HEAD of a file: 200 with Content-Length, ETag (size and mtime, as nginx makes it: no
  hashing of large files), Last-Modified and ``Accept-Ranges: bytes``; anything that is not a
  regular file under DIR (a folder, a missing path, ``..`` escaping DIR) is 404.
- ``Range: bytes=a-b``, ``a-`` or ``-n``: 206 with Content-Range; a range past the end is 416 with
  ``Content-Range: bytes */size``; several ranges in one header are ignored (200 with the whole
  file, which RFC 9110 allows), so clients see the one answer they must cope with anyway.
- Each ``--require-header``: absent is 401, present with another value is 403 (so a test can tell
  "no credentials" from "wrong credentials").
- ``--cert``/``--key``: HTTPS; with ``--client-ca`` too, a client must present a certificate signed
  by that CA (mTLS), else the TLS handshake fails. The handshake runs in the connection's own thread,
  so one silent client cannot stall the accept loop.
"""

from __future__ import annotations

import argparse
import email.utils
import http.server
import os
import re
import signal
import ssl
import sys
import threading
import urllib.parse
from pathlib import Path

CHUNK = 1 << 20  # bytes read and written at a time: bounded memory for files of any size
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


class StoreServer(http.server.ThreadingHTTPServer):
    daemon_threads = True  # a client holding a keep-alive connection never delays the stop

    def __init__(self, port: int, root: Path, required: dict[str, str], tls: ssl.SSLContext | None) -> None:
        super().__init__(("127.0.0.1", port), Handler)
        self.root = root.resolve()
        self.required = required
        if tls is not None:
            self.socket = tls.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real object stores answer
    server: StoreServer

    def handle(self) -> None:
        if isinstance(self.connection, ssl.SSLSocket):
            try:
                self.connection.do_handshake()
            except (ssl.SSLError, OSError):
                return  # e.g. no client certificate under mTLS: the client sees the handshake fail
        super().handle()

    def do_GET(self) -> None:
        self._serve(with_body=True)

    def do_HEAD(self) -> None:
        self._serve(with_body=False)

    def log_message(self, format: str, *args: object) -> None:
        pass  # no access log: tests read answers, not the server's chatter

    def _serve(self, *, with_body: bool) -> None:
        for name, value in self.server.required.items():
            given = self.headers.get(name)
            if given is None:
                self.send_error(401, f"missing header {name}")
                return
            if given != value:
                self.send_error(403, f"wrong value for header {name}")
                return
        path = self._file()
        if path is None:
            self.send_error(404)
            return
        with path.open("rb") as f:
            stat = os.fstat(f.fileno())
            size = stat.st_size
            start, end = 0, size  # [start, end)
            status = 200
            wanted = _RANGE.fullmatch(self.headers.get("Range", "").strip())
            if wanted is not None and (wanted[1] or wanted[2]):
                first, last = wanted[1], wanted[2]
                if first:
                    start, end = int(first), min(size, int(last) + 1) if last else size
                else:
                    start, end = max(0, size - int(last)), size
                if start >= size or start >= end:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = 206
            self.send_response(status)
            self.send_header("Content-Length", str(end - start))
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("ETag", f'"{size:x}-{stat.st_mtime_ns:x}"')
            self.send_header("Last-Modified", email.utils.formatdate(stat.st_mtime, usegmt=True))
            self.send_header("Accept-Ranges", "bytes")
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
            self.end_headers()
            if with_body:
                f.seek(start)
                left = end - start
                while left > 0:
                    chunk = f.read(min(CHUNK, left))
                    if not chunk:
                        break  # the file shrank while it was served: the client sees a short body
                    self.wfile.write(chunk)
                    left -= len(chunk)

    def _file(self) -> Path | None:
        relative = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
        if "\0" in relative:
            return None
        path = (self.server.root / relative).resolve()
        if not path.is_relative_to(self.server.root) or not path.is_file():
            return None
        return path


def _tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    if args.cert is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(args.cert, args.key)
    if args.client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(args.client_ca)
    return context


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--cert", type=Path)
    parser.add_argument("--key", type=Path)
    parser.add_argument("--client-ca", type=Path)
    parser.add_argument("--require-header", action="append", default=[], metavar="'NAME: VALUE'")
    args = parser.parse_args(argv)
    required = {}
    for line in args.require_header:
        name, sep, value = line.partition(":")
        if not sep:
            parser.error(f"--require-header wants 'Name: value', got {line!r}")
        required[name.strip()] = value.strip()
    server = StoreServer(args.port, args.root, required, _tls(args))
    # shutdown() waits for serve_forever() to return, so it cannot run in the handler's own thread.
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    signal.signal(signal.SIGINT, lambda *_: threading.Thread(target=server.shutdown).start())
    print(f"ready {server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


if __name__ == "__main__":
    main(sys.argv[1:])
