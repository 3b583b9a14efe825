"""``mesh model``, ``mesh vmodel``, ``mesh infer`` and ``mesh settings``: each prints readable text,
or JSON with ``--json``, and returns the process exit code."""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np
from google.protobuf.json_format import MessageToDict

from mesh.cli.client import CliError, RouterClient, mm
from mesh.cli.errors import fail as fail  # re-exported: older callers import it from here
from mesh.cli.errors import printable
from mesh.errors import InvalidArgument
from mesh.settings import describe, parse_bytes
from mesh.transport.metadata import CHECK_SOURCE, RETRY_FAILED


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print(printable(text))


def _status_text(info: mm.ModelStatusInfo, model_id: str) -> str:
    status = mm.ModelStatusInfo.ModelStatus.Name(info.status)
    lines = [f"{model_id}: {status}"]
    for copy in info.modelCopyInfos:
        size = f", {copy.sizeBytes} bytes" if copy.sizeBytes else ""
        size += f" in {copy.device}" if copy.device else ""
        lines.append(f"  copy on {copy.location}: "
                     f"{mm.ModelStatusInfo.ModelStatus.Name(copy.copyStatus)}{size}")
    lines += [f"  error: {e}" for e in info.errors]
    return "\n".join(lines)


def _as_dict(message: Any) -> dict[str, Any]:
    as_dict: dict[str, Any] = MessageToDict(message, always_print_fields_with_no_presence=True)
    return as_dict


def _key(args: argparse.Namespace) -> str:
    """--key, with --storage-key and --storage-param merged into it (modelmesh-serving's fields), and
    --batch-max-size / --batch-max-wait-ms (mesh.runtime.batching reads them from the key)."""
    storage_key, params = getattr(args, "storage_key", None), getattr(args, "storage_param", None) or []
    batching = {name: value for name, value in (("batch_max_size", getattr(args, "batch_max_size", None)),
                                                ("batch_max_wait_ms", getattr(args, "batch_max_wait_ms", None)))
                if value is not None}
    if any(value < 0 for value in batching.values()):
        raise InvalidArgument("--batch-max-size and --batch-max-wait-ms must not be negative")
    if not storage_key and not params and not batching:
        return args.key or ""
    try:
        key = json.loads(args.key) if args.key else {}
    except ValueError:
        raise InvalidArgument("--key is not JSON") from None
    if not isinstance(key, dict):
        raise InvalidArgument("--key must be a JSON object")
    if storage_key:
        key["storage_key"] = storage_key
    for item in params:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise InvalidArgument(f"--storage-param {item[:80]!r}: expected NAME=VALUE")
        key.setdefault("storage_params", {})[name] = value
    key.update(batching)
    return json.dumps(key)


def _model_info(args: argparse.Namespace) -> mm.ModelInfo:
    try:
        size = parse_bytes(args.size_hint) if args.size_hint else 0
    except ValueError as exc:
        raise InvalidArgument(f"--size-hint: {exc}") from None
    return mm.ModelInfo(type=args.type, path=args.path or "", key=_key(args), sizeHintBytes=size,
                        minCopies=args.min_copies, maxCopies=args.max_copies, labels=args.label or [],
                        gpu=args.gpu or "")


def model_command(args: argparse.Namespace, client: RouterClient) -> int:
    if args.action == "register":
        if getattr(args, "from_file", None):
            if args.model_id or args.type:
                raise CliError("--from FILE takes the models from the file: give no MODEL_ID or --type", exit_code=2)
            from mesh.cli.bulk_cmd import register_from

            return register_from(args, client)
        if not args.model_id or not args.type:
            raise CliError("mesh model register: give MODEL_ID and --type (or --from FILE)", exit_code=2)
        info = client.call(client.mesh.registerModel, mm.RegisterModelRequest(
            modelId=args.model_id, modelInfo=_model_info(args), loadNow=args.load_now, sync=args.sync),
            metadata=() if args.no_check else ((CHECK_SOURCE, "1"),))
        _emit(args, _as_dict(info), "registered " + _status_text(info, args.model_id))
        if info.errors and info.status != mm.ModelStatusInfo.LOADED:
            return 1  # registered, but the router knows it cannot load as things stand (its errors say why)
    elif args.action == "status":
        info = client.call(client.mesh.getModelStatus, mm.GetStatusRequest(modelId=args.model_id))
        _emit(args, _as_dict(info), _status_text(info, args.model_id))
        return 0 if info.status != mm.ModelStatusInfo.NOT_FOUND else 1
    elif args.action == "unregister":
        # unregisterModel succeeds for a model that does not exist (ModelMesh's contract: it is
        # idempotent); the CLI asks first, so that a mistyped ID is not reported as done.
        info = client.call(client.mesh.getModelStatus, mm.GetStatusRequest(modelId=args.model_id))
        if info.status == mm.ModelStatusInfo.NOT_FOUND:
            raise CliError(f"model '{args.model_id}' is not registered (nothing to unregister; "
                           "`mesh model list` shows the registered ones)")
        client.call(client.mesh.unregisterModel, mm.UnregisterModelRequest(modelId=args.model_id))
        _emit(args, {"unregistered": args.model_id}, f"unregistered {args.model_id}")
    elif args.action == "load":
        retry = ((RETRY_FAILED, "1"),) if args.retry else ()
        info = client.call(client.mesh.ensureLoaded,
                           mm.EnsureLoadedRequest(modelId=args.model_id, sync=args.sync or args.retry),
                           metadata=retry)
        _emit(args, _as_dict(info), _status_text(info, args.model_id))
    elif args.action == "list":
        return _list(args, client)
    return 0


def _list(args: argparse.Namespace, client: RouterClient) -> int:
    token = ""
    rows: list[mm.ListModelsResponse.Entry] = []
    while True:
        page = client.call(client.mesh.listModels, mm.ListModelsRequest(
            prefix=args.prefix or "", pageSize=min(args.limit - len(rows), 1000), pageToken=token))
        rows.extend(page.models)
        token = page.nextPageToken
        if not token or len(rows) >= args.limit:
            break
    if args.json:
        print(json.dumps([_as_dict(r) for r in rows], indent=2))
        return 0
    if not rows:
        print("no models registered" + (f" with prefix {args.prefix!r}" if args.prefix else ""))
        return 0
    width = max(5, *(len(r.modelId) for r in rows))
    print(f"{'MODEL':<{width}}  {'TYPE':<12} {'STATUS':<15} COPIES  PATH")
    for r in rows:
        status = mm.ModelStatusInfo.ModelStatus.Name(r.status)
        print(printable(f"{r.modelId:<{width}}  {r.modelInfo.type:<12} {status:<15} {r.loadedCopies:<7} "
                        f"{r.modelInfo.path}"))
    if token:
        print(f"(first {len(rows)} shown; use --limit for more)")
    return 0


def _vstatus_text(info: mm.VModelStatusInfo, vmodel_id: str) -> str:
    status = mm.VModelStatusInfo.VModelStatus.Name(info.status)
    if info.status == mm.VModelStatusInfo.NOT_FOUND:
        return f"vmodel {vmodel_id}: NOT_FOUND"
    lines = [f"vmodel {vmodel_id}: {status}" + (f" (owner {info.owner})" if info.owner else ""),
             "  active: " + _status_text(info.activeModelStatus, info.activeModelId).replace("\n", "\n  ")]
    if info.targetModelId and info.targetModelId != info.activeModelId:
        lines.append("  target: " + _status_text(info.targetModelStatus, info.targetModelId)
                     .replace("\n", "\n  "))
    if info.splitTargets:
        sticky = f" (sticky by header {info.stickyHeader})" if info.stickyHeader else ""
        lines.append(f"  split{sticky}:")
        for t in info.splitTargets:
            state = mm.ModelStatusInfo.ModelStatus.Name(t.modelStatus.status)
            note = "" if t.receivingTraffic else "  NO TRAFFIC: its load failed; its share goes to the active model"
            lines.append(f"    {t.weight:>3}%  {t.modelId}  {state}{note}")
    return "\n".join(lines)


def split_targets(texts: list[str]) -> list[mm.SplitTarget]:
    """``MODEL=WEIGHT`` arguments; a malformed one is a usage error (exit 2)."""
    out = []
    for text in texts:
        model, sep, weight = text.rpartition("=")
        weight = weight.strip()
        # ASCII decimal digits only: str.isdigit() also takes '²', which int() then refuses.
        if not sep or not model or not (weight.isascii() and weight.isdecimal()) or len(weight) > 3:
            raise CliError(f"split target {text[:100]!r}: write MODEL=WEIGHT, WEIGHT a percent such as 10",
                           exit_code=2)
        out.append(mm.SplitTarget(modelId=model, weight=int(weight)))
    return out


def vmodel_command(args: argparse.Namespace, client: RouterClient) -> int:
    if args.action == "set":
        request = mm.SetVModelRequest(vModelId=args.vmodel_id, targetModelId=args.target,
                                      owner=args.owner or "", loadNow=args.load_now, force=args.force,
                                      sync=args.sync, autoDeleteTargetModel=args.auto_delete,
                                      expectedTargetModelId=args.expected_target or "")
        if args.type:
            request.modelInfo.CopyFrom(_model_info(args))
        info = client.call(client.mesh.setVModel, request)
        _emit(args, _as_dict(info), _vstatus_text(info, args.vmodel_id))
    elif args.action == "status":
        info = client.call(client.mesh.getVModelStatus,
                           mm.GetVModelStatusRequest(vModelId=args.vmodel_id, owner=args.owner or ""))
        _emit(args, _as_dict(info), _vstatus_text(info, args.vmodel_id))
        return 0 if info.status != mm.VModelStatusInfo.NOT_FOUND else 1
    elif args.action == "split":
        info = client.call(client.mesh.setVModelSplit, mm.SetVModelSplitRequest(
            vModelId=args.vmodel_id, targets=split_targets(args.targets), stickyHeader=args.sticky_header,
            owner=args.owner or "", sync=args.sync))
        _emit(args, _as_dict(info), _vstatus_text(info, args.vmodel_id))
    elif args.action == "promote":
        info = client.call(client.mesh.promoteVModel, mm.PromoteVModelRequest(
            vModelId=args.vmodel_id, modelId=args.model, owner=args.owner or "", sync=args.sync))
        _emit(args, _as_dict(info), _vstatus_text(info, args.vmodel_id))
    elif args.action == "delete":
        client.call(client.mesh.deleteVModel,
                    mm.DeleteVModelRequest(vModelId=args.vmodel_id, owner=args.owner or ""))
        _emit(args, {"deleted": args.vmodel_id}, f"deleted vmodel {args.vmodel_id}")
    return 0


def infer_command(args: argparse.Namespace, client: RouterClient) -> int:
    if not args.input:
        raise CliError("give at least one --input, e.g. --input '[[5.1, 3.5, 1.4, 0.2]]'", exit_code=2)
    if args.vmodel and getattr(args, "graph", False):
        raise CliError("--vmodel and --graph exclude each other", exit_code=2)
    from mesh.cli.metadata_cmd import infer_inputs  # names and datatypes from the model's metadata (issue 20)

    inputs = infer_inputs(args, client)
    response, outputs = client.infer(args.model, inputs, vmodel=args.vmodel, outputs=args.output or [],
                                     graph=getattr(args, "graph", False))
    data: dict[str, Any] = {"model_name": response.model_name, "id": response.id,
                            "outputs": {name: {"datatype": t.datatype, "shape": list(t.shape),
                                               "data": _jsonable(outputs[name])}
                                        for name, t in zip(outputs, response.outputs, strict=False)}}
    text = "\n".join(f"{name} ({v['datatype']} {v['shape']}): {json.dumps(v['data'])}"
                     for name, v in data["outputs"].items())
    _emit(args, data, text)
    return 0


def _jsonable(array: np.ndarray) -> Any:
    if array.dtype == object:
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else v
                for v in array.reshape(-1).tolist()]
    return array.tolist()


def settings_command(args: argparse.Namespace) -> int:
    rows = describe()
    if args.json:
        print(json.dumps([dict(zip(("name", "default", "unit", "doc"), r, strict=True)) for r in rows],
                         indent=2))
        return 0
    for name, default, unit, doc in rows:
        env = "MESH_" + name.replace(".", "_").upper()
        print(f"{name} = {default}" + (f"  [{unit}]" if unit else "") + f"   (env {env})")
        print(f"    {doc}")
    return 0


