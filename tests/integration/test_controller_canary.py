"""InferenceService canaries (``spec.predictor.canaryTrafficPercent``) through the controller, against
a real mesh (router + runtime, memory:// registry, sklearn models trained here) and the FAKE
Kubernetes API server of tests/integration/test_controller_isvc.py, which validates every status
write against KServe's SDK types and our CRD.

A spec change with P below 100 splits the vModel P / 100 - P between the new model and the one
rolled out before; the observed shares follow; editing P moves the split; removing P promotes the
new model (the split goes, the old model is auto-deleted). The status carries KServe's revision
fields with our model IDs as the revision names.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from typing import Any

import pytest

from mesh.errors import Code
from mesh.gen.mmesh import model_mesh_pb2 as mm
from mesh.tensors import encode_request
from tests.integration import test_controller_isvc as isvc_tests
from tests.integration.test_controller import wait_for
from tests.integration.test_controller_isvc import NAME, Env, invalid, isvc, model_form, ready
from tests.support.models import ModelArtifact

# The InferenceService tests' fixtures: a mesh with the fake API server, and two iris models.
env = isvc_tests.env
models = isvc_tests.models

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


def canary(model: ModelArtifact, percent: int | None) -> dict[str, Any]:
    form = model_form(model)
    return {**form, "canaryTrafficPercent": percent} if percent is not None else form


def predictor(env: Env) -> dict[str, Any]:
    return ((env.status(NAME).get("components") or {}).get("predictor")) or {}


async def served_by(env: Env, model: ModelArtifact) -> str:
    request = encode_request(model_name="", inputs={"input-0": model.sample})
    return (await env.mesh.infer(NAME, request, header="mm-vmodel-id")).model_name


async def test_canary_split_status_and_promotion_on_removal(env: Env, models: tuple[ModelArtifact, ...]) -> None:
    first, second = models
    await env.start_controller()
    env.apply(isvc(NAME, canary(first, 20)))  # a new service: nothing to split with, rolled out
    await wait_for(ready(env, NAME), what="Ready")
    old = (await env.vmodel(NAME)).activeModelId
    assert not (await env.vmodel(NAME)).splitTargets
    await wait_for(lambda: predictor(env).get("traffic") == [
        {"revisionName": old, "percent": 100, "latestRevision": True}], what="traffic of the first model")
    assert predictor(env)["latestRolledoutRevision"] == old

    env.apply(isvc(NAME, canary(second, 20)))  # a new model, 20 % of the traffic

    async def split_as(weights: dict[str, int]) -> bool:
        targets = (await env.vmodel(NAME)).splitTargets
        return {t.modelId: t.weight for t in targets} == weights and len(targets) == len(weights)

    new = ""

    async def canary_on() -> bool:
        nonlocal new
        v = await env.vmodel(NAME)
        new = next((t.modelId for t in v.splitTargets if t.modelId != old), "")
        return bool(new) and await split_as({old: 80, new: 20}) and v.activeModelId == old

    await wait_for(canary_on, timeout=15, what="split 80/20")
    assert new.startswith(f"{NAME}__isvc-") and new != old

    def canary_status(prev: int, latest: int) -> bool:
        p = predictor(env)
        return (p.get("traffic") == [
            {"tag": "prev", "revisionName": old, "percent": prev, "latestRevision": False},
            {"tag": "latest", "revisionName": new, "percent": latest, "latestRevision": True}]
            and p.get("latestRolledoutRevision") == old and p.get("latestCreatedRevision") == new)

    await wait_for(lambda: canary_status(80, 20), timeout=15, what="canary status 80/20")
    await wait_for(lambda: predictor(env).get("latestReadyRevision") == new, timeout=15, what="canary ready")
    n = 300
    seen = Counter([await served_by(env, first) for _ in range(n)])
    assert set(seen) == {old, new}
    assert abs(seen[new] - n * 0.2) <= 4 * math.sqrt(n * 0.2 * 0.8), seen

    env.apply(isvc(NAME, canary(second, 50)))  # the same model, another percent: the split moves
    await wait_for(lambda: split_as({old: 50, new: 50}), timeout=15, what="split 50/50")
    await wait_for(lambda: canary_status(50, 50), timeout=15, what="canary status 50/50")

    env.apply(isvc(NAME, canary(second, None)))  # canaryTrafficPercent removed: promoted

    async def promoted() -> bool:
        v = await env.vmodel(NAME)
        return not v.splitTargets and v.activeModelId == new == v.targetModelId

    await wait_for(promoted, timeout=15, what="promoted")
    await wait_for(lambda: predictor(env).get("traffic") == [
        {"revisionName": new, "percent": 100, "latestRevision": True}], timeout=15, what="traffic all to new")
    p = predictor(env)
    assert (p["latestRolledoutRevision"], p["previousRolledoutRevision"], p["latestReadyRevision"]) == (new, old, new)
    assert {await served_by(env, first) for _ in range(30)} == {new}

    async def old_gone() -> bool:
        s = await env.mesh.mesh.getModelStatus(mm.GetStatusRequest(modelId=old), timeout=5)
        return s.status == mm.ModelStatusInfo.NOT_FOUND

    await wait_for(old_gone, timeout=15, what="old model auto-deleted")
    await wait_for(ready(env, NAME), what="Ready after promotion")


async def test_canary_of_100_rolls_out_and_a_bad_percent_is_an_invalid_spec(
        env: Env, models: tuple[ModelArtifact, ...]) -> None:
    first, second = models
    await env.start_controller()
    env.apply(isvc(NAME, model_form(first)))
    await wait_for(ready(env, NAME), what="Ready")
    old = (await env.vmodel(NAME)).activeModelId
    env.apply(isvc(NAME, canary(second, 100)))

    async def rolled_out() -> bool:
        v = await env.vmodel(NAME)
        return v.activeModelId not in ("", old) and not v.splitTargets

    await wait_for(rolled_out, timeout=15, what="rolled out without a split")
    env.apply(isvc(NAME, canary(second, 150)))
    await wait_for(invalid(env, NAME), timeout=15, what="InvalidSpec")
    failure = env.model_status(NAME).get("lastFailureInfo") or {}
    assert "canaryTrafficPercent" in failure.get("message", "")


# --- the review's findings (canary-fix) ---------------------------------------------------------------
async def test_no_window_in_which_the_mesh_may_switch_away_from_the_stable_model(
        env: Env, models: tuple[ModelArtifact, ...], monkeypatch: pytest.MonkeyPatch) -> None:
    """A canary is one setVModelSplit (registering the new model), never a setVModel first: a slow
    or failing split call leaves the stable model serving everything, never rolls the canary out
    (the review's repro: a router's drive_transitions between the two calls switched to the new
    model at 100 % and auto-deleted the stable one)."""
    from mesh.controller import router_client
    original_split = router_client.RouterClient.set_vmodel_split
    original_set = router_client.RouterClient.set_vmodel
    calls: list[str] = []
    failed_once = False

    async def slow_split(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal failed_once
        await asyncio.sleep(1.5)  # routers drive transitions every second meanwhile
        if not failed_once:
            failed_once = True
            # A refusal, NOT_FOUND even, is reported and retried, never taken for a roll-out.
            raise router_client.RouterError(Code.NOT_FOUND, "vModel not found (a transient failure)")
        return await original_split(self, *args, **kwargs)

    async def recorded_set(self, reg, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(reg.model_id)
        return await original_set(self, reg, **kwargs)

    monkeypatch.setattr(router_client.RouterClient, "set_vmodel_split", slow_split)
    monkeypatch.setattr(router_client.RouterClient, "set_vmodel", recorded_set)
    first, second = models
    await env.start_controller()
    env.apply(isvc(NAME, model_form(first)))
    await wait_for(ready(env, NAME), what="Ready")
    old = (await env.vmodel(NAME)).activeModelId
    calls.clear()
    env.apply(isvc(NAME, canary(second, 10)))

    async def split_on() -> bool:
        v = await env.vmodel(NAME)
        assert v.activeModelId == old, "the vModel switched away from the stable model"
        return len(v.splitTargets) == 2

    await wait_for(split_on, timeout=20, what="split 90/10")
    assert failed_once and calls == []  # no setVModel of the new model at any point
    v = await env.vmodel(NAME)
    assert {t.modelId: t.weight for t in v.splitTargets}[old] == 90
    seen = Counter([await served_by(env, first) for _ in range(100)])
    assert seen[old] > 50, seen


async def test_rolling_the_spec_back_during_a_canary_ends_the_canary(
        env: Env, models: tuple[ModelArtifact, ...]) -> None:
    first, second = models
    await env.start_controller()
    env.apply(isvc(NAME, model_form(first)))
    await wait_for(ready(env, NAME), what="Ready")
    old = (await env.vmodel(NAME)).activeModelId
    env.apply(isvc(NAME, canary(second, 20)))

    async def split_on() -> bool:
        return len((await env.vmodel(NAME)).splitTargets) == 2

    await wait_for(split_on, timeout=15, what="split")
    new = next(t.modelId for t in (await env.vmodel(NAME)).splitTargets if t.modelId != old)
    env.apply(isvc(NAME, canary(first, 20)))  # the bad canary rolled back; canaryTrafficPercent kept

    async def rolled_back() -> bool:
        v = await env.vmodel(NAME)
        return not v.splitTargets and v.activeModelId == old == v.targetModelId

    await wait_for(rolled_back, timeout=15, what="the split cleared")
    assert set(Counter([await served_by(env, first) for _ in range(50)])) == {old}

    async def canary_gone() -> bool:
        return (await env.mesh.mesh.getModelStatus(mm.GetStatusRequest(modelId=new), timeout=5)).status \
            == mm.ModelStatusInfo.NOT_FOUND

    await wait_for(canary_gone, timeout=10, what="the canary auto-deleted")
    await wait_for(lambda: predictor(env).get("traffic") == [
        {"revisionName": old, "percent": 100, "latestRevision": True}], what="status traffic of the stable model")
