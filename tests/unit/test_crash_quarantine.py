"""Crash quarantine in parts: the load journal across a real process death, the crash witness on
a registry, and the routers' rules for a quarantined model (the whole, with real runtimes and a
corrupt LightGBM file: tests/e2e/test_crash_quarantine.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mesh.errors import FailedPrecondition
from mesh.registry.crashes import CrashWitness, Leftover, record_leftovers
from mesh.registry.keys import Keys
from mesh.registry.memory import MemoryStore
from mesh.registry.records import (
    CRASH,
    LOADED,
    LOADING,
    DeviceUsage,
    FailureRecord,
    InstanceRecord,
    ModelSpec,
    PlacementRecord,
)
from mesh.registry.registry import Registry
from mesh.router.routing import pick_home
from mesh.router.view import ClusterView
from mesh.runtime.journal import LoadJournal, journal_dir

# A process that loads two models on two threads through the journal; the load of "guilty" dies
# of the given signal (SIGABRT as LightGBM's std::terminate, or SIGKILL from outside).
CHILD = textwrap.dedent("""
    import os, signal, sys, threading, time
    from pathlib import Path
    from mesh.registry.records import ModelSpec
    from mesh.runtime.journal import LoadJournal
    journal = LoadJournal(Path(sys.argv[1]))
    journal.watch_fatal_signals()
    how = sys.argv[2]
    started = threading.Barrier(3)
    def load(model_id):
        with journal.during(ModelSpec(model_id=model_id, type="lightgbm", registered_ms=7)):
            started.wait()
            if model_id == "guilty":
                if how == "abort":
                    os.abort()
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(30)
    with journal.during(ModelSpec(model_id="finished", type="sklearn", registered_ms=7)):
        pass
    for m in ("innocent", "guilty"):
        threading.Thread(target=load, args=(m,), daemon=True).start()
    started.wait()
    time.sleep(30)
""")


def _die(directory: Path, how: str) -> int:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.run([sys.executable, "-c", CHILD, str(directory), how], env=env, timeout=60,
                          capture_output=True).returncode


def test_the_journal_names_the_load_whose_thread_raised_the_fatal_signal(tmp_path: Path) -> None:
    assert _die(tmp_path, "abort") == -signal.SIGABRT
    journal = LoadJournal(tmp_path)  # the lock of the dead process went with it
    assert journal.enabled
    found = {left.model_id: left for left in journal.recover()}
    assert set(found) == {"innocent", "guilty"}  # "finished" ended before the death
    assert found["guilty"].guilty and found["guilty"].fatal == "Aborted"
    assert not found["innocent"].guilty and found["innocent"].fatal == "Aborted"
    assert found["guilty"].registered_ms == 7
    journal.release()
    again = LoadJournal(tmp_path)
    assert again.enabled and again.recover() == []  # reported once
    again.release()


def test_a_second_process_under_the_same_id_leaves_the_live_journal_alone(tmp_path: Path) -> None:
    """Runtimes sharing runtime.state_dir get a folder each; a second process under the same
    instance ID finds the folder locked and reads (and deletes) nothing of the live one's."""
    assert journal_dir("runtime-0", str(tmp_path)) != journal_dir("runtime-1", str(tmp_path))
    assert journal_dir("runtime-0", str(tmp_path)).parent == tmp_path
    live = LoadJournal(journal_dir("runtime-0", str(tmp_path)))
    with live.during(ModelSpec(model_id="m", type="sklearn")):
        twin = LoadJournal(journal_dir("runtime-0", str(tmp_path)))
        assert not twin.enabled and twin.recover() == []
        assert len(list(live.directory.glob("load-*.json"))) == 1  # still there
    live.close()
    assert LoadJournal(journal_dir("runtime-0", str(tmp_path))).enabled  # free again


def test_a_killed_process_leaves_its_loads_but_no_guilty_one(tmp_path: Path) -> None:
    assert _die(tmp_path, "kill") == -signal.SIGKILL
    journal = LoadJournal(tmp_path)
    found = journal.recover()
    journal.release()
    assert {(left.model_id, left.guilty, left.fatal) for left in found} == {
        ("innocent", False, ""), ("guilty", False, "")}


def test_a_clean_exit_leaves_nothing_and_an_unusable_directory_turns_the_journal_off(tmp_path: Path) -> None:
    journal = LoadJournal(tmp_path / "state")
    with journal.during(ModelSpec(model_id="m", type="sklearn")):
        assert len(list((tmp_path / "state").glob("load-*.json"))) == 1
    journal.close()
    assert not (tmp_path / "state").exists()

    (tmp_path / "file").write_text("not a directory")
    off = LoadJournal(tmp_path / "file")
    assert not off.enabled
    with off.during(ModelSpec(model_id="m", type="sklearn")):
        pass  # loads go on without it
    assert off.recover() == []


def _registry() -> Registry:
    return Registry(MemoryStore(), "")


async def _put_placement(registry: Registry, state: str) -> None:
    await registry.store.put(registry.keys.placement("m", "r1"),
                             PlacementRecord(model_id="m", instance_id="r1", state=state).to_json())


async def test_the_witness_quarantines_only_a_model_that_was_loading_on_the_dead_runtime() -> None:
    registry = _registry()
    seen: list[FailureRecord] = []
    witness = CrashWitness(registry, quarantine_s=60, on_record=seen.append)
    assert await witness.lost("m", "r1") is None  # no placement: it went for another reason
    await _put_placement(registry, LOADED)
    assert await witness.lost("m", "r1") is None  # it was serving the model, not loading it
    await _put_placement(registry, LOADING)
    records = await asyncio.gather(*(witness.lost("m", "r1") for _ in range(10)))
    assert all(r is not None and r.kind == CRASH for r in records)
    assert witness.recorded == 1 and len(seen) == 1  # ten lost calls, one record
    [stored] = await registry.failures_of("m")
    assert stored.kind == CRASH and "died while loading" in stored.reason
    kv = await registry.store.get(registry.keys.failure("m", "r1"))
    assert kv is not None and kv.lease != 0  # time-limited: it may have been a SIGKILL


async def test_a_runtime_that_still_answers_is_not_blamed_and_a_cancelled_caller_keeps_the_others() -> None:
    """A call lost without a death (a missed deadline, a refused stream) leaves the loading model
    alone when the runtime answers its probe; the check is its own task, so the first caller
    cancelled (its client left) does not cancel the others waiting on the same check."""
    registry = _registry()
    await _put_placement(registry, LOADING)
    answers = {"127.0.0.1:1": True, "127.0.0.1:2": False}
    probed = asyncio.Event()
    release = asyncio.Event()

    async def live(endpoint: str, timeout_s: float) -> bool:
        probed.set()
        await release.wait()
        return answers[endpoint]

    witness = CrashWitness(registry, quarantine_s=60, live=live)
    release.set()
    assert await witness.lost("m", "r1", "127.0.0.1:1") is None  # alive: not a crash
    assert witness.recorded == 0 and await registry.failures_of("m") == []

    release.clear()
    probed.clear()
    first = asyncio.create_task(witness.lost("m", "r1", "127.0.0.1:2"))
    second = asyncio.create_task(witness.lost("m", "r1", "127.0.0.1:2"))
    await asyncio.wait_for(probed.wait(), 5)
    first.cancel()
    release.set()
    record = await asyncio.wait_for(second, 5)
    assert record is not None and record.kind == CRASH and witness.recorded == 1
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_a_restarted_runtime_makes_a_guilty_load_durable_and_skips_a_new_registration() -> None:
    registry = _registry()
    spec, _ = await registry.register_model(ModelSpec(model_id="m", type="lightgbm", registered_ms=5))
    await registry.register_model(ModelSpec(model_id="other", type="lightgbm", registered_ms=9))
    witness = CrashWitness(registry, quarantine_s=60)
    written = await record_leftovers(witness, "r1", [
        Leftover("m", 5, 0, guilty=True, fatal="Segmentation fault"),
        Leftover("other", 8, 0, guilty=False, fatal=""),  # registered again since: not blamed
        Leftover("gone", 5, 0, guilty=False, fatal="")])  # unregistered since
    assert written == 1
    kv = await registry.store.get(registry.keys.failure("m", "r1"))
    assert kv is not None and kv.lease == 0
    assert "fatal signal in the loader: Segmentation fault" in FailureRecord.from_json(kv.value).reason
    assert await registry.failures_of("other") == []
    await registry.delete_model("m")
    await registry.clear_failures("m")  # what unregister does: the quarantine ends with the registration
    assert await registry.failures_of("m") == []
    assert spec.registered_ms == 5


def test_no_instance_is_chosen_to_load_a_quarantined_model() -> None:
    view = ClusterView(Keys())
    for i in ("a", "b", "c"):
        view.instances[i] = InstanceRecord(instance_id=i, endpoint=f"127.0.0.1:{i}",
                                           devices=(DeviceUsage("ram", 1 << 30, 0),))
    spec = ModelSpec(model_id="m", type="sklearn")
    assert pick_home(view, spec, (), load_factor=1.25).instance_id in "abc"
    view.add_failure(FailureRecord("m", "a", "runtime a died while loading this model", kind=CRASH))
    with pytest.raises(FailedPrecondition, match="quarantined: runtime a died"):
        pick_home(view, spec, (), load_factor=1.25)
    # An ordinary load failure excludes only the instance that failed.
    view.failures.clear()
    view.add_failure(FailureRecord("n", "a", "bad file"))
    for _ in range(10):
        assert pick_home(view, ModelSpec(model_id="n", type="sklearn"), (), load_factor=1.25).instance_id != "a"
