"""Restarts of the actors a run can lose without losing work: the reference and reward scorers (stateless) and the
ExperienceBuffer (whose one episode in flight the driver still holds and puts again).

Ray brings a dead actor back (`max_restarts`, same constructor arguments, fresh state, same name and handle).
This module holds the decisions around that, without Ray: the actor options, how a driver notices a restart
(the process id an actor reports changed), when to redo a unit of work on the restarted actor, and the one error
naming the role once the restarts are used up. Imports nothing of Relay's; `ray` only lazily.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")


class ActorLost(RuntimeError):
    """An actor died and Ray will not (or could not) bring it back: its restarts are used up."""


def restart_options(max_restarts: int, retry_calls: bool = True) -> dict[str, int]:
    """`actor_options(...)` extras for an actor Ray restarts up to `max_restarts` times.

    `retry_calls`: Ray also re-runs the calls that were in flight when the process died (at least once), which
    is right for idempotent methods (scoring) and wrong for the buffer, whose `take_all` re-run on an empty,
    restarted buffer would silently return nothing: the buffer's caller redoes the whole exchange instead."""
    if max_restarts < 0:
        raise ValueError(f"max_restarts must be >= 0, got {max_restarts}")
    return {"max_restarts": max_restarts, "max_task_retries": max_restarts if retry_calls else 0}


def is_actor_loss(err: BaseException) -> bool:
    """Whether `err` says the actor's process is gone or unreachable (not an error raised by its method)."""
    import ray.exceptions

    return isinstance(err, ray.exceptions.RayActorError)


def lost_message(role: str, max_restarts: int, err: BaseException | None = None) -> str:
    """The error a run stops with when `role` died once more than it may be restarted."""
    why = f": {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}" if err is not None else ""
    return (f"{role} died and was not brought back (cluster.max_restarts={max_restarts} restarts allowed, all "
            f"used or the actor is gone){why}. Look at its log (SAVE_DIR/logs/) for why it died; raise "
            f"cluster.max_restarts or fix the cause, then resume with --resume auto.")


@dataclass
class RestartWatch:
    """Counts the restarts a driver sees: each actor reports its process id, and a new one means Ray restarted
    it. Two restarts between two looks count as one; the counts are a lower bound."""

    max_restarts: int
    pids: dict[str, int] = field(default_factory=dict)
    restarts: dict[str, int] = field(default_factory=dict)

    def observe(self, role: str, pid: int) -> str | None:
        """Record `role`'s current pid; a one-line message when it changed since the last look."""
        old = self.pids.get(role)
        self.pids[role] = pid
        self.restarts.setdefault(role, 0)
        if old is None or old == pid:
            return None
        self.restarts[role] += 1
        return (f"{role} was restarted (pid {old} -> {pid}; {self.restarts[role]} of {self.max_restarts} "
                f"restarts used); the run goes on")

    def counts(self) -> dict[str, int]:
        """Metrics: restarts seen so far per role, as `restarts_<role without relay/ and @run>`."""
        return {f"restarts_{role.removeprefix('relay/').split('@', 1)[0]}": n for role, n in self.restarts.items()}


def is_restarting(err: BaseException) -> bool:
    """Ray is still bringing the actor back ("The actor is restarting": ActorUnavailableError), worth waiting
    for rather than another loss: on a loaded machine a restart outlasts the first short waits."""
    import ray.exceptions

    return isinstance(err, ray.exceptions.ActorUnavailableError)


def redo_on_loss(work: Callable[[int], T], role: str, max_restarts: int, *,
                 is_loss: Callable[[BaseException], bool] = is_actor_loss,
                 is_restarting: Callable[[BaseException], bool] = is_restarting,
                 note: Callable[[str], None] | None = None, sleep: Callable[[float], None] = time.sleep,
                 first_wait_s: float = 0.5, restart_wait_s: float = 120.0,
                 clock: Callable[[], float] = time.monotonic) -> T:
    """Run `work(attempt)`; when it fails because the actor was lost, wait a little (the restart takes seconds)
    and run it again from the start, for at most `max_restarts` losses; then raise ActorLost naming `role`.
    A retry that finds the actor still restarting (`is_restarting`) is not a new loss: it waits on, for at
    most `restart_wait_s` in a row.

    `work` must be safe to redo on a restarted (empty) actor: it redoes everything it needs, e.g. puts the
    episode's experiences again before taking them."""
    wait, losses, attempt = first_wait_s, 0, 0
    restarting_since: float | None = None
    while True:
        try:
            return work(attempt)
        except Exception as err:
            if not is_loss(err):
                raise
            if attempt > 0 and is_restarting(err):  # the last loss is still being brought back
                restarting_since = clock() if restarting_since is None else restarting_since
                if clock() - restarting_since > restart_wait_s:
                    raise ActorLost(lost_message(role, max_restarts, err)) from err
                what = f"{role} is still restarting; trying again in {wait:.1f} s"
            else:
                restarting_since = None
                if losses == max_restarts:
                    raise ActorLost(lost_message(role, max_restarts, err)) from err
                losses += 1
                what = (f"{role} was lost ({type(err).__name__}); redoing its part of the episode on the restarted "
                        f"actor (restart {losses} of {max_restarts})")
            if note is not None:
                note(what)
            sleep(wait)
            wait = min(wait * 2, 8.0)
            attempt += 1


def call_or_explain(fn: Callable[[], T], role: str, max_restarts: int,
                    is_loss: Callable[[BaseException], bool] = is_actor_loss) -> T:
    """`fn()` (a wait on a restartable actor's call, which Ray retries itself), with Ray's actor errors turned
    into one ActorLost naming `role` once Ray gave up."""
    try:
        return fn()
    except Exception as err:
        if is_loss(err):
            raise ActorLost(lost_message(role, max_restarts, err)) from err
        raise

