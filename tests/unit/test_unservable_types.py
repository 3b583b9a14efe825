"""A registration no runtime could load says so, and what to install (issue 20, part 4).

The real ``Management`` and ``Registry`` on the in-memory store, with runtime records as runtimes
publish them: a runtime installed without the ``runtimes`` extra advertises scikit-learn only.
"""

from __future__ import annotations

from mesh.model_libraries import install_hint
from mesh.registry.memory import MemoryStore
from mesh.registry.records import DeviceUsage, InstanceRecord
from mesh.registry.registry import Registry
from mesh.router.management import Management, ModelInfoData
from mesh.router.view import ClusterView


def _management(*types: tuple[str, ...]) -> Management:
    registry = Registry(MemoryStore())
    view = ClusterView(registry.keys)
    for i, supported in enumerate(types):
        view.instances[f"rt-{i}"] = InstanceRecord(instance_id=f"rt-{i}", endpoint=f"127.0.0.1:{1000 + i}",
                                                   devices=(DeviceUsage("ram", 1 << 30, 0),), supported_types=supported)
    return Management(registry=registry, view=view, runtimes=None, load_factor=1.0)


async def _errors(management: Management, model_type: str, **info: object) -> list[str]:
    status = await management.register_model("m", ModelInfoData(type=model_type, path="/m/x", **info))  # type: ignore[arg-type]
    return status.errors


async def test_a_builtin_type_whose_library_is_missing_names_the_extra() -> None:
    errors = await _errors(_management(("sklearn",)), "xgboost")
    assert len(errors) == 1
    assert "no runtime loads type 'xgboost' (they load: sklearn)" in errors[0]
    assert "pip install 'mesh-serving[runtimes]'" in errors[0]


async def test_an_alias_gets_the_hint_of_its_type() -> None:
    assert "torch" in install_hint("pytorch") and "mesh-serving[runtimes]" in install_hint("pytorch")
    assert install_hint("sklearn") == ""  # a core dependency: nothing to install
    assert install_hint("my-plugin-format") == ""


async def test_an_unknown_type_asks_about_model_servers_and_plugins() -> None:
    errors = await _errors(_management(("sklearn", "onnx")), "my-format")
    assert errors == ["no runtime loads type 'my-format' (they load: onnx, sklearn); is it a type of a model "
                      "server (runtime.model_server) or a loader plug-in not running here?"]


async def test_labels_no_runtime_carries_are_named_apart_from_the_type() -> None:
    errors = await _errors(_management(("sklearn",)), "sklearn", labels=("rt:special",))
    assert len(errors) == 1 and "lack the labels or the GPU" in errors[0]


async def test_no_complaint_when_a_runtime_loads_it_or_none_is_registered_yet() -> None:
    assert await _errors(_management(("sklearn",), ("xgboost", "sklearn")), "xgboost") == []
    assert await _errors(_management(), "xgboost") == []  # runtimes may still be starting
