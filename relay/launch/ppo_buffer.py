"""One PPO episode through the ExperienceBuffer (`relay/buffer`): put the episode's experiences, evict stale ones
(async mode), take everything back for the update.

The driver keeps the episode's experiences until it has them back, so a buffer that died meanwhile loses
nothing: Ray restarts it empty (`relay.restarts`, no automatic re-run of calls) and the whole exchange is redone
on it. Every exchange checks that what came back is exactly the episode's samples, each once (sample ids), so
neither a lost nor a doubled experience reaches an update unnoticed.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from relay.restarts import is_actor_loss, redo_on_loss


class BufferMismatch(RuntimeError):
    """The experiences taken back from the buffer are not the episode's own, each once."""


class BufferRestarted(RuntimeError):
    """The buffer died after the put and Ray restarted it (empty) before the take: no call failed, but the
    episode's experiences are gone from it. Handled like a failed call: the exchange is redone."""


@dataclass
class Exchange:
    """What one episode's exchange returned."""

    taken: list[Any]  # Experience mini-batches (as BufferClient.take_all returns them)
    size: int  # buffer size right after the put (the episode's new samples)
    evicted: int  # stale samples dropped (async mode)
    attempts: int  # 1, or more when the buffer was lost and the exchange redone


def check_exactly_once(put_ids: Sequence[str], taken_ids: Sequence[str], evicted: int) -> None:
    """Raise BufferMismatch unless `taken_ids` are distinct episode ids, all of them but the `evicted`."""
    put, taken = set(put_ids), list(taken_ids)
    doubled = len(taken) - len(set(taken))
    foreign = sorted(set(taken) - put)
    missing = len(put) - evicted - len(set(taken) & put)
    if doubled or foreign or missing:
        raise BufferMismatch(
            f"relay/buffer gave back {len(taken)} experiences for an episode of {len(put)} ({evicted} evicted): "
            f"{missing} missing, {doubled} doubled, {len(foreign)} not of this episode{' e.g. ' + foreign[0] if foreign else ''}")


def exchange(buffer: Any, experience: Any, *, version: int, max_staleness: int | None, max_restarts: int,
             note: Callable[[str], None] | None = None, is_loss: Callable[[BaseException], bool] = is_actor_loss,
             sleep: Callable[[float], None] = time.sleep) -> Exchange:
    """Put `experience` into `buffer` (a BufferClient), evict samples older than `max_staleness` versions when
    given, take everything back; redone up to `max_restarts` times when the buffer actor is lost."""
    put_ids = [str(s) for s in experience.sample_ids]

    def once(attempt: int) -> Exchange:
        put = buffer.put(experience)
        evicted = buffer.evict_stale(version, max_staleness) if max_staleness is not None else 0
        taken = buffer.take_all()
        try:
            check_exactly_once(put_ids, [str(s) for b in taken for s in b.sample_ids], evicted)
        except BufferMismatch:
            # Samples missing and a new process behind the handle: it died and came back between our calls.
            # Asked only here, so an exchange costs no extra call when all is well.
            if put.pid and int(buffer.info()["pid"]) != put.pid:
                raise BufferRestarted(f"relay/buffer restarted (pid {put.pid}) between the put and the take") from None
            raise
        return Exchange(taken, put.size, evicted, attempt + 1)

    def lost(err: BaseException) -> bool:
        return isinstance(err, BufferRestarted) or is_loss(err)

    return redo_on_loss(once, getattr(buffer, "name", "relay/buffer"), max_restarts, is_loss=lost, note=note,
                        sleep=sleep)
