"""``mesh config from-modelmesh FILE [--out mesh.toml]``: modelmesh-serving's ``model-serving-config``
ConfigMap (or its ``config.yaml``) as a ``mesh.toml`` fragment.

The TOML goes to stdout or ``--out``; what each key became (a setting, a change to deploy/, not
supported) and the warnings go to stderr, one line each, so that ``> mesh.toml`` keeps only TOML.
Input that cannot be used (a missing file, not YAML, a value of the wrong type, over 1 MiB) is one line
on stderr and exit status 2, as everywhere in ``mesh``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from mesh.errors import InvalidArgument


def add_config_parser(sub: Any) -> None:
    """Add ``config from-modelmesh`` to the ``mesh`` subcommands ``sub``."""
    config = sub.add_parser("config", help="turn other systems' configuration into mesh settings")
    csub = config.add_subparsers(dest="action", required=True)
    p = csub.add_parser("from-modelmesh", help="modelmesh-serving's model-serving-config ConfigMap as mesh.toml "
                        "settings, with a note for each key (docs/migrating-from-modelmesh.md)")
    p.add_argument("file", help="the ConfigMap as YAML (kubectl get configmap model-serving-config -o yaml), or "
                   "the content of its config.yaml; - reads stdin")
    p.add_argument("--out", type=Path, help="write the TOML here instead of stdout")


def config_command(args: argparse.Namespace) -> int:
    # Imported here, not at the top: building the parser for every `mesh` command should not pay for
    # YAML and the mapping table.
    from mesh.compat.modelmesh_config import MAX_BYTES, convert

    try:
        conversion = convert(_read(args.file, MAX_BYTES + 1))
    except InvalidArgument as exc:
        raise InvalidArgument(f"{'stdin' if args.file == '-' else args.file}: {exc.message}") from None
    if args.out is None:
        sys.stdout.write(conversion.toml())
    else:
        try:
            args.out.write_text(conversion.toml())
        except OSError as exc:
            raise InvalidArgument(f"--out {args.out}: {exc.strerror or exc}") from None
    for note in conversion.notes:
        print(note, file=sys.stderr)
    if args.out is not None:
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _read(name: str, limit: int) -> bytes:
    """At most ``limit`` bytes: one past the largest accepted refuses a larger file without reading it all."""
    if name == "-":
        return sys.stdin.buffer.read(limit)
    try:
        with open(name, "rb") as f:
            return f.read(limit)
    except OSError as exc:
        raise InvalidArgument(exc.strerror or str(exc)) from None
