"""EngineWatch without vLLM or Ray: a real child process stands in for the EngineCore process, and a fake client
holds what vLLM's `SyncMPClient` exposes (its output queue, pending utility futures, the engine-dead flag).
Checked: a killed process is reported once, its owner is told before the waiters wake, a blocked reader of the
output queue and a pending utility call are both woken with EngineDied; vLLM's flag alone also counts; a
stopped watch reports nothing."""
from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import threading
import time
from concurrent.futures import Future
from types import SimpleNamespace

import pytest

from relay.actors.engine_watch import (
    EngineDied,
    EngineProcs,
    EngineWatch,
    dead_reason,
    engine_procs,
    is_engine_death,
)

WAIT_S = 60  # an upper bound on waiting for a thread, never a figure that is checked


def _client(**resources) -> SimpleNamespace:
    return SimpleNamespace(resources=SimpleNamespace(engine_dead=False, **resources), outputs_queue=queue.Queue(),
                           utility_results={})


@pytest.fixture
def engine_process():
    """A sleeping child process named like vLLM's (fork: starts at once, imports nothing)."""
    proc = multiprocessing.get_context("fork").Process(target=time.sleep, args=(600,), name="EngineCore_DP0",
                                                       daemon=True)
    proc.start()
    yield proc
    if proc.is_alive():
        proc.kill()
    proc.join(WAIT_S)


class Owner:
    """Records the watch's callback, and what the output queue held at that moment."""

    def __init__(self, client):
        self.client = client
        self.reasons: list[str] = []
        self.queued_when_told: list[int] = []
        self.told = threading.Event()

    def __call__(self, reason: str) -> None:
        self.queued_when_told.append(self.client.outputs_queue.qsize())
        self.reasons.append(reason)
        self.told.set()


def test_killed_engine_process_is_reported_and_blocked_calls_wake(engine_process):
    client = _client()
    rpc, answered = Future(), Future()
    answered.set_result("reply")
    client.utility_results = {1: rpc, 2: answered}
    owner = Owner(client)
    got: list[object] = []
    # stands for LLM.generate blocked in SyncMPClient.get_output
    reader = threading.Thread(target=lambda: got.append(client.outputs_queue.get()), daemon=True)
    reader.start()
    watch = EngineWatch(EngineProcs(client, [engine_process]), owner, poll_s=0.05).start()
    assert watch.running and watch.reason is None and not owner.told.is_set()

    os.kill(engine_process.pid, signal.SIGKILL)
    reader.join(WAIT_S)
    assert not reader.is_alive(), "the blocked reader was not woken"
    assert owner.reasons == [watch.reason]
    reason = watch.reason
    assert f"EngineCore_DP0 (pid {engine_process.pid}) died (killed by SIGKILL)" in reason
    assert owner.queued_when_told == [0]  # told first: a woken call finds its generator already broken
    assert isinstance(got[0], EngineDied) and str(got[0]) == reason
    assert isinstance(rpc.exception(timeout=0), EngineDied)
    assert answered.result(timeout=0) == "reply"  # a finished call keeps its reply
    watch.stop()
    assert not watch.running and owner.reasons == [reason]  # reported once


def test_vllms_engine_dead_flag_counts_while_the_process_lives(engine_process):
    client = _client()
    owner = Owner(client)
    watch = EngineWatch(EngineProcs(client, [engine_process]), owner, poll_s=0.05).start()
    client.resources.engine_dead = True  # what vLLM sets when an engine worker process fails
    assert owner.told.wait(WAIT_S)
    assert engine_process.is_alive() and "reported its engine dead" in owner.reasons[0]
    assert isinstance(client.outputs_queue.get(timeout=0), EngineDied)


def test_stopped_watch_reports_nothing(engine_process):
    client = _client()
    owner = Owner(client)
    watch = EngineWatch(EngineProcs(client, [engine_process]), owner, poll_s=0.05).start()
    watch.stop()  # what the generator does before shutting its engine down on purpose
    assert not watch.running
    engine_process.kill()
    engine_process.join(WAIT_S)
    assert owner.reasons == [] and watch.reason is None and client.outputs_queue.empty()
    # the probe itself still sees the ended process
    assert "died (killed by SIGKILL)" in dead_reason(EngineProcs(client, [engine_process]), 0)


def test_engine_procs_finds_the_processes_of_a_multiprocess_engine_only(engine_process):
    in_process = SimpleNamespace(llm_engine=SimpleNamespace(engine_core=SimpleNamespace()))  # InprocClient
    assert engine_procs(in_process) is None
    assert engine_procs(SimpleNamespace()) is None
    client = _client(engine_manager=SimpleNamespace(processes=[engine_process]))
    procs = engine_procs(SimpleNamespace(llm_engine=SimpleNamespace(engine_core=client)))
    assert procs is not None and procs.client is client and procs.pids == [engine_process.pid]
    assert dead_reason(procs, 0) is None


def test_is_engine_death_follows_causes():
    class EngineDeadError(Exception):  # vLLM's class, matched by name so this module never imports vLLM
        pass

    assert is_engine_death(EngineDied("x")) and is_engine_death(EngineDeadError())
    try:
        try:
            raise EngineDied("gone")
        except EngineDied as inner:
            raise RuntimeError("collective_rpc failed") from inner
    except RuntimeError as outer:
        assert is_engine_death(outer)
    assert not is_engine_death(ValueError("prompt too long"))


def test_dead_reason_names_the_exit_code():
    proc = multiprocessing.get_context("fork").Process(target=os._exit, args=(3,), name="EngineCore_DP0")
    proc.start()
    reason = dead_reason(EngineProcs(_client(), [proc]), WAIT_S)  # waits for the process to end
    proc.join(WAIT_S)
    assert reason == f"vLLM engine process EngineCore_DP0 (pid {proc.pid}) died (exit code 3)"
