"""The tokens file the security tests share: a writer and a reader by digest, and a team-a token
limited to its prefix (and whatever else a test adds to it)."""

from __future__ import annotations

import hashlib


def tokens_toml(*, writer: str, reader: str, team_a: str, team_a_extra: str = "") -> str:
    return f"""
[[token]]
name = "admin"
role = "write"
sha256 = "{hashlib.sha256(writer.encode()).hexdigest()}"

[[token]]
name = "viewer"
role = "read"
sha256 = "{hashlib.sha256(reader.encode()).hexdigest()}"

[[token]]
name = "team-a"
role = "write"
token = "{team_a}"
prefixes = ["team-a/"]
{team_a_extra}"""
