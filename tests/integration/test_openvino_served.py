"""OpenVINO IR models served end to end: registered with a real router, loaded in the runtime's
process or in a model worker, answered like the source model; bad requests are INVALID_ARGUMENT
with the loader's message, and a runtime with model roots refuses an IR outside them, or one whose
weights are a link out of them.

The loader's own tests are in test_loaders.py; the 200-model ``mesh up`` scenario serves openvino
models among the other formats (tests/e2e/test_mesh_up.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
import pytest

from mesh.tensors import decode_response, encode_request
from tests.support.inprocess import InProcessMesh, memory_url
from tests.support.models import assert_outputs_match, make_model

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.mark.parametrize("workers", [0, 1])
async def test_an_ir_is_served_through_a_router_within_the_model_roots(tmp_path: Path, workers: int) -> None:
    roots = tmp_path / "models"
    good = make_model("openvino", roots / "team", seed=1)  # wine; team/openvino-1/1/classifier.xml
    outside = make_model("openvino", tmp_path / "elsewhere", seed=0)
    linked = roots / "team" / "linked"
    linked.mkdir()
    shutil.copy(outside.file, linked / "model.xml")
    (linked / "model.bin").symlink_to(outside.file.with_suffix(".bin"))
    mesh = InProcessMesh(memory_url(), runtime_overrides={"workers": workers, "model_roots": (str(roots),)})
    await mesh.start(runtimes=1)
    try:
        await mesh.register("ov", "openvino", str(good.path.relative_to(roots)))
        response = await mesh.infer("ov", encode_request(model_name="ov", inputs={"input": good.sample}))
        assert_outputs_match(decode_response(response), good.expected, atol=1e-5)

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await mesh.infer("ov", encode_request(model_name="ov", inputs={"input": good.sample[:, :4]}))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "input 'input': the model takes shape [-1, 13], got [8, 4]" in (caught.value.details() or "")

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await mesh.register("outside", "openvino", str(outside.path))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "outside the model roots" in (caught.value.details() or "")

        await mesh.register("linked", "openvino", "team/linked")  # lexically inside: refused at load
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await mesh.infer("linked", encode_request(model_name="linked", inputs={"input": outside.sample}))
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        details = caught.value.details() or ""
        assert "model.bin' leads outside the model roots" in details and "symbolic link" in details

        response = await mesh.infer("ov", encode_request(model_name="ov", inputs={"input": good.sample}))
        assert_outputs_match(decode_response(response), good.expected, atol=1e-5)  # still serving
    finally:
        await mesh.stop()


async def test_a_type_alias_registered_through_the_mesh_is_served(tmp_path: Path) -> None:
    """Routers match types literally; runtimes advertise the aliases of their types too."""
    model = make_model("openvino", tmp_path, seed=0)
    mesh = InProcessMesh(memory_url())
    await mesh.start(runtimes=1)
    try:
        await mesh.register("ov", "openvino_ir", str(model.path))
        response = await mesh.infer("ov", encode_request(model_name="ov", inputs={"input": model.sample}))
        assert_outputs_match(decode_response(response), model.expected, atol=1e-5)
    finally:
        await mesh.stop()
