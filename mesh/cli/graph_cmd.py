"""``mesh graph set|status|delete|list``: inference graphs through the router's management API
(``mmesh.ModelMeshGraphs``).

``mesh graph set NAME -f FILE`` reads YAML or JSON (JSON is YAML, so one safe YAML parser reads
both): either a whole ``InferenceGraph`` manifest (``kind: InferenceGraph``, whose ``spec`` is
taken; its ``metadata.name`` must then be NAME, so a file is not applied under the wrong name by
accident) or only the spec (a mapping with ``nodes``). ``-f -`` reads standard input. The router
checks the spec; its refusal (naming node and step) is printed as the one-line error.

The file is bounded before it reaches the router: at most 4x the spec's JSON limit in bytes, no YAML
aliases (``*name``: a few lines of aliases expand to gigabytes, the "billion laughs"; a graph spec
has no use for them), nesting Python can walk (a RecursionError is a one-line error), and the JSON
produced at most ``MAX_SPEC_BYTES``. Each refusal is one line and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml  # type: ignore[import-untyped]  # PyYAML ships no annotations; only safe_load is used

from mesh.cli.errors import CliError, printable
from mesh.gen.mmesh import graphs_pb2 as gp
from mesh.graphs.spec import MAX_SPEC_BYTES

if TYPE_CHECKING:  # the client imports gRPC: not needed to build the parser (`mesh up` builds it)
    from mesh.cli.client import RouterClient

MAX_FILE_BYTES = 4 * MAX_SPEC_BYTES  # YAML with comments is larger than its JSON; the router bounds the JSON


class _NoAliasLoader(yaml.SafeLoader):  # type: ignore[misc]  # PyYAML's classes are untyped
    """PyYAML's safe loader refusing aliases (module docstring)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "YAML aliases (*name) are not allowed in a graph spec",
                                              event.start_mark)
        return super().compose_node(parent, index)


def read_spec(path: str, graph_id: str) -> dict[str, Any]:
    """The spec in FILE (module docstring); CliError (exit 2) naming what is wrong."""
    try:
        raw = sys.stdin.buffer.read(MAX_FILE_BYTES + 1) if path == "-" else Path(path).read_bytes()
    except OSError as exc:
        raise CliError(f"-f: cannot read {path}: {exc.strerror or exc}", exit_code=2) from None
    if len(raw) > MAX_FILE_BYTES:
        raise CliError(f"-f: {path} is over {MAX_FILE_BYTES} bytes; a graph spec is at most {MAX_SPEC_BYTES} "
                       "bytes of JSON", exit_code=2)
    try:
        doc = yaml.load(raw, Loader=_NoAliasLoader)  # a SafeLoader, without aliases
    except RecursionError:
        raise CliError(f"-f: {path} is nested too deeply to read", exit_code=2) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise CliError(f"-f: {path} is not valid YAML or JSON{where}: {problem}", exit_code=2) from None
    if not isinstance(doc, dict):
        raise CliError(f"-f: {path} must hold a mapping (an InferenceGraph or its spec), not "
                       f"{type(doc).__name__}", exit_code=2)
    if "kind" in doc or "apiVersion" in doc:
        if doc.get("kind") != "InferenceGraph":
            raise CliError(f"-f: {path} is a {doc.get('kind')!r} manifest; expected kind InferenceGraph", exit_code=2)
        name = (doc.get("metadata") or {}).get("name") if isinstance(doc.get("metadata"), dict) else None
        if name and name != graph_id:
            raise CliError(f"-f: {path} defines InferenceGraph {name!r}, not {graph_id!r}: name the graph as the "
                           "manifest does, or drop metadata.name", exit_code=2)
        spec = doc.get("spec")
        if not isinstance(spec, dict):
            raise CliError(f"-f: {path}: the InferenceGraph has no spec mapping", exit_code=2)
        return spec
    return doc


def _spec_text(spec: dict[str, Any], path: str) -> str:
    try:  # YAML may hold dates, sets or non-string keys that JSON has no form for
        text = json.dumps(spec, separators=(",", ":"), sort_keys=True, allow_nan=False)
    except RecursionError:
        raise CliError(f"-f: {path}: the spec is nested too deeply to write as JSON", exit_code=2) from None
    except (TypeError, ValueError) as exc:
        raise CliError(f"-f: {path}: the spec cannot be written as JSON: {exc}", exit_code=2) from None
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_SPEC_BYTES:
        raise CliError(f"-f: {path}: the spec is {size} bytes of JSON; the limit is {MAX_SPEC_BYTES}", exit_code=2)
    return text


def _status_text(info: gp.GraphStatusInfo, graph_id: str) -> str:
    from mesh.gen.mmesh import model_mesh_pb2 as mm

    lines = [f"{graph_id}: {gp.GraphStatusInfo.GraphStatus.Name(info.status)}"]
    for m in info.models:
        alias = f" (vModel -> {m.activeModelId})" if m.isVModel else ""
        lines.append(f"  model {m.modelId}{alias}: {mm.ModelStatusInfo.ModelStatus.Name(m.status)}")
    return "\n".join(lines)


def _status_dict(info: gp.GraphStatusInfo) -> dict[str, Any]:
    from mesh.gen.mmesh import model_mesh_pb2 as mm

    return {"status": gp.GraphStatusInfo.GraphStatus.Name(info.status),
            "spec": json.loads(info.specJson) if info.specJson else None,
            "owner": info.owner, "updated_ms": info.updatedMs,
            "models": [{"model_id": m.modelId, "is_vmodel": m.isVModel, "active_model_id": m.activeModelId,
                        "status": mm.ModelStatusInfo.ModelStatus.Name(m.status)} for m in info.models]}


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2, sort_keys=True) if args.json else printable(text))


def graph_command(args: argparse.Namespace, client: RouterClient) -> int:
    stub = client.graphs
    if args.action == "set":
        spec = read_spec(args.file, args.graph_id)
        request = gp.SetGraphRequest(graphId=args.graph_id, specJson=_spec_text(spec, args.file),
                                     owner=args.owner or "")
        info = client.call(stub.setGraph, request)
        _emit(args, _status_dict(info), _status_text(info, args.graph_id))
    elif args.action == "status":
        info = client.call(stub.getGraphStatus, gp.GetGraphStatusRequest(graphId=args.graph_id))
        _emit(args, _status_dict(info), _status_text(info, args.graph_id))
        return 0 if info.status != gp.GraphStatusInfo.NOT_FOUND else 1
    elif args.action == "delete":
        client.call(stub.deleteGraph, gp.DeleteGraphRequest(graphId=args.graph_id, owner=args.owner or ""))
        _emit(args, {"deleted": args.graph_id}, f"deleted graph {args.graph_id}")
    elif args.action == "list":
        return _list(args, client)
    return 0


def _list(args: argparse.Namespace, client: RouterClient) -> int:
    if args.limit <= 0:
        raise CliError("--limit must be positive", exit_code=2)
    entries: list[Any] = []
    token = ""
    while len(entries) < args.limit:
        page = client.call(client.graphs.listGraphs, gp.ListGraphsRequest(
            prefix=args.prefix or "", pageSize=min(500, args.limit - len(entries)), pageToken=token))
        entries += page.graphs
        token = page.nextPageToken
        if not token:
            break
    entries = entries[:args.limit]
    data = [{"graph_id": e.graphId, "nodes": e.nodes, "models": list(e.models), "updated_ms": e.updatedMs}
            for e in entries]
    text = "\n".join(f"{e.graphId}  nodes={e.nodes}  models={','.join(e.models)}" for e in entries) or "no graphs"
    _emit(args, data, text)
    return 0


__all__ = ["graph_command", "read_spec"]
