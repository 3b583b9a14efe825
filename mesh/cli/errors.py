"""How the CLI reports a failure: one line on stderr and an exit code, never a traceback.

Kept apart from ``mesh.cli.client`` (which imports gRPC and numpy) so that commands that never talk to
a router, ``mesh up`` above all, can report errors without importing what they do not use.
"""

from __future__ import annotations

import sys


class CliError(Exception):
    """A failure to report to the user as one line, with an exit code."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def fail(message: str, code: int) -> int:
    print(f"mesh: error: {message}", file=sys.stderr)
    return code
