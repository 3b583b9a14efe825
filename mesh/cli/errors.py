"""How the CLI reports a failure: one line on stderr and an exit code, never a traceback.

Kept apart from ``mesh.cli.client`` (which imports gRPC and numpy) so that commands that never talk to
a router, ``mesh up`` above all, can report errors without importing what they do not use.
"""

from __future__ import annotations

import re
import sys

# C0 controls but newline and tab, DEL, and C1 controls: what a terminal acts on instead of showing.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


class CliError(Exception):
    """A failure to report to the user as one line, with an exit code."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def printable(text: str) -> str:
    """``text`` as a terminal shows it, not as it acts on it: control characters (escape sequences
    that clear the screen, set the title or the clipboard) written as ``\\xNN``. What the CLI prints
    in text mode comes from the router, and model IDs, paths, failure reasons and tensor names are
    other tenants' and model files' choosing (JSON output escapes them by itself)."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def fail(message: str, code: int) -> int:
    print(f"mesh: error: {printable(message)}", file=sys.stderr)
    return code
