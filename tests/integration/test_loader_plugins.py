"""Model-loader plug-ins (entry point group ``mesh_serving.loaders``), for real.

The example package ``tests/support/plugin_example`` is installed the way pip installs a
package's metadata: a ``*.dist-info`` directory with ``METADATA`` and ``entry_points.txt`` beside
the package, on the import path (of this process, and of the model workers through
``PYTHONPATH``). Asserted: its type is listed and served end to end through a real router, in
process and in a model worker; an entry point that would replace a built-in type, or that does
not import, is left out and the rest still works.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mesh.runtime import loaders
from mesh.tensors import decode_response, encode_request
from tests.support.inprocess import InProcessMesh, memory_url

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

EXAMPLE = Path(__file__).resolve().parents[1] / "support" / "plugin_example" / "mesh_plugin_example"


@pytest.fixture()
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    site = tmp_path / "site"
    shutil.copytree(EXAMPLE, site / "mesh_plugin_example")
    info = site / "mesh_plugin_example-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mesh-plugin-example\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[mesh_serving.loaders]\n"
        "linear-json = mesh_plugin_example:LinearJsonLoader\n"
        "sklearn = mesh_plugin_example:LinearJsonLoader\n"  # a built-in type: never replaced
        "broken = mesh_plugin_example_missing:Loader\n")  # does not import: left out
    monkeypatch.syspath_prepend(str(site))
    repo = str(Path(__file__).resolve().parents[2])
    monkeypatch.setenv("PYTHONPATH", f"{site}:{repo}")  # for model workers
    loaders.loaders.cache_clear()
    try:
        yield site
    finally:
        loaders.loaders.cache_clear()


@pytest.mark.parametrize("workers", [0, 1])
async def test_a_plugin_type_is_served_like_a_built_in(site: Path, tmp_path: Path, workers: int) -> None:
    assert "linear-json" in loaders.supported_types() and "broken" not in loaders.supported_types()
    assert loaders.get_loader("sklearn").__class__.__name__ == "SklearnLoader"
    model = tmp_path / "lin" / "model.json"
    model.parent.mkdir()
    model.write_text(json.dumps({"weights": [1.0, 2.0, -1.0], "bias": 0.5}))
    mesh = InProcessMesh(memory_url(), runtime_overrides={"workers": workers})
    await mesh.start(runtimes=1)
    try:
        await mesh.register("lin", "linear-json", str(model))
        x = np.array([[1, 1, 1], [0, 2, 4]], dtype=np.float32)
        response = await mesh.infer("lin", encode_request(model_name="lin", inputs={"input": x}))
        np.testing.assert_allclose(decode_response(response)["score"], [2.5, 0.5])
    finally:
        await mesh.stop()
