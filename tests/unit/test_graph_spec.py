"""parse_graph: KServe InferenceGraph specs in, checked graphs out; every refusal names its place."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.errors import InvalidArgument
from mesh.graphs.spec import (
    MAX_CALLS,
    MAX_COMPONENTS,
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


@pytest.mark.parametrize(("step", "fragment"), [
    ({"serviceName": 5}, "serviceName must be a string"),
    ({"serviceName": "m", "data": {}}, "data must be a string"),
    ({"serviceName": "m", "dependency": 0}, "dependency must be a string"),
    ({"nodeName": ["root"]}, "nodeName must be a string"),
    ({"serviceName": "m", "name": 3}, "the step name must be a non-empty string"),
    ({"serviceName": "m", "mapPredictionsToInstances": "no"}, "KServe V1"),
])
def test_field_types_are_checked(step: dict[str, Any], fragment: str) -> None:
    refused(nodes(root=seq(step)), "node 'root', step 1", fragment)


def test_empty_and_null_optional_fields_take_kserve_defaults() -> None:
    spec = nodes(root=seq({"serviceName": "m", "data": "", "dependency": None, "nodeName": "", "serviceUrl": "",
                           "mapPredictionsToInstances": False}))
    step = parse_graph("g", spec).nodes[ROOT].steps[0]
    assert (step.data, step.hard, step.node) == ("$request", False, "")


JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.text(max_size=8)
                    | st.sampled_from(["root", "a", "m", "Sequence", "Switch", "Ensemble", "Splitter", "$response",
                                       "Hard", "@this", "inputs.#(name==x)", "nodes", "steps", 50, 100]),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
                        st.sampled_from(["nodes", "root", "a", "routerType", "steps", "serviceName", "nodeName",
                                         "name", "data", "weight", "condition", "dependency", "x"]), inner, max_size=5),
                    max_leaves=30)


@settings(max_examples=200, deadline=None)
@given(JSON)
def test_any_json_is_a_graph_or_a_refusal(spec: Any) -> None:
    try:
        graph = parse_graph("g", spec)
    except InvalidArgument as e:
        assert e.message.startswith("graph 'g': ")
    else:
        assert ROOT in graph.nodes


def test_two_parses_of_one_spec_are_equal_graphs() -> None:
    spec = nodes(root={"routerType": "Switch", "steps": [
        {"serviceName": "a", "condition": 'inputs.#(name%"x*")'}, {"nodeName": "n", "condition": "k*y"}]},
        n=seq({"serviceName": "b"}))
    assert parse_graph("g", spec) == parse_graph("g", spec)
    other = nodes(root={"routerType": "Switch", "steps": [
        {"serviceName": "a", "condition": 'inputs.#(name%"y*")'}, {"nodeName": "n", "condition": "k*y"}]},
        n=seq({"serviceName": "b"}))
    assert parse_graph("g", spec) != parse_graph("g", other)


# --- calls per request (review finding 1) and compiled size (finding 6) -------------------------


def ens(*steps: Any) -> dict[str, Any]:
    return {"routerType": "Ensemble", "steps": list(steps)}


def test_the_worst_case_calls_per_request_are_computed_sum_for_sequence_and_ensemble_max_for_switch() -> None:
    switch = {"routerType": "Switch", "steps": [{"serviceName": "a", "condition": "@this"},
                                                {"nodeName": "e", "condition": "x"}]}
    graph = parse_graph("g", nodes(
        root=seq({"serviceName": "m"}, {"nodeName": "sw"}, {"nodeName": "e", "name": "again"}),
        sw=switch,
        e=ens({"serviceName": "a"}, {"serviceName": "b"}, {"nodeName": "leaf"}),
        leaf=seq({"serviceName": "c"}, {"serviceName": "d"})))
    # e = a + b + leaf(2) = 4; sw = max(1, e) = 4; root = 1 + 4 + 4 = 9
    assert graph.calls == 9
    splitter = {"routerType": "Splitter", "steps": [{"serviceName": "a", "weight": 50},
                                                    {"nodeName": "e", "weight": 50}]}
    assert parse_graph("g", nodes(root=splitter, e=ens({"serviceName": "a"}, {"serviceName": "b"}))).calls == 2
    assert parse_graph("g", nodes(root=seq({"serviceName": "m"}))).calls == 1


def test_a_graph_that_multiplies_calls_is_refused_with_its_cost() -> None:
    # Nested Ensembles: 64 levels of 64 steps would be 64^64 calls for one request (the review's
    # repro). Here 3 levels of 8: 8^3 = 512 calls, refused; its cost is named.
    levels = 3
    spec: dict[str, Any] = {}
    for i in range(levels):
        child = {"nodeName": f"n{i + 1}"} if i + 1 < levels else {"serviceName": "m"}
        spec["root" if i == 0 else f"n{i}"] = ens(*[{**child, "name": f"s{j}"} for j in range(8)])
    refused({"nodes": spec}, "up to 512 model calls", f"the limit is {MAX_CALLS} calls per request")
    # The exponential case is answered at once, with an order of magnitude.
    deep: dict[str, Any] = {}
    for i in range(MAX_NODES):
        child = {"nodeName": f"n{i + 1}"} if i + 1 < MAX_NODES else {"serviceName": "m"}
        deep["root" if i == 0 else f"n{i}"] = ens(*[{**child, "name": f"s{j}"} for j in range(4)])
    refused({"nodes": deep}, "up to about 10^38 model calls")
    # At the bound exactly: accepted.
    flat = {"root": ens(*[{"nodeName": "s", "name": f"s{j}"} for j in range(64)]),
            "s": seq(*[{"serviceName": "m"}] * 4)}
    assert parse_graph("g", {"nodes": flat}).calls == MAX_CALLS
    flat["s"] = seq(*[{"serviceName": "m"}] * 5)
    refused({"nodes": flat}, "up to 320 model calls")


def test_the_conditions_of_a_graph_are_bounded_in_components() -> None:
    cond = ".".join(["k"] * 500)  # 999 characters, 500 components
    ok = nodes(root={"routerType": "Switch", "steps": [
        {"serviceName": "m", "name": f"s{j}", "condition": cond} for j in range(4)]})
    assert parse_graph("g", ok)
    over = nodes(root={"routerType": "Switch", "steps": [
        {"serviceName": "m", "name": f"s{j}", "condition": cond} for j in range(5)]})
    refused(over, "2500 path components", f"the limit is {MAX_COMPONENTS} per graph")


def test_the_spec_bound_is_64_kib() -> None:
    assert MAX_SPEC_BYTES == 64 * 1024
    pad = {"nodes": {"root": seq({"serviceName": "m"})}, "resources": {"pad": "x" * (MAX_SPEC_BYTES - 100)}}
    assert parse_graph("g", pad)
