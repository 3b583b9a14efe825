"""The model libraries imported when first used (issue 18, part 1): whether a type's library is
installed is told without importing it; each library is imported once per process, however many
first loads race for it, with what it cost recorded; a failed import is retried and reported.
Real modules written to a temporary directory and imported for real."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.runtime import libraries
from mesh.runtime.libraries import Imports, installed


@pytest.fixture
def lib_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [n for n in sys.modules if n.startswith("fakelib_")]:
        del sys.modules[name]


def test_installed_reads_no_module(lib_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (lib_dir / "fakelib_loud.py").write_text("raise RuntimeError('imported!')\n")
    monkeypatch.setitem(libraries.LIBRARIES, "loud", ("fakelib_loud.sub",))
    monkeypatch.setitem(libraries.LIBRARIES, "absent", ("fakelib_not_there",))
    assert installed("loud")  # found, and not executed (it would raise)
    assert "fakelib_loud" not in sys.modules
    assert not installed("absent")
    assert installed("a-plugin-type")  # no library of its own


def test_each_library_is_imported_once_however_many_first_loads_race(lib_dir: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    (lib_dir / "fakelib_big.py").write_text("import time\nBLOB = bytes(range(256)) * 80_000\ntime.sleep(0.2)\n")
    monkeypatch.setitem(libraries.LIBRARIES, "big", ("fakelib_big",))
    imports = Imports()
    results: list[object] = []
    threads = [threading.Thread(target=lambda: results.append(imports.ensure("big"))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    records = [r for r in results if r is not None]
    assert len(records) == 1 and len(results) == 8
    record = imports.imported()[0]
    assert record.model_type == "big" and not record.at_start
    assert record.seconds >= 0.2
    assert record.rss_bytes >= 15_000_000  # the library's memory, charged to no model
    assert imports.ensure("big") is None
    assert imports.ensure("no-library") is None and len(imports.imported()) == 1


def test_a_failed_import_is_not_recorded_and_is_tried_again(lib_dir: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    (lib_dir / "fakelib_broken.py").write_text("raise ImportError('libfoo.so: cannot open shared object')\n")
    monkeypatch.setitem(libraries.LIBRARIES, "broken", ("fakelib_broken",))
    imports = Imports()
    for _ in range(2):
        with pytest.raises(ImportError, match=r"libfoo\.so"):
            imports.ensure("broken", at_start=True)
    assert imports.imported() == []


def test_any_module_imported_moves_the_activity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model's unpickling imports its estimator's module when LIBRARIES does not name it (an
    SVC's sklearn.svm): the load that did it cannot tell that module's memory from the model's, so
    its RSS growth must not be believed (issue 18: a 19 KB model was charged 57 KB and refused)."""
    (tmp_path / "mesh_fresh_module_for_activity.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    imports = Imports()
    before = imports.activity()
    import mesh_fresh_module_for_activity  # noqa: F401  # a module no test imported before

    assert imports.activity() != before and imports.activity()[1] == 0
