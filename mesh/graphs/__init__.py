"""Inference graphs (KServe's ``InferenceGraph``), executed by the router: no pod per graph.

Pure logic and protobuf messages only (no grpc, no HTTP framework, no registry client), so the
data plane may import it:

- :mod:`mesh.graphs.spec`: the definition, checked once (:func:`parse_graph`);
- :mod:`mesh.graphs.condition`: Switch conditions, a documented subset of GJSON;
- :mod:`mesh.graphs.v2`: the V2 messages between steps, spliced as bytes;
- :mod:`mesh.graphs.executor`: :class:`GraphRunner`, one request through a graph.
"""

from mesh.graphs.condition import Condition, compile_condition
from mesh.graphs.executor import GraphError, GraphRunner, Headers, StepCall
from mesh.graphs.spec import ROOT, Graph, Node, Step, graph_models, parse_graph, spec_json

__all__ = ["ROOT", "Condition", "Graph", "GraphError", "GraphRunner", "Headers", "Node", "Step", "StepCall",
           "compile_condition", "graph_models", "parse_graph", "spec_json"]
