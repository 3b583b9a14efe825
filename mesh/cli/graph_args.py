"""The arguments of ``mesh graph`` (``mesh.cli.graph_cmd`` runs the command).

Apart from the command because every ``mesh`` invocation builds the whole parser, ``mesh up`` too,
which then stays resident as the supervisor of the mesh; the command's module imports the graph
spec's checks, protobuf and PyYAML, which only ``mesh graph`` needs.
"""

from __future__ import annotations

from typing import Any


def add_graph_parser(sub: Any, client_options: Any) -> None:
    graph = sub.add_parser("graph", help="define, inspect and delete inference graphs (KServe InferenceGraph)")
    gsub = graph.add_subparsers(dest="action", required=True)
    p = gsub.add_parser("set", help="define a graph, or replace its definition")
    p.add_argument("graph_id")
    p.add_argument("-f", "--file", required=True,
                   help="YAML or JSON: an InferenceGraph manifest or only its spec ('-': standard input)")
    p.add_argument("--owner", help="owner: only calls naming it may change or delete the graph")
    client_options(p)
    p = gsub.add_parser("status", help="show a graph's definition and the status of its models")
    p.add_argument("graph_id")
    client_options(p)
    p = gsub.add_parser("delete", help="delete a graph (its models stay)")
    p.add_argument("graph_id")
    p.add_argument("--owner")
    client_options(p)
    p = gsub.add_parser("list", help="list defined graphs")
    p.add_argument("--prefix", help="only IDs starting with this")
    p.add_argument("--limit", type=int, default=1000)
    client_options(p)
