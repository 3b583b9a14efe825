"""The benchmark scenarios, one module each, run as ``python -m loadtest.scenarios.<name>``.

Every scenario starts what it measures on 127.0.0.1 (``loadtest.cluster``), drives it from the
benchmark process, stops every process it started by PID, prints Markdown tables, and with
``--out FILE`` writes ``{"markdown": ..., "result": ...}`` for ``mesh-bench``
(``loadtest.report.add_output_args`` / ``emit``).

A module that belongs to ``mesh-bench``'s standard suite also defines ``SUITE_ARGS`` (the command
line arguments of its suite run, sized so the whole suite fits in 10 minutes on two cores) and
``SUITE_SECONDS`` (its expected wall time there).
"""
