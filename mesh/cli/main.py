"""The ``mesh`` command line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mesh import __version__
from mesh.errors import MeshError

DEFAULT_ROUTER = os.environ.get("MESH_ROUTER", "127.0.0.1:8033")


def _token_file(path: str | None) -> str | None:
    from mesh.cli.errors import CliError

    if not path:
        return None
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise CliError(f"--token-file {path}: {exc.strerror or exc}", 2) from None
    if not token:
        raise CliError(f"--token-file {path}: the file is empty", 2)
    return token


def _client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--router", default=DEFAULT_ROUTER,
                   help="router address host:port (default %(default)s, env MESH_ROUTER)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for an answer")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--token", default=None,
                   help="bearer token for a router with auth.tokens_file (default: env MESH_TOKEN); other "
                   "users can read it in the process list: prefer --token-file or MESH_TOKEN")
    p.add_argument("--token-file", default=None,
                   help="file holding the bearer token (default: env MESH_TOKEN_FILE)")
    p.add_argument("--tls-ca", default=os.environ.get("MESH_TLS_CA"),
                   help="CA file verifying the router's certificate; any --tls-* option means TLS "
                   "(env MESH_TLS_CA)")
    p.add_argument("--tls-cert", default=os.environ.get("MESH_TLS_CERT"),
                   help="client certificate, for a router with tls.client_auth = require (env MESH_TLS_CERT)")
    p.add_argument("--tls-key", default=os.environ.get("MESH_TLS_KEY"),
                   help="private key of --tls-cert (env MESH_TLS_KEY)")
    p.add_argument("--tls-server-name", default=None,
                   help="name expected in the router's certificate, when it differs from the --router host")


def _model_info_options(p: argparse.ArgumentParser, *, required: bool) -> None:
    p.add_argument("--type", required=required,
                   help="model type: sklearn, xgboost, lightgbm, onnx, openvino, torchscript")
    p.add_argument("--path", help="model file or directory: a local path or file:// URI; a URI in object "
                   "storage (s3://, gs://, https://, pvc://); or, with --storage-key, the path in that key's bucket")
    p.add_argument("--key", help="ModelInfo.key, a JSON object (modelmesh-serving's: storage_key, storage_params...)")
    p.add_argument("--storage-key", help="storage key the runtimes pull the model with (a file in their "
                   "storage.config_dir); --path is then the object or prefix in its bucket")
    p.add_argument("--storage-param", action="append", metavar="NAME=VALUE",
                   help="storage parameter overriding the key's field, e.g. bucket=models (repeatable)")
    p.add_argument("--batch-max-size", type=int, metavar="ROWS",
                   help="dynamic batching: the most rows merged into one prediction (1: off), written into "
                        "the key as batch_max_size; default: the runtime's runtime.batch_max_size")
    p.add_argument("--batch-max-wait-ms", type=float, metavar="MS",
                   help="dynamic batching: the longest a batch waits for more requests (key batch_max_wait_ms)")
    p.add_argument("--size-hint", help="expected in-memory size (e.g. 200MiB); else predicted")
    p.add_argument("--min-copies", type=int, default=0)
    p.add_argument("--max-copies", type=int, default=0)
    p.add_argument("--label", action="append", help="label an instance must carry (repeatable)")
    p.add_argument("--gpu", choices=("required", "preferred"), default="",
                   help="run on a GPU: only there (required), or when one has room (preferred); "
                        "onnx and torchscript models")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mesh", description="Serve many ML models from a few runtimes.")
    parser.add_argument("--version", action="version", version=f"mesh-serving {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def embedded(p: argparse.ArgumentParser) -> None:
        p.add_argument("--runtimes", type=int, default=2, help="runtime processes (default 2)")
        p.add_argument("--port", type=int, default=8033, help="router port (default 8033)")
        p.add_argument("--registry", help="use this etcd (etcd://host:port) instead of a private one")
        p.add_argument("--capacity", help="model memory per runtime, e.g. 256MiB "
                       "(default: 40%% of RAM shared by the runtimes)")
        p.add_argument("--data-dir", type=Path, help="where the private etcd keeps its data "
                       "(default: a temporary directory, removed at exit)")
        p.add_argument("--config", type=Path, help="settings file (TOML)")
        # --- mesh up logs (issue 20, part 5) ---
        p.add_argument("--logs", type=Path, metavar="DIR",
                       help="keep this run's logs in DIR (default: a new directory under "
                       "$XDG_STATE_HOME/mesh-serving/up, ~/.local/state/... by default; the newest 10 runs are kept)")
        p.add_argument("--log-max-size", metavar="SIZE",
                       help="rotate a component's log past this size, keeping one older file (default 10MiB)")
        # --- end mesh up logs ---
        p.add_argument("--direct-ports", action="store_true",  # smart clients (docs/client.md)
                       help="give every runtime a direct port (runtime.direct_port) for smart clients")

    up = sub.add_parser("up", help="run a router and runtimes on this machine (embedded mode)")
    embedded(up)
    up.add_argument("--example", action="store_true",
                    help="also train and register ~100 models and send Zipf traffic at them")
    up.add_argument("--duration", type=float, default=20.0, help="seconds of example traffic")
    demo = sub.add_parser("demo", help="same as `mesh up --example`: a self-contained demonstration")
    embedded(demo)
    demo.add_argument("--duration", type=float, default=20.0, help="seconds of traffic")
    demo.add_argument("--models", type=int, default=100, help="models to train and register")
    up.add_argument("--models", type=int, default=100, help="models for --example")

    serve = sub.add_parser("serve", help="run one component in the foreground (production)")
    serve.add_argument("component", choices=["router", "runtime", "controller"])
    serve.add_argument("--config", type=Path, help="settings file (TOML); env MESH_CONFIG")
    serve.add_argument("--registry", help="registry URL (overrides registry.url)")
    serve.add_argument("--port", type=int, help="gRPC port (overrides router.port / runtime.port)")
    serve.add_argument("--ready-file", type=Path, help=argparse.SUPPRESS)

    model = sub.add_parser("model", help="register, list, inspect and unregister models")
    msub = model.add_subparsers(dest="action", required=True)
    p = msub.add_parser("register", help="register a model (metadata only; it loads on first use), or many "
                        "with --from")
    p.add_argument("model_id", nargs="?")
    _model_info_options(p, required=False)
    p.add_argument("--from", dest="from_file", metavar="FILE",
                   help="register the models of FILE (JSON lines or CSV with a header; fields as these options: "
                        "id, type, path, key, storage_key, storage_params, size_hint, min_copies, max_copies, "
                        "labels, gpu, load_now; '-' reads stdin) through registerModels, in batches")
    p.add_argument("--batch-size", type=int, default=1000, help="with --from: models a call (at most 1,000)")
    p.add_argument("--all-or-nothing", action="store_true",
                   help="with --from: register every model or none (the file must fit one batch)")
    p.add_argument("--load-now", action="store_true", help="load it now instead of on first use")
    p.add_argument("--no-check", action="store_true",
                   help="do not ask the runtime that would load it whether its file or storage key exists")
    p.add_argument("--sync", action="store_true", help="with --load-now: wait for the load")
    _client_options(p)
    p = msub.add_parser("list", help="list registered models")
    p.add_argument("--prefix", help="only IDs starting with this")
    p.add_argument("--limit", type=int, default=1000)
    _client_options(p)
    for action, text in (("status", "show a model's status and copies"),
                         ("unregister", "unregister a model (its copies are unloaded)"),
                         ("load", "load a model now if no copy is loaded")):
        p = msub.add_parser(action, help=text)
        p.add_argument("model_id")
        if action == "load":
            p.add_argument("--sync", action="store_true", help="wait for the load")
            p.add_argument("--retry", action="store_true",
                           help="try again now a model whose load failed (after fixing its file): its "
                           "failures are otherwise remembered for registry.failure_ttl_s; implies --sync")
        _client_options(p)

    vmodel = sub.add_parser("vmodel", help="manage vModels (aliases that switch models safely)")
    vsub = vmodel.add_subparsers(dest="action", required=True)
    p = vsub.add_parser("set", help="create a vModel or point it at a new target model")
    p.add_argument("vmodel_id")
    p.add_argument("target", help="the concrete model ID to serve")
    _model_info_options(p, required=False)
    p.add_argument("--owner")
    p.add_argument("--load-now", action="store_true")
    p.add_argument("--force", action="store_true", help="switch now, even before the target loads")
    p.add_argument("--sync", action="store_true", help="wait until the switch is done")
    p.add_argument("--auto-delete", action="store_true",
                   help="with --type: delete the target model once no vModel uses it")
    p.add_argument("--expected-target", help="only if the current target is this (compare-and-swap)")
    _client_options(p)
    for action in ("status", "delete"):
        p = vsub.add_parser(action, help=f"{action} a vModel")
        p.add_argument("vmodel_id")
        p.add_argument("--owner")
        _client_options(p)
    # --- traffic splits (canaries) ---
    p = vsub.add_parser("split", help="share a vModel's requests among models by weight (a canary)")
    p.add_argument("vmodel_id")
    p.add_argument("targets", nargs="+", metavar="MODEL=WEIGHT",
                   help="registered models and their percent of the requests (summing to 100)")
    p.add_argument("--sticky-header", default="",
                   help="keep each client on one model by this request header's value (e.g. x-user-id)")
    p.add_argument("--owner")
    p.add_argument("--sync", action="store_true", help="wait until every target is loaded")
    _client_options(p)
    p = vsub.add_parser("promote", help="make one target of a split the vModel's sole model")
    p.add_argument("vmodel_id")
    p.add_argument("model", nargs="?", default="", help="the target to promote (default: the canary)")
    p.add_argument("--owner")
    p.add_argument("--sync", action="store_true", help="wait until the vModel has switched to it")
    _client_options(p)
    # --- end traffic splits ---

    p = sub.add_parser("infer", help="send one V2 inference request")
    p.add_argument("model", help="model ID (or vModel ID with --vmodel)")
    p.add_argument("--input", action="append",
                   help="JSON array, optionally NAME=JSON; repeat for several inputs")
    p.add_argument("--datatype", help="V2 datatype of the inputs (default FP64 / INT64 from the JSON)")
    p.add_argument("--output", action="append", help="output to return (repeatable; default: all)")
    p.add_argument("--vmodel", action="store_true",
                   help="MODEL must be a vModel ID (sent as mm-vmodel-id); without it, MODEL is sent as "
                   "model_name, which the router resolves as a vModel, a graph or a model, in that order")
    # --- inference graphs (issue 17) ---
    p.add_argument("--graph", action="store_true",
                   help="MODEL is an inference graph ID (mesh graph set); a graph's ID also resolves without it")
    # --- end inference graphs ---
    _client_options(p)

    # --- fleet status and model metadata (issue 20): mesh status, mesh top, mesh model metadata ---
    from mesh.cli.status_args import add_status_parsers

    add_status_parsers(sub, msub, _client_options)
    # --- end fleet status ---

    p = sub.add_parser("settings", help="list every setting with its default, unit and meaning")
    p.add_argument("--json", action="store_true")

    from mesh.cli.config_cmd import add_config_parser
    from mesh.cli.sim import add_sim_parser

    add_sim_parser(sub)  # mesh sim gen|run: offline traces and the placement simulator
    add_config_parser(sub)  # mesh config from-modelmesh: model-serving-config -> mesh.toml
    # --- inference graphs (issue 17) ---
    from mesh.cli.graph_args import add_graph_parser

    add_graph_parser(sub, _client_options)  # mesh graph set|status|delete|list
    # --- end inference graphs ---
    return parser


def main(argv: list[str] | None = None) -> None:
    # gRPC core logs handshake failures to stderr on its own; the CLI says what went wrong in one line.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    args = build_parser().parse_args(argv)
    try:
        code = run(args)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader stopped early (`mesh model list | head`): what it read is what it wanted. Python
        # would print a traceback, and another error at exit while flushing stdout; point stdout at
        # /dev/null so that the exit flush finds nothing to write.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = 0
    sys.exit(code)


def run(args: argparse.Namespace) -> int:
    # mesh.cli.client (gRPC, numpy) is imported only by the commands that talk to a router: `mesh up`
    # stays running as the supervisor of the processes it starts, and what it imports is resident
    # for as long as the mesh runs (about 25 MB of the 60 its process held when it imported them).
    from mesh.cli.errors import CliError, fail

    try:
        if args.command == "serve":
            return _serve(args)
        if args.command in ("up", "demo"):
            from mesh.embedded.up import run_up

            return run_up(args, example=args.command == "demo" or args.example)
        from mesh.cli.client import RouterClient, channel_credentials
        from mesh.cli.commands import infer_command, model_command, settings_command, vmodel_command

        if args.command == "settings":
            return settings_command(args)
        if args.command == "sim":
            from mesh.cli.sim import sim_command

            return sim_command(args)
        if args.command == "config":
            from mesh.cli.config_cmd import config_command

            return config_command(args)
        # The token is read from the environment here rather than as the option's default, so that
        # `--help` never prints it.
        token = args.token or _token_file(args.token_file or os.environ.get("MESH_TOKEN_FILE")) \
            or os.environ.get("MESH_TOKEN") or None
        client = RouterClient(args.router, args.timeout, token=token,
                              credentials=channel_credentials(args.tls_ca, args.tls_cert, args.tls_key),
                              server_name=args.tls_server_name)
        try:
            from mesh.cli.graph_cmd import graph_command  # inference graphs (issue 17)

            # --- fleet status and model metadata (issue 20) ---
            from mesh.cli.status_args import status_handler

            special = status_handler(args)
            if special is not None:
                return special(args, client)
            # --- end fleet status ---
            handler = {"model": model_command, "vmodel": vmodel_command, "infer": infer_command,
                       "graph": graph_command}
            return handler[args.command](args, client)
        finally:
            client.close()
    except CliError as exc:
        return fail(str(exc), exc.exit_code)
    except MeshError as exc:
        return fail(exc.message, 2)
    except KeyboardInterrupt:
        return 130


def _serve(args: argparse.Namespace) -> int:
    from mesh.cli.errors import fail
    from mesh.cli.serve import run_component
    from mesh.settings import load_settings

    overrides: dict[str, dict[str, object]] = {}
    if args.registry:
        overrides["registry"] = {"url": args.registry}
    if args.port is not None:
        if args.component == "controller":
            return fail("--port does not apply to the controller (it serves no port)", 2)
        overrides[args.component] = {"port": args.port}
    settings = load_settings(args.config, overrides=overrides)
    return run_component(args.component, settings, args.ready_file)


if __name__ == "__main__":
    main()
