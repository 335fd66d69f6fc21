"""What the training loops do at a safe point (after an optimizer step or a PPO episode): write a checkpoint when
one is due, and stop cleanly when the process was asked to.

- `SaveSchedule`: a checkpoint every N steps / episodes and every M minutes, so a killed run loses a bounded
  amount of work.
- `GracefulStop`: SIGTERM (`ray job stop`, preemption) or SIGINT (Ctrl-C) sets a flag; the loop sees it at
  its next safe point, writes a checkpoint, cleans up and exits, and the command prints how to resume
  (`--resume auto`). `grace_s` after the signal the process exits anyway (temp files removed first), so a
  hung remote call cannot outlive the scheduler's own kill; a second signal stops at once.

One `GracefulStop` is active per process (`stop_on_signals`); the loops ask `active()`. Imports nothing heavy.
"""
from __future__ import annotations

import contextlib
import os
import shlex
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Iterator


class SaveSchedule:
    """Whether a checkpoint is due after `done` steps: every `interval` (0: off) or when `minutes` (0: off)
    have passed since the last save (or since the schedule started)."""

    def __init__(self, interval: int, minutes: float, clock: Callable[[], float] = time.monotonic):
        self.interval, self.minutes, self.clock = interval, minutes, clock
        self.last = clock()

    def due(self, done: int) -> bool:
        by_steps = bool(self.interval) and done % self.interval == 0
        by_time = self.minutes > 0 and self.clock() - self.last >= self.minutes * 60
        return by_steps or by_time

    def saved(self) -> None:
        self.last = self.clock()


def _stderr(msg: str) -> None:
    # Raw write: this runs inside a signal handler, where print() on a stream the interrupted code is writing
    # to raises "reentrant call".
    os.write(2, f"[relay] {msg}\n".encode())


class GracefulStop:
    """A stop request from a signal, and the deadline after which the process exits regardless."""

    def __init__(self, grace_s: float = 60.0, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT),
                 note: Callable[[str], None] = _stderr, exit: Callable[[int], None] = os._exit):
        self.grace_s, self.signals, self.note, self._exit = grace_s, signals, note, exit
        self.signum: int | None = None
        self.outcome: str | None = None  # what the loop did when it stopped (set by `finish`)
        self._previous: dict[int, object] = {}
        self._cleanups: list[Callable[[], None]] = []
        self._timer: threading.Timer | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def exit_code(self) -> int:
        """128 + the signal number, the shell's convention for 'ended by a signal' (143 for SIGTERM)."""
        return 128 + (self.signum or 0)

    # -------------------------------------------------------------------------------------------- signals
    def request(self, signum: int) -> None:
        """The first signal asks for a stop and starts the grace timer; a second one stops at once."""
        if self.signum is not None:
            raise KeyboardInterrupt  # the caller's finally blocks still remove temp files
        self.signum = signum
        limit = f"within {self.grace_s:g} s" if self.grace_s > 0 else "however long it takes"
        self.note(f"received {self.name}: stopping at the next safe point with a checkpoint ({limit}; "
                  "signal again to stop at once)")
        if self.grace_s > 0:
            self._timer = threading.Timer(self.grace_s, self.expire)
            self._timer.daemon = True
            self._timer.start()

    def expire(self) -> None:
        """Grace period over: run the cleanups and leave without waiting for the loop."""
        if self.outcome is None:
            self.note(f"no safe point reached within {self.grace_s:g} s of {self.name}: exiting without a new "
                      "checkpoint; `--resume auto` continues from the last complete one")
        else:  # the checkpoint is written; shutting the actors down is what took too long
            self.note(f"{self.outcome}; shutting down took over {self.grace_s:g} s: exiting now")
        for clean in reversed(self._cleanups):
            try:
                clean()
            except Exception as err:  # keep cleaning; we are leaving anyway
                self.note(f"cleanup failed: {err}")
        self._exit(self.exit_code())

    def install(self) -> "GracefulStop":
        """Take SIGTERM/SIGINT (again: ray.init installs its own SIGTERM handler in the driver). Only the main
        thread may set handlers; elsewhere this does nothing."""
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in self.signals:
            previous = signal.signal(sig, self._handle)
            self._previous.setdefault(sig, previous)
        return self

    def uninstall(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if threading.current_thread() is threading.main_thread():
            for sig, previous in self._previous.items():
                signal.signal(sig, previous)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        self.request(signum)

    # ------------------------------------------------------------------------------------------- the loop
    def add_cleanup(self, clean: Callable[[], None]) -> Callable[[], None]:
        """Run `clean` if the grace period runs out; returns a function that unregisters it."""
        self._cleanups.append(clean)
        return lambda: self._cleanups.remove(clean) if clean in self._cleanups else None

    def finish(self, where: str, checkpoint: Path | None) -> None:
        """Called by the loop that stopped: `where` ('after step 12 of 100'), the checkpoint it resumes from."""
        saved = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint yet (nothing trained)"
        self.outcome = f"stopped by {self.name} {where}; {saved}"


_active: GracefulStop | None = None


def active() -> GracefulStop | None:
    return _active


def stop_requested() -> bool:
    return _active is not None and _active.requested


def reclaim_signals() -> None:
    """After ray.init: Ray replaced our SIGTERM handler with its own (exit at once); take it back."""
    if _active is not None:
        _active.install()


@contextlib.contextmanager
def stop_on_signals(grace_s: float, note: Callable[[str], None] = _stderr) -> Iterator[GracefulStop]:
    """Make a GracefulStop the process's active one for the duration of a pipeline run."""
    global _active
    stop = GracefulStop(grace_s, note=note).install()
    previous, _active = _active, stop
    try:
        yield stop
    finally:
        stop.uninstall()
        _active = previous


def resume_command(pipeline: str, argv: list[str]) -> str:
    """The command that continues a stopped run: the same arguments with `--resume auto`."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--resume":
            skip = True
        elif not arg.startswith("--resume="):
            kept.append(arg)
    return shlex.join(["relay", pipeline, *kept, "--resume", "auto"])
