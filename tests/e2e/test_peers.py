"""The peers' smoke path end to end: both venvs, both peers up, traffic served, nothing left behind.

Slow: the first run builds two venvs from PyPI (about 35 s each here); later runs reuse them.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_both_peers_serve_and_leave_no_process() -> None:
    from loadtest.peers.smoke import smoke

    results = smoke(models=5, duration=3.0, warmup=0.5, concurrency=4)

    assert set(results) == {"ray", "mlserver"}
    for peer, r in results.items():
        assert r["requests"] > 0, f"{peer} served nothing: {r}"
        assert r["errors"] == {}, f"{peer} errors: {r['errors']}"
        assert r["survivors"] == [], f"{peer} left processes behind: {r['survivors']}"
        assert r["peak_rss_mb"] > 0
