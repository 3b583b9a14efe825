"""What the CLI prints of strings others chose (model IDs, paths, failure reasons, tensor names):
shown, never acted on by the terminal (the attacker review of issue 20: a tenant's model ID cleared
an operator's screen and wrote to the clipboard through `mesh status`)."""

from __future__ import annotations

from mesh.cli.errors import fail, printable


def test_escape_sequences_are_shown_not_run() -> None:
    tenant_id = "team-b/\x1b]0;OWNED\x07\x1b[2J\x1b[31mFAKE: all healthy\x1b[0m\x1b]52;c;ZWNobw==\x07"
    shown = printable(tenant_id)
    assert "\x1b" not in shown and "\x07" not in shown
    assert shown == ("team-b/\\x1b]0;OWNED\\x07\\x1b[2J\\x1b[31mFAKE: all healthy\\x1b[0m"
                     "\\x1b]52;c;ZWNobw==\\x07")
    assert printable("\x9b31m C1 \x7f") == "\\x9b31m C1 \\x7f"


def test_lines_tabs_and_text_are_kept() -> None:
    text = "model\tTYPE\nteam-a/x\tsklearn  é ü 模型"
    assert printable(text) == text


def test_error_lines_are_printable_too(capsys) -> None:  # type: ignore[no-untyped-def]
    assert fail("NOT_FOUND: model 'x\x1b[2J' not found", 1) == 1
    assert capsys.readouterr().err == "mesh: error: NOT_FOUND: model 'x\\x1b[2J' not found\n"
