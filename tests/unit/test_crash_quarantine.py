"""Crash quarantine in parts: the load journal across a real process death, the crash witness on
a registry, and the routers' rules for a quarantined model (the whole, with real runtimes and a
corrupt LightGBM file: tests/e2e/test_crash_quarantine.py)."""

from __future__ import annotations

import asyncio
import json
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
from mesh.runtime.journal import FATAL_LOG, LoadJournal, journal_dir

# A process that loads two models on two threads through the journal; then "abort": the load of
# "guilty" aborts (as LightGBM's std::terminate), "kill": it is SIGKILLed from outside,
# "elsewhere": the main thread aborts while both loads are in progress.
CHILD = textwrap.dedent("""
    import os, signal, sys, threading, time
    from pathlib import Path
    from mesh.registry.records import ModelSpec
    from mesh.runtime.journal import LoadJournal
    journal = LoadJournal(Path(sys.argv[1]))
    journal.watch_fatal_signals()
    how = sys.argv[2]
    started = threading.Barrier(3)
    def body(model_id):
        started.wait()
        if model_id == "guilty" and how == "abort":
            os.abort()
        if model_id == "guilty" and how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(30)
    def load(model_id):
        journal.run(ModelSpec(model_id=model_id, type="lightgbm", registered_ms=7), body, model_id)
    journal.run(ModelSpec(model_id="finished", type="sklearn", registered_ms=7), lambda: None)
    for m in ("innocent", "guilty"):
        threading.Thread(target=load, args=(m,), daemon=True).start()
    started.wait()
    if how == "elsewhere":
        os.abort()  # the main thread: no load is to blame
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


def test_a_fatal_signal_outside_the_loads_blames_none_of_them(tmp_path: Path) -> None:
    assert _die(tmp_path, "elsewhere") == -signal.SIGABRT
    journal = LoadJournal(tmp_path)
    found = journal.recover()
    journal.release()
    assert {(left.model_id, left.guilty, left.fatal) for left in found} == {
        ("innocent", False, "Aborted"), ("guilty", False, "Aborted")}


def test_only_the_first_report_counts_when_a_second_signal_cuts_it_short(tmp_path: Path) -> None:
    """A second fatal signal (another thread faulting while the first report is written) appends
    its headline and ends the process: the first report names the guilty load, the second none."""
    journal = LoadJournal(tmp_path)
    tokens = {}
    for model_id in ("guilty", "innocent"):
        journal.run(ModelSpec(model_id=model_id, type="lightgbm", registered_ms=7),
                    lambda m=model_id: tokens.setdefault(m, json.loads(next(
                        p for p in tmp_path.glob("load-*.json") if m in p.read_text()).read_text())))
    for model_id, data in tokens.items():  # as the dead process left them
        (tmp_path / f"load-{model_id}.json").write_text(json.dumps(data))
    (tmp_path / FATAL_LOG).write_text(
        "Fatal Python error: Aborted\n\nStack (most recent call first):\n"
        f'  File "/x/journal.py", line 66 in mesh_load_{tokens["guilty"]["token"]}\n'
        "Fatal Python error: Segmentation fault\n\n"
        f'  File "/x/journal.py", line 66 in mesh_load_{tokens["innocent"]["token"]}\n')
    journal.release()
    again = LoadJournal(tmp_path)
    found = {left.model_id: left for left in again.recover()}
    again.release()
    assert found["guilty"].guilty and found["guilty"].fatal == "Aborted"
    assert not found["innocent"].guilty


def test_a_second_process_under_the_same_id_leaves_the_live_journal_alone(tmp_path: Path) -> None:
    """Runtimes sharing runtime.state_dir get a folder each; a second process under the same
    instance ID finds the folder locked and reads (and deletes) nothing of the live one's."""
    assert journal_dir("runtime-0", str(tmp_path)) != journal_dir("runtime-1", str(tmp_path))
    assert journal_dir("runtime-0", str(tmp_path)).parent == tmp_path
    live = LoadJournal(journal_dir("runtime-0", str(tmp_path)))

    def meanwhile() -> None:
        twin = LoadJournal(journal_dir("runtime-0", str(tmp_path)))
        assert not twin.enabled and twin.recover() == []
        assert len(list(live.directory.glob("load-*.json"))) == 1  # still there
    live.run(ModelSpec(model_id="m", type="sklearn"), meanwhile)
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
    entries = journal.run(ModelSpec(model_id="m", type="sklearn"),
                          lambda: len(list((tmp_path / "state").glob("load-*.json"))))
    assert entries == 1
    journal.close()
    assert not (tmp_path / "state").exists()

    (tmp_path / "file").write_text("not a directory")
    off = LoadJournal(tmp_path / "file")
    assert not off.enabled
    assert off.run(ModelSpec(model_id="m", type="sklearn"), lambda x: x + 1, 1) == 2  # loads go on without it
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
