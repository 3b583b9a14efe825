"""Tokens file parsing, authentication, roles and model-ID prefixes (``mesh.auth``), without gRPC."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from mesh.auth import READ_METHODS, WRITE_METHODS, TokenTable, bearer_token
from mesh.errors import InvalidArgument, PermissionDenied, Unauthenticated
from mesh.gen.mmesh import model_mesh_pb2 as mm

WRITER = "w-secret-0123456789abcdef"
READER = "r-secret-0123456789abcdef"
TEAM_A = "a-secret-0123456789abcdef"

TOKENS = f"""
[[token]]
name = "admin"
role = "write"
sha256 = "{hashlib.sha256(WRITER.encode()).hexdigest()}"

[[token]]
name = "viewer"
role = "read"
token = "{READER}"

[[token]]
name = "team-a"
role = "write"
token = "{TEAM_A}"
prefixes = ["team-a/"]
"""


@pytest.fixture
def table() -> TokenTable:
    return TokenTable.parse(TOKENS)


def test_known_tokens_authenticate_by_hash_or_value(table: TokenTable) -> None:
    assert table.authenticate(WRITER).name == "admin"
    assert table.authenticate(READER).role == "read"
    assert table.authenticate(TEAM_A).prefixes == ("team-a/",)


@pytest.mark.parametrize("token", [None, "", "nope", WRITER + "x", WRITER[:-1]])
def test_missing_or_unknown_token_is_unauthenticated_without_echoing_it(table: TokenTable, token: str | None) -> None:
    with pytest.raises(Unauthenticated, match="missing or invalid bearer token") as err:
        table.authenticate(token)
    if token:
        assert token not in err.value.message


def test_bearer_header_parsing() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer  abc ") == "abc"
    assert bearer_token("Basic abc") is None
    assert bearer_token("Bearer") is None
    assert bearer_token(None) is None
    assert bearer_token(b"Bearer abc") is None


def test_read_role_may_read_but_not_write(table: TokenTable) -> None:
    viewer = table.authenticate(READER)
    for method in READ_METHODS:
        viewer.check_method(method)
    for method in WRITE_METHODS:
        with pytest.raises(PermissionDenied, match=method):
            viewer.check_method(method)
    with pytest.raises(PermissionDenied, match="someFutureMethod"):  # unknown methods need write
        viewer.check_method("someFutureMethod")
    admin = table.authenticate(WRITER)
    for method in READ_METHODS | WRITE_METHODS:
        admin.check_method(method)


def test_write_methods_are_the_management_apis_mutations() -> None:
    from mesh.gen.mmesh import graphs_pb2 as gp
    from mesh.gen.mmesh import status_pb2 as st

    methods = {m.name for m in mm.DESCRIPTOR.services_by_name["ModelMesh"].methods}
    methods |= {m.name for m in gp.DESCRIPTOR.services_by_name["ModelMeshGraphs"].methods}  # inference graphs
    methods |= {m.name for m in st.DESCRIPTOR.services_by_name["ModelMeshStatus"].methods}  # fleet status
    assert methods == READ_METHODS | WRITE_METHODS
    assert {m.name for m in st.DESCRIPTOR.services_by_name["ModelMeshStatus"].methods} <= READ_METHODS


def test_prefixes_bound_the_model_ids(table: TokenTable) -> None:
    team_a = table.authenticate(TEAM_A)
    team_a.check_model("team-a/x")
    with pytest.raises(PermissionDenied, match="'team-b/y'"):
        team_a.check_model("team-b/y")
    team_a.check_list_prefix("team-a/")
    team_a.check_list_prefix("team-a/sub")
    with pytest.raises(PermissionDenied, match="prefix ''"):
        team_a.check_list_prefix("")
    admin = table.authenticate(WRITER)
    admin.check_model("anything")
    admin.check_list_prefix("")


@pytest.mark.parametrize(("text", "message"), [
    ("", "at least one"),
    ('[[token]]\nname = "x"\nrole = "admin"\ntoken = "0123456789abcdef"', "'role' must be"),
    ('[[token]]\nname = "x"\nrole = "read"', "exactly one of"),
    ('[[token]]\nname = "x"\nrole = "read"\nsha256 = "abc"', "64 hex digits"),
    ('[[token]]\nname = "x"\nrole = "read"\ntoken = "short"', "at least 16"),
    ('[[token]]\nrole = "read"\ntoken = "0123456789abcdef"', "'name' is required"),
    ('[[token]]\nname = "x"\nrole = "read"\ntoken = "0123456789abcdef"\nprefix = ["a"]', "unknown key"),
    ('[[token]]\nname = "x"\nrole = "read"\ntoken = "0123456789abcdef"\nprefixes = "a/"', "list of non-empty"),
    ('[[token]]\nname = "x"\nrole = "read"\ntoken = "0123456789abcdef"\n'
     '[[token]]\nname = "y"\nrole = "read"\ntoken = "0123456789abcdef"', "same token"),
    ("[[token]\n", "not valid TOML"),
    ('[[token]]\nname = "x"\nrole = "write"\ntoken = "0123456789abcdef"\nmax_models = -1', "'max_models' must be"),
    ('[[token]]\nname = "x"\nrole = "write"\ntoken = "0123456789abcdef"\nmax_pinned_copies = "9"',
     "'max_pinned_copies' must be"),
])
def test_bad_tokens_files_are_one_clear_error_without_the_secret(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message) as err:
        TokenTable.parse(text)
    assert "0123456789abcdef" not in err.value.message


def test_unreadable_tokens_file_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"auth.tokens_file: cannot read .*missing.toml"):
        TokenTable.load(tmp_path / "missing.toml")
