"""Switch conditions: the GJSON subset (against GJSON's documented answers), refusals with columns,
and bounded evaluation."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.errors import InvalidArgument
from mesh.graphs.condition import (
    MAX_ARRAY_OPS,
    MAX_NESTING,
    MAX_WORK,
    MISSING,
    Budget,
    Glob,
    Lazy,
    compile_condition,
)

# GJSON's README document.
DOC: dict[str, Any] = {
    "name": {"first": "Tom", "last": "Anderson"},
    "age": 37,
    "children": ["Sara", "Alex", "Jack"],
    "fav.movie": "Deer Hunter",
    "friends": [
        {"first": "Dale", "last": "Murphy", "age": 44, "nets": ["ig", "fb", "tw"]},
        {"first": "Roger", "last": "Craig", "age": 68, "nets": ["fb", "tw"]},
        {"first": "Jane", "last": "Murphy", "age": 47, "nets": ["ig", "tw"]},
    ],
    "nothing": None,
    "flags": [True, False],
}


def get(path: str, doc: Any = DOC) -> Any:
    return compile_condition(path).get(doc)


@pytest.mark.parametrize(("path", "expected"), [
    ("name.last", "Anderson"),
    ("age", 37),
    ("children", ["Sara", "Alex", "Jack"]),
    ("children.#", 3),
    ("children.1", "Alex"),
    ("child*.2", "Jack"),
    ("c?ildren.0", "Sara"),
    ("fav\\.movie", "Deer Hunter"),
    ("friends.#.first", ["Dale", "Roger", "Jane"]),
    ("friends.1.last", "Craig"),
    ('friends.#(last=="Murphy").first', "Dale"),
    ('friends.#(last=="Murphy")#.first', ["Dale", "Jane"]),
    ("friends.#(age>45)#.last", ["Craig", "Murphy"]),
    ('friends.#(first%"D*").last', "Murphy"),
    ('friends.#(first!%"D*").last', "Craig"),
    ('friends.#(nets.#(=="fb"))#.first', ["Dale", "Roger"]),
    ("friends.#(age>=68).first", "Roger"),
    ("friends.#(age<=44).first", "Dale"),
    ("friends.#(age<45).first", "Dale"),
    ("friends.#(age!=44).first", "Roger"),
    ("friends.#(age==47).first", "Jane"),
    ("friends.#(age=47).first", "Jane"),
    ('friends.#(first<"E").first', "Dale"),
    ('friends.#(first>="Jane").first', "Roger"),
    ("friends.#(first==Jane).age", 47),                       # a bare value, as KServe's samples write
    ('friends.#(age=="47").first', "Jane"),                   # a quoted number still compares as a number
    ("children.#(%*e*)", "Alex"),
    ('children.#(=="Jack")', "Jack"),
    ("friends.#(first)#.age", [44, 68, 47]),                  # no operator: the path exists
    ("@this.age", 37),
    ("name.@this.first", "Tom"),
    ("[@this].#(age==37).name.first", "Tom"),                 # KServe's sample shape
    ("[age,name.first,missing]", [37, "Tom"]),
    ("[age,name.first].1", "Tom"),
    ("nothing", None),                                        # null exists
    ("flags.#(==true)", True),
    ("flags.#(!=true)", False),
    ("flags.#(==~false)", False),
    ("friends.#(nothing==~null).first", "Dale"),              # GJSON: missing is null-ish
    ("friends.#(age==~true)#.first", ["Dale", "Roger", "Jane"]),
    ("friends.#(age==~*)#.first", ["Dale", "Roger", "Jane"]),
    ("friends.#(nothing==~*)#", []),
])
def test_gjson_answers(path: str, expected: Any) -> None:
    assert get(path) == expected


@pytest.mark.parametrize("path", [
    "missing", "name.middle", "children.3", "children.x", "age.x", "friends.#(age>100)", "friends.#(age>100).first",
    "name.#", 'friends.#(last=="Murphy").middle', "friends.#(first%J?).age", "children.#(<1)",  # text vs "1": as text
    "friends.#(age%4*)", "friends.#(age>abc)", "friends.#(nets==fb)", "flags.#(<false)",
])
def test_missing_paths_do_not_match(path: str) -> None:
    condition = compile_condition(path)
    assert condition.get(DOC) is MISSING
    assert not condition.matches(DOC)


def test_all_matches_exist_even_when_empty_as_in_gjson() -> None:
    assert compile_condition("friends.#(age>100)#").matches(DOC)
    assert not compile_condition("friends.#(age>100)").matches(DOC)


def test_a_v2_request_switch() -> None:
    doc = {"id": "r", "parameters": {"tenant": "gold", "rank": 3},
           "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [0.5, 7.0]},
                      {"name": "s", "datatype": "BYTES", "shape": [1], "data": ["a-red-server"]}]}
    assert compile_condition('parameters.tenant').matches(doc)
    assert compile_condition('parameters.#(rank>2)').matches({"parameters": [doc["parameters"]]})
    assert compile_condition('[@this].#(parameters.tenant=="gold")').matches(doc)
    assert not compile_condition('[@this].#(parameters.tenant=="silver")').matches(doc)
    assert compile_condition('inputs.#(name=="x").data.#(>5)').matches(doc)
    assert not compile_condition('inputs.#(name=="x").data.#(>7)').matches(doc)
    assert compile_condition("inputs.#(data.#(%*red-server*))").matches(doc)
    assert compile_condition("inputs.1.shape.0").get(doc) == 1


def test_lazy_values_are_computed_only_when_reached() -> None:
    calls: list[int] = []

    def data() -> list[int]:
        calls.append(1)
        return [1, 2, 3]

    doc = {"inputs": [{"name": "x", "data": Lazy(data)}]}
    assert compile_condition('inputs.#(name=="x")').matches(doc)
    assert calls == []
    assert compile_condition("inputs.0.data.#(>2)").matches(doc)
    assert compile_condition("inputs.0.data.#").get(doc) == 3
    assert calls == [1]


@pytest.mark.parametrize(("text", "column", "fragment"), [
    ("a|b", 2, "pipes"),
    ("a.@reverse", 3, "'@reverse' is not supported"),
    ("@keys", 1, "'@keys'"),
    ("{a,b}", 1, "object multipaths"),
    ("!true", 1, "literals"),
    ("..a", 1, "JSON Lines"),
    ("a..b", 3, "empty key"),
    ("a.", 2, "ends with '.'"),
    (".a", 1, "empty key"),
    ("a.#[b==1]", 3, "'#[...]'"),
    ("a.#x", 4, "after '#'"),
    ("a.#(b==1", 4, "not closed"),
    ("a.#(b==1]", 9, "closes the '('"),
    ('a.#(b=="x)', 8, "string is not closed"),
    ('a.#(b=="x"y)', 8, "after the quoted value"),
    ("a.#(b==)", 8, "no value after"),
    ("a.#(b==~maybe)", 8, "'~' takes"),
    ("a.#()", 3, "empty query"),
    ("a.#(b==1)x", 10, "after the query"),
    ("[a,b]x", 6, "after ']'"),
    ("[a,]", 4, "empty path"),
    ("a\\", 2, "escapes nothing"),
    ("@this:x", 6, "after '@this'"),
    ("a.@valid", 3, "'@valid'"),
])
def test_refusals_carry_the_column(text: str, column: int, fragment: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        compile_condition(text)
    assert info.value.message.startswith(f"column {column}: "), info.value.message
    assert fragment in info.value.message


def test_an_unknown_modifier_name_is_a_key_as_in_gjson() -> None:
    assert compile_condition("@key").get({"@key": "value"}) == "value"
    assert compile_condition("\\@key").get({"@key": "value"}) == "value"
    assert compile_condition("@thisx").get({"@thisx": 1}) == 1


# GJSON's own tests (gjson_test.go TestTildeQueries, TestModifierDoubleQuotes).
TILDE = {"vals": [{"a": 1, "b": "data"}, {"a": 2, "b": True}, {"a": 3, "b": False}, {"a": 4, "b": "0"},
                  {"a": 5, "b": 0}, {"a": 6, "b": "1"}, {"a": 7, "b": 1}, {"a": 8, "b": "true"},
                  {"a": 9, "b": False}, {"a": 10, "b": None}, {"a": 11}]}


@pytest.mark.parametrize(("path", "expected"), [
    ("vals.#(b==~true)#.a", [2, 6, 7, 8]),
    ("vals.#(b!=~true)#.a", [1, 3, 4, 5, 9, 10, 11]),
    ("vals.#(b==~false)#.a", [3, 4, 5, 9, 10, 11]),
    ("vals.#(b!=~false)#.a", [1, 2, 6, 7, 8]),
    ("vals.#(b==~null)#.a", [10, 11]),
    ("vals.#(b!=~null)#.a", [1, 2, 3, 4, 5, 6, 7, 8, 9]),
    ("vals.#(b==~*)#.a", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]),
    ("vals.#(b!=~*)#.a", [11]),
])
def test_gjson_tilde_queries(path: str, expected: list[int]) -> None:
    assert get(path, TILDE) == expected


def test_gjson_nested_query_with_spaces() -> None:
    doc = {"topology": {"instances": [
        {"service_version": "1.2.3", "service_roles": ["one", "two"]},
        {"service_version": "1.2.4", "service_roles": ["three", "four"]},
        {"service_version": "1.2.2", "service_roles": ["one"]}]}}
    assert get('topology.instances.#( service_roles.#(=="one"))#.service_version', doc) == ["1.2.3", "1.2.2"]


def test_an_empty_condition_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="empty"):
        compile_condition("")


def test_nesting_and_array_operations_are_bounded() -> None:
    deep = "a"
    for _ in range(MAX_NESTING + 1):
        deep = f"[{deep}]"
    with pytest.raises(InvalidArgument, match="nested more than"):
        compile_condition(deep)
    with pytest.raises(InvalidArgument, match="array operations"):
        compile_condition(".".join(["#"] * (MAX_ARRAY_OPS + 1)))
    # The most array operations allowed, on the deepest document they can reach: each '#' but the
    # last maps over the elements, the last counts them.
    ok = compile_condition(".".join(["#"] * MAX_ARRAY_OPS))
    nested: Any = [1]
    expected: Any = 1
    for _ in range(MAX_ARRAY_OPS - 1):
        nested = [nested]
        expected = [expected]
    assert ok.get(nested) == expected


@pytest.mark.parametrize(("pattern", "text", "expected"), [
    ("*", "", True), ("*", "abc", True), ("", "", True), ("", "a", False),
    ("a*", "abc", True), ("*c", "abc", True), ("a*c", "ac", True), ("a*c", "ab", False),
    ("a?c", "abc", True), ("a?c", "ac", False), ("?", "é", True),
    ("*red-server*", "my-red-server-1", True), ("*red-server*", "red-serve", False),
    ("a*b*c", "aXbYc", True), ("a*b*c", "aXcYb", False), ("*a*a*a*", "aaa", True), ("*a*a*a*", "aa", False),
    ("a\\*b", "a*b", True), ("a\\*b", "axb", False), ("*?x", "x", False), ("*?x", "yx", True),
    ("ab*?b", "abxb", True), ("ab*?b", "abb", False),
])
def test_glob(pattern: str, text: str, expected: bool) -> None:
    assert Glob(pattern).match(text) is expected


def test_glob_pathological_patterns_stay_linear_or_fail_loudly() -> None:
    # The classic exponential case for backtracking matchers: answered at once here.
    text = "a" * 5000
    assert not Glob("*a*a*a*a*a*a*a*a*a*a*a*b").match(text)
    assert Glob("*" + "a*" * 200 + "b").match(text + "b")
    # '?' pieces cost a check per candidate position: past the work bound the match fails loudly
    # (GJSON answers "no match" silently there).
    with pytest.raises(InvalidArgument, match="simplify it"):
        Glob("*" + "?a" * 400 + "b*").match("a" * 100_000)


PATH_CHARS = st.text(alphabet='ab#().[]{}|@!=<>%~*?\\",0 1-', max_size=24)
DOC_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=True)
                          | st.sampled_from(["a", "b", "1", "true", ""]),
                          lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(["a", "b", "0"]),
                                                                                      inner, max_size=3),
                          max_leaves=20)


@settings(max_examples=500, deadline=None)
@given(PATH_CHARS, DOC_VALUES)
def test_any_text_compiles_or_is_refused_and_any_document_evaluates(text: str, doc: Any) -> None:
    try:
        condition = compile_condition(text)
    except InvalidArgument as e:
        assert e.message.startswith("column ") or e.message == "the condition is empty"
        return
    assert isinstance(condition.matches(doc), bool)


# --- work bounds (review findings 2 and 7) --------------------------------------------------------


def test_each_path_of_a_multipath_counts_as_an_array_operation() -> None:
    # '[@this,...k].#.' repeated L times costs k^L to evaluate; its paths count toward the bound, so
    # the review's bomb (k=8, L=16, 834 characters) is refused at definition with the column.
    bomb = "[" + ",".join(["@this"] * 8) + "].#."
    with pytest.raises(InvalidArgument, match=f"more than {MAX_ARRAY_OPS} array operations"):
        compile_condition(bomb * 16 + "id")
    with pytest.raises(InvalidArgument, match=f"more than {MAX_ARRAY_OPS} array operations"):
        compile_condition("[" + ",".join(["a"] * (MAX_ARRAY_OPS + 1)) + "]")
    assert compile_condition("[" + ",".join(["a"] * MAX_ARRAY_OPS) + "]").get({"a": 1}) == [1] * MAX_ARRAY_OPS


def test_one_work_budget_covers_every_path_of_an_evaluation() -> None:
    # 2^10 paths (10 levels of a 2-path multipath, within the operation bound), each querying a list
    # of 1,000 strings: 1,024,000 element visits, each under any per-string bound. One budget for
    # the whole evaluation fails it loudly.
    condition = compile_condition("[@this,@this].#." * 10 + 'data.#(=="nope")')
    doc = {"data": ["x"] * 1000}
    with pytest.raises(InvalidArgument, match=f"took more than {MAX_WORK:,} steps of work"):
        condition.matches(doc)
    # Work is counted, not timed: a budget of units, spent as the evaluation goes.
    budget = Budget(10_000, "the condition")
    assert compile_condition("[@this,@this].#.data.#(==x)").matches(doc, budget)
    assert 0 < budget.limit - budget.left < 10_000
    with pytest.raises(InvalidArgument, match="took more than 10 steps"):
        compile_condition("data.#(==y)").matches(doc, Budget(10, "the condition"))


def test_glob_matches_share_the_evaluations_budget() -> None:
    # The review's repro: one pattern costing ~320k checks per 1,200-character string, each string
    # under the per-match bound, 50 strings far past it together.
    pattern = "*" + "?a" * 400 + "b*"
    text = "a" * 1200
    Glob(pattern).match(text)  # one string alone: within a match's own bound
    condition = compile_condition('inputs.#.data.#(%"' + pattern + '")')
    doc = {"inputs": [{"name": "x", "data": [text] * 50}]}
    with pytest.raises(InvalidArgument, match="steps of work"):
        condition.matches(doc)


def test_decoded_tensor_data_counts_toward_the_budget() -> None:
    # Each tensor's data is decoded only when reached, and its length is charged: many tensors,
    # each under the per-tensor bound, cannot be decoded past one evaluation's budget.
    made: list[int] = []

    def tensor(n: int) -> Lazy:
        def make() -> list[int]:
            made.append(n)
            return [0] * n
        return Lazy(make)

    doc = {"inputs": [{"data": tensor(400_000)} for _ in range(10)]}
    with pytest.raises(InvalidArgument, match="steps of work"):
        compile_condition("inputs.#.data.#").matches(doc)
    assert len(made) < 10


LONG_PATHS = st.lists(st.sampled_from(["a", "b", "#", "@this", "[@this,@this,@this]", "[a,b]", "#(a)#",
                                       "#(%\"*a*\")#", "0", "*"]), min_size=1, max_size=40).map(".".join)
WIDE_DOCS = st.recursive(st.sampled_from(["a", "ab", "b"]) | st.integers(0, 3),
                         lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.sampled_from(["a", "b"]),
                                                                                     inner, max_size=2),
                         max_leaves=60)


@settings(max_examples=300, deadline=None)
@given(LONG_PATHS, WIDE_DOCS)
def test_long_conditions_finish_within_their_budget_or_fail_loudly(text: str, doc: Any) -> None:
    # Texts up to hundreds of characters with multipaths and maps: whatever compiles evaluates in
    # at most its budget's units (counted, not timed), or raises.
    try:
        condition = compile_condition(text)
    except InvalidArgument:
        return
    budget = Budget(20_000, "the condition")
    try:
        assert isinstance(condition.matches(doc, budget), bool)
    except InvalidArgument as e:
        assert "steps of work" in e.message
        return
    assert budget.left >= 0
