"""``mesh model register --from FILE``: register many models through ``registerModels``.

The file is JSON lines (one object a line) or CSV with a header row (chosen by the first
non-blank character: ``{`` is JSON lines). ``-`` reads standard input. Fields, as the options of
the one-model command: ``id`` (required), ``type`` (required), ``path``, ``key`` (a JSON object,
or its text), ``storage_key``, ``storage_params`` (an object; in CSV ``name=value;name=value``),
``size_hint`` (bytes, or ``200MiB``), ``min_copies``, ``max_copies``, ``labels`` (a list; in CSV
separated by ``;``), ``gpu`` (``required``/``preferred``), ``load_now`` (true/false).

The whole file is read and checked first: a malformed line stops the command before anything is
sent, with exit code 2 and the line number. Then batches of ``--batch-size`` go to the router, a
few calls in flight; items answered UNAVAILABLE (the registry did not say whether it wrote them)
are sent once more, which is safe: registering the same definition again is a no-op. A progress
bar on a terminal (plain progress lines otherwise, on stderr), then a summary; failures are listed
(the first 20; ``--json``: the first 1,000) with their line numbers. Exit code 1 if any item failed.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TextIO

from mesh.cli.client import RouterClient, mm
from mesh.cli.errors import CliError, printable
from mesh.settings import parse_bytes

MAX_BATCH = 1_000  # the router's bound (mesh.router.bulk.MAX_ITEMS)
MAX_BATCH_BYTES = 3 * 1024 * 1024  # under the router's 4 MiB a call, with room
IN_FLIGHT = 4
SHOWN_FAILURES = 20
JSON_FAILURES = 1_000
FIELDS = ("id", "type", "path", "key", "storage_key", "storage_params", "size_hint", "min_copies", "max_copies",
          "labels", "gpu", "load_now")


@dataclass(frozen=True)
class Line:
    number: int
    item: mm.RegisterModelsItem


class Malformed(CliError):
    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}", exit_code=2)


def _text(value: Any, field: str) -> str:
    if isinstance(value, str):
        return value
    raise ValueError(f"{field} must be a string")


def _whole(value: Any, field: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{field} must be a whole number")
    if isinstance(value, str) and value.strip().isdecimal():
        value = int(value)
    if not isinstance(value, int) or value < 0:
        raise ValueError(f"{field} must be a whole number, not {str(value)[:40]!r}")
    return value


def _flag(value: Any, field: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ValueError(f"{field} must be true or false, not {str(value)[:40]!r}")


def _key(record: dict[str, Any]) -> str:
    key, storage_key, params = record.get("key"), record.get("storage_key"), record.get("storage_params")
    if isinstance(params, str):  # CSV: name=value;name=value
        pairs = [p for p in params.split(";") if p.strip()]
        if any("=" not in p for p in pairs):
            raise ValueError("storage_params must be name=value pairs separated by ';'")
        params = dict(p.split("=", 1) for p in pairs)
    if params is not None and not isinstance(params, dict):
        raise ValueError("storage_params must be an object")
    if not storage_key and not params:
        return key if isinstance(key, str) else (json.dumps(key) if key else "")
    if isinstance(key, str):
        try:
            key = json.loads(key) if key else {}
        except ValueError:
            raise ValueError("key is not JSON") from None
    if key is None:
        key = {}
    if not isinstance(key, dict):
        raise ValueError("key must be a JSON object")
    if storage_key:
        key["storage_key"] = _text(storage_key, "storage_key")
    if params:
        key.setdefault("storage_params", {}).update({str(k): str(v) for k, v in params.items()})
    return json.dumps(key)


def item_of(record: dict[str, Any]) -> mm.RegisterModelsItem:
    """One file record as a registerModels item; ValueError says what is wrong with it."""
    unknown = sorted(set(record) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)}; known: {', '.join(FIELDS)}")
    for field in ("id", "type"):
        if not record.get(field):
            raise ValueError(f"{field} is required")
    labels = record.get("labels") or []
    if isinstance(labels, str):
        labels = [label.strip() for label in labels.split(";") if label.strip()]
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise ValueError("labels must be a list of strings")
    size = record.get("size_hint") or 0
    if isinstance(size, str):
        size = parse_bytes(size) if size.strip() else 0
    gpu = _text(record.get("gpu") or "", "gpu")
    if gpu not in ("", "required", "preferred"):
        raise ValueError(f"gpu must be required or preferred, not {gpu[:40]!r}")
    info = mm.ModelInfo(type=_text(record["type"], "type"), path=_text(record.get("path") or "", "path"),
                        key=_key(record), sizeHintBytes=_whole(size, "size_hint"),
                        minCopies=_whole(record.get("min_copies") or 0, "min_copies"),
                        maxCopies=_whole(record.get("max_copies") or 0, "max_copies"), labels=labels, gpu=gpu)
    return mm.RegisterModelsItem(modelId=_text(record["id"], "id"), modelInfo=info,
                                 loadNow=_flag(record.get("load_now", False), "load_now"))


def read_items(stream: TextIO, name: str) -> list[Line]:
    """Every record of the file, checked; Malformed (exit 2) names the first bad line."""
    text = stream.read()
    first = text.lstrip()[:1]
    if not first:
        raise Malformed(name, "the file holds no models")
    lines: list[Line] = []
    records: Iterable[tuple[int, Any]]
    if first == "{":
        records = _json_lines(text, name)
    else:
        records = _csv_rows(text, name)
    for number, record in records:
        try:
            lines.append(Line(number, item_of(record)))
        except ValueError as exc:
            raise Malformed(f"{name}:{number}", str(exc)) from None
        except RecursionError:  # a key nested past what json reads
            raise Malformed(f"{name}:{number}", "a field is nested too deeply") from None
    return lines


def _json_lines(text: str, name: str) -> Iterator[tuple[int, Any]]:
    for number, raw in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 may sit in a JSON string
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except ValueError as exc:
            raise Malformed(f"{name}:{number}", f"not JSON: {exc}") from None
        except RecursionError:
            raise Malformed(f"{name}:{number}", "not JSON this command reads: nested too deeply") from None
        if not isinstance(record, dict):
            raise Malformed(f"{name}:{number}", "a line must be a JSON object")
        yield number, record


def _csv_rows(text: str, name: str) -> Iterator[tuple[int, Any]]:
    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader)
    except (StopIteration, csv.Error) as exc:
        raise Malformed(f"{name}:1", f"no CSV header: {exc}") from None
    header = [h.strip() for h in header]
    unknown = sorted(set(header) - set(FIELDS))
    if unknown:
        raise Malformed(f"{name}:1", f"unknown column(s) {', '.join(unknown)}; known: {', '.join(FIELDS)}")
    try:
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise Malformed(f"{name}:{reader.line_num}", f"{len(row)} cells; the header has {len(header)}")
            yield reader.line_num, {h: cell for h, cell in zip(header, row, strict=True) if cell != ""}
    except csv.Error as exc:
        raise Malformed(f"{name}:{reader.line_num}", f"not CSV: {exc}") from None


def batches(lines: list[Line], size: int) -> Iterator[list[Line]]:
    batch: list[Line] = []
    weight = 0
    for line in lines:
        n = line.item.ByteSize() + 8
        if batch and (len(batch) >= size or weight + n > MAX_BATCH_BYTES):
            yield batch
            batch, weight = [], 0
        batch.append(line)
        weight += n
    if batch:
        yield batch


class Progress:
    """A bar on a terminal, a plain line at most every 2 s otherwise (on stderr: stdout is the result)."""

    def __init__(self, total: int, stream: TextIO, enabled: bool) -> None:
        self.total, self.stream, self.enabled = total, stream, enabled
        self.tty = stream.isatty()
        self.start = self.last = time.monotonic()

    def update(self, done: int, failed: int, *, final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not final and now - self.last < (0.1 if self.tty else 2.0):
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        if self.tty:
            filled = int(30 * done / max(self.total, 1))
            self.stream.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {done:,}/{self.total:,} "
                              f"({failed:,} failed) {rate:,.0f}/s" + ("\n" if final else ""))
        else:
            self.stream.write(f"progress: {done:,}/{self.total:,} sent, {failed:,} failed, {rate:,.0f}/s\n")
        self.stream.flush()


def register_from(args: argparse.Namespace, client: RouterClient) -> int:
    name = args.from_file
    if name == "-":
        lines = read_items(sys.stdin, "<stdin>")
    else:
        try:
            with open(name, encoding="utf-8") as stream:
                lines = read_items(stream, name)
        except OSError as exc:
            raise CliError(f"--from {name}: {exc.strerror or exc}", exit_code=2) from None
        except UnicodeDecodeError:
            raise CliError(f"--from {name}: not UTF-8 text", exit_code=2) from None
    size = args.batch_size
    if not 1 <= size <= MAX_BATCH:
        raise CliError(f"--batch-size must be 1 to {MAX_BATCH:,}", exit_code=2)
    if args.all_or_nothing and len(lines) > size:
        raise CliError(f"--all-or-nothing needs every model in one call: the file holds {len(lines):,}, more than "
                       f"--batch-size {size:,} (at most {MAX_BATCH:,})", exit_code=2)
    progress = Progress(len(lines), sys.stderr, not args.json)
    outcome: dict[int, mm.RegisterModelsResult] = {}
    t0 = time.monotonic()

    def send(batch: list[Line]) -> list[tuple[Line, mm.RegisterModelsResult]]:
        request = mm.RegisterModelsRequest(items=[line.item for line in batch], allOrNothing=args.all_or_nothing)
        response = client.call(client.mesh.registerModels, request)
        return list(zip(batch, response.results, strict=True))

    def run(pending: list[Line]) -> None:
        failed = sum(r.code != "OK" for r in outcome.values())
        with ThreadPoolExecutor(IN_FLIGHT) as pool:
            for answers in pool.map(send, batches(pending, size)):
                for line, result in answers:
                    outcome[line.number] = result
                    failed += result.code != "OK"
                progress.update(len(outcome), failed)

    run(lines)
    # Not known whether they were written: the same registration again is safe, except in an
    # all-or-nothing call (the router undid what it could; sending a part again would register a part).
    retry = [] if args.all_or_nothing else [line for line in lines if outcome[line.number].code == "UNAVAILABLE"]
    if retry:
        run(retry)
    seconds = time.monotonic() - t0
    failures = [(line, outcome[line.number]) for line in lines if outcome[line.number].code != "OK"]
    progress.update(len(outcome), len(failures), final=True)
    created = sum(r.created for r in outcome.values())
    ok = len(lines) - len(failures)
    if args.json:
        print(json.dumps({"models": len(lines), "registered": ok, "created": created, "existing": ok - created,
                          "failed": len(failures), "seconds": round(seconds, 3),
                          "failures": [{"line": line.number, "modelId": r.modelId, "code": r.code,
                                        "message": r.message} for line, r in failures[:JSON_FAILURES]]},
                         indent=2))
    else:
        print(f"registered {ok:,} of {len(lines):,} models from {name} in {seconds:.1f} s "
              f"({ok / max(seconds, 1e-9):,.0f}/s): {created:,} created, {ok - created:,} already registered, "
              f"{len(failures):,} failed")
        for line, r in failures[:SHOWN_FAILURES]:
            print(printable(f"  line {line.number}: {r.modelId}: {r.code}: {r.message}"))
        if len(failures) > SHOWN_FAILURES:
            print(f"  ... and {len(failures) - SHOWN_FAILURES:,} more (--json lists up to {JSON_FAILURES:,})")
    return 1 if failures else 0
