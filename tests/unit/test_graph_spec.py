"""parse_graph: KServe InferenceGraph specs in, checked graphs out; every refusal names its place."""

from __future__ import annotations

from typing import Any

import pytest

from mesh.errors import InvalidArgument
from mesh.graphs.spec import (
    MAX_CONDITION,
    MAX_NAME,
    MAX_NODES,
    MAX_SPEC_BYTES,
    MAX_STEPS,
    ROOT,
    graph_models,
    parse_graph,
    spec_json,
)


def nodes(**by_name: Any) -> dict[str, Any]:
    return {"nodes": by_name}


def seq(*steps: Any) -> dict[str, Any]:
    return {"routerType": "Sequence", "steps": list(steps)}


def refused(spec: Any, *fragments: str, graph_id: str = "g") -> str:
    with pytest.raises(InvalidArgument) as info:
        parse_graph(graph_id, spec)
    message = info.value.message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_kserve_model_chainer_parses_with_defaults() -> None:
    graph = parse_graph("chain", nodes(root=seq(
        {"serviceName": "s1"},
        {"serviceName": "s2", "data": "$response"},
        {"nodeName": "ens", "data": "$response", "dependency": "Hard", "name": "last"}),
        ens={"routerType": "Ensemble", "steps": [{"serviceName": "a"}, {"serviceName": "b"}]}))
    root = graph.nodes[ROOT]
    assert root.router_type == "Sequence"
    first, second, third = root.steps
    assert (first.name, first.model, first.data, first.hard) == ("s1", "s1", "$request", False)
    assert (second.name, second.data) == ("s2", "$response")
    assert (third.name, third.node, third.model, third.hard) == ("last", "ens", "", True)
    assert graph_models(graph) == frozenset({"s1", "s2", "a", "b"})


def test_switch_and_splitter_fields() -> None:
    graph = parse_graph("g", nodes(
        root={"routerType": "Switch", "steps": [
            {"serviceName": "a", "condition": "parameters.tenant"},
            {"nodeName": "split", "condition": "@this"}]},
        split={"routerType": "Splitter", "steps": [
            {"serviceName": "b", "weight": 30}, {"serviceName": "c", "weight": 70}]}))
    switch = graph.nodes["root"]
    assert switch.steps[0].condition is not None
    assert switch.steps[0].condition.text == "parameters.tenant"
    assert [s.weight for s in graph.nodes["split"].steps] == [30, 70]


def test_kserve_router_pod_fields_are_accepted_and_ignored() -> None:
    spec = {"nodes": {"root": seq({"serviceName": "a"})}, "resources": {"limits": {"cpu": "1"}},
            "timeout": 30, "minReplicas": 0, "maxReplicas": 3, "affinity": {}, "scaleMetric": "rps"}
    assert parse_graph("g", spec).nodes[ROOT].steps[0].model == "a"


def test_spec_json_is_canonical() -> None:
    assert spec_json({"b": 1, "a": {"d": 2, "c": 3}}) == b'{"a":{"c":3,"d":2},"b":1}'
    with pytest.raises(InvalidArgument, match="not JSON"):
        spec_json({1: "non-string key"})


@pytest.mark.parametrize(("spec", "fragments"), [
    ([], ("graph 'g'", "must be a JSON object")),
    ({"nodes": {}}, ("non-empty object",)),
    ({"nodes": {"a": seq({"serviceName": "m"})}}, ("no node named 'root'",)),
    ({"nodes": {"root": seq({"serviceName": "m"})}, "bogus": 1}, ("unknown spec field", "'bogus'")),
    (nodes(root={"routerType": "Chain", "steps": [{"serviceName": "m"}]}),
     ("node 'root'", "routerType 'Chain'", "Sequence, Switch, Ensemble, Splitter")),
    (nodes(root={"routerType": "Sequence", "steps": []}), ("node 'root'", "non-empty list")),
    (nodes(root={"routerType": "Sequence", "steps": [{"serviceName": "m"}], "routes": []}),
     ("node 'root'", "unknown field", "'routes'")),
    (nodes(root=seq({"serviceName": "m"}, {})), ("node 'root', step 2", "names no target")),
    (nodes(root=seq({"serviceName": "m", "nodeName": "x"})), ("step 1 ('m')", "both serviceName and nodeName")),
    (nodes(root=seq({"serviceUrl": "http://evil.example/"})), ("step 1", "serviceUrl is not supported",
                                                                "arbitrary URL")),
    (nodes(root=seq({"serviceName": "m"}, {"nodeName": "nowhere"})),
     ("node 'root', step 2 ('nowhere')", "names no node", "'root'")),
    (nodes(root=seq({"serviceName": "m", "data": "$response.predictions"})), ("step 1 ('m')", "data",
                                                                              "'$request' or '$response'")),
    (nodes(root=seq({"serviceName": "m", "dependency": "hard"})), ("step 1 ('m')", "dependency 'hard'")),
    (nodes(root=seq({"serviceName": "m", "mapPredictionsToInstances": True})), ("KServe V1",)),
    (nodes(root=seq({"serviceName": "m", "colour": "red"})), ("step 1 ('m')", "unknown field", "'colour'")),
    (nodes(root=seq({"serviceName": "m", "name": "x"}, {"serviceName": "n", "name": "x"})),
     ("node 'root', step 2 ('x')", "name 'x' is used by an earlier step")),
    (nodes(root={"routerType": "Ensemble", "steps": [{"serviceName": "m"}, {"serviceName": "m"}]}),
     ("node 'root', step 2 ('m')", "another step of this Ensemble is named 'm'")),
    (nodes(root=seq("m")), ("step 1", "must be an object")),
    (nodes(root=seq({"serviceName": ""} | {"nodeName": ""})), ("names no target",)),
])
def test_refusals_name_the_place(spec: Any, fragments: tuple[str, ...]) -> None:
    refused(spec, "graph 'g'", *fragments)


def test_a_step_naming_its_own_node_is_a_cycle() -> None:
    refused(nodes(root=seq({"nodeName": "root"})), "node 'root', step 1 ('root')", "cycle: root -> root")


def test_a_longer_cycle_is_named_by_its_path() -> None:
    message = refused(nodes(
        root=seq({"serviceName": "m"}, {"nodeName": "a"}),
        a={"routerType": "Ensemble", "steps": [{"serviceName": "x"}, {"nodeName": "b", "name": "to-b"}]},
        b=seq({"nodeName": "c"}),
        c={"routerType": "Switch", "steps": [{"nodeName": "a", "condition": "@this"}]}), "cycle")
    assert "a -> b -> c -> a" in message


def test_a_cycle_away_from_root_is_refused_too() -> None:
    refused(nodes(root=seq({"serviceName": "m"}), x=seq({"nodeName": "y"}), y=seq({"nodeName": "x"})),
            "cycle: x -> y -> x")


def test_a_diamond_is_not_a_cycle() -> None:
    graph = parse_graph("g", nodes(
        root={"routerType": "Ensemble", "steps": [{"nodeName": "a"}, {"nodeName": "b"}]},
        a=seq({"nodeName": "leaf"}), b=seq({"nodeName": "leaf"}), leaf=seq({"serviceName": "m"})))
    assert set(graph.nodes) == {"root", "a", "b", "leaf"}


def test_a_deep_chain_of_nodes_is_checked_without_recursion() -> None:
    chain = {f"n{i}": seq({"nodeName": f"n{i + 1}"}) for i in range(MAX_NODES - 2)}
    chain[f"n{MAX_NODES - 2}"] = seq({"serviceName": "m"})
    chain["root"] = seq({"nodeName": "n0"})
    assert len(parse_graph("g", {"nodes": chain}).nodes) == MAX_NODES


@pytest.mark.parametrize(("steps", "fragments"), [
    ([{"serviceName": "a", "weight": 50}, {"serviceName": "b", "weight": 40}], ("sum to 90", "must sum to 100")),
    ([{"serviceName": "a", "weight": 100}, {"serviceName": "b"}], ("step 2 ('b')", "needs a weight")),
    ([{"serviceName": "a", "weight": 150}, {"serviceName": "b", "weight": -50}], ("step 1 ('a')", "0 to 100")),
    ([{"serviceName": "a", "weight": 50.5}, {"serviceName": "b", "weight": 49.5}], ("step 1 ('a')", "integer")),
    ([{"serviceName": "a", "weight": True}], ("integer",)),
])
def test_splitter_weights(steps: list[Any], fragments: tuple[str, ...]) -> None:
    refused(nodes(root={"routerType": "Splitter", "steps": steps}), "node 'root'", *fragments)


def test_a_weight_outside_a_splitter_is_refused() -> None:
    refused(nodes(root=seq({"serviceName": "a", "weight": 100})), "step 1 ('a')", "only for Splitter")


def test_a_zero_weight_is_allowed() -> None:
    graph = parse_graph("g", nodes(root={"routerType": "Splitter", "steps": [
        {"serviceName": "a", "weight": 0}, {"serviceName": "b", "weight": 100}]}))
    assert [s.weight for s in graph.nodes[ROOT].steps] == [0, 100]


def test_conditions_where_they_mean_something() -> None:
    refused(nodes(root={"routerType": "Switch", "steps": [{"serviceName": "a"}]}),
            "step 1 ('a')", "a Switch step needs a condition", "@this")
    refused(nodes(root={"routerType": "Ensemble", "steps": [{"serviceName": "a", "condition": "x"}]}),
            "step 1 ('a')", "only for Switch and Sequence")
    refused(nodes(root={"routerType": "Splitter", "steps": [{"serviceName": "a", "weight": 100, "condition": "x"}]}),
            "only for Switch and Sequence")
    refused(nodes(root=seq({"serviceName": "a", "condition": "x"})), "step 1 ('a')", "first step")
    graph = parse_graph("g", nodes(root=seq({"serviceName": "a"}, {"serviceName": "b", "condition": "outputs.0"})))
    assert graph.nodes[ROOT].steps[1].condition is not None


def test_a_bad_condition_is_refused_with_its_column() -> None:
    refused(nodes(root={"routerType": "Switch", "steps": [{"serviceName": "a", "condition": "inputs.#(x=="}]}),
            "node 'root', step 1 ('a')", "condition 'inputs.#(x=='", "column 9", "not closed")
    refused(nodes(root={"routerType": "Switch", "steps": [{"serviceName": "a", "condition": "a|b"}]}),
            "column 2", "pipes")
    refused(nodes(root={"routerType": "Switch", "steps": [{"serviceName": "a", "condition": 5}]}),
            "not a string")


def test_bounds() -> None:
    many = {f"n{i}": seq({"serviceName": "m"}) for i in range(MAX_NODES)}
    many["root"] = seq({"serviceName": "m"})
    refused({"nodes": many}, f"{MAX_NODES + 1} nodes", f"limit is {MAX_NODES}")
    refused(nodes(root=seq(*[{"serviceName": "m"}] * (MAX_STEPS + 1))), "node 'root'",
            f"{MAX_STEPS + 1} steps")
    refused(nodes(root=seq({"serviceName": "m" * (MAX_NAME + 1)})), "serviceName", f"limit is {MAX_NAME}")
    refused({"nodes": {"root": seq({"serviceName": "m"}), "x" * 300: seq({"serviceName": "m"})}},
            "a node name", f"limit is {MAX_NAME}")
    refused(nodes(root=seq({"nodeName": "x" * 300})), "nodeName is 300 characters", f"limit is {MAX_NAME}")
    refused(nodes(root={"routerType": "Switch", "steps": [
        {"serviceName": "a", "condition": "a" * (MAX_CONDITION + 1)}]}), f"limit is {MAX_CONDITION}")
    refused(nodes(root=seq({"serviceName": "m", "name": "x\ny"})), "control character")
    big = {"nodes": {"root": seq({"serviceName": "m"})}, "resources": {"pad": "x" * MAX_SPEC_BYTES}}
    refused(big, f"the limit is {MAX_SPEC_BYTES}")


def test_graph_ids_obey_the_model_id_rules() -> None:
    with pytest.raises(InvalidArgument, match="graph"):
        parse_graph("", nodes(root=seq({"serviceName": "m"})))
    with pytest.raises(InvalidArgument, match="NUL"):
        parse_graph("a\x00b", nodes(root=seq({"serviceName": "m"})))
