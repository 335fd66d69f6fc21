"""The ExperienceBuffer: one Ray actor (`relay/buffer`) between collection and updates.

Samples are stored one by one (an `Experience` with B = 1, padding trimmed), keyed by `sample_ids`:

- **No double counting.** A sample id is accepted once per buffer lifetime: a second put of the same id (a
  producer retrying after a timeout, a re-dispatched prompt) is counted as a duplicate and dropped, even after
  the first copy was taken. The ids seen are kept for that (tens of bytes each).
- **Bounded, with back-pressure.** `put` is all-or-nothing and *blocks* while the new samples do not fit
  (up to `timeout_s`, then `BufferFull`, nothing stored). The actor is asynchronous, so a blocked put does not
  stop `take`/`sample`/`evict_stale` from freeing room; several producers may put concurrently. A put that
  timed out on the caller's side may still land later: retrying it is safe (duplicates are dropped).
  A single put larger than the whole buffer raises ValueError at once.
- **Nothing lost.** Counters satisfy ``put == size + taken + dropped + cleared`` at all times (`stats()`
  reports it as `balanced`); `duplicates` counts rejected copies.
- **Versioned.** Each sample carries the weight version that generated it; `stats(current_version)` gives
  staleness (current - version) and `evict_stale` drops samples older than `max_staleness` versions.

Sync mode (collect, then update): producers `put` one episode; the learner iterates `sample(batch, seed=epoch)`
for each PPO epoch (every sample exactly once per pass, shuffled), then `clear()`.
Async mode: producers keep putting; the learner calls `evict_stale(v, max_staleness)` and `take(n)` (oldest
first, removed from the buffer).
"""
from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any

import ray
import torch

from relay.buffer.experience import Experience


class BufferFull(RuntimeError):
    """`put` could not fit its samples within the timeout; nothing was stored."""


@dataclass
class PutResult:
    accepted: int
    duplicates: int
    size: int
    pid: int = 0  # the actor's process (set by the actor): a later, different pid means it was restarted empty


def trim(e: Experience) -> Experience:
    """Drop all-padding columns of a B = 1 experience: left prompt padding, right response padding."""
    a = e.response_length
    attn = e.attention_mask[0]
    prompt_len = attn.shape[0] - a
    real_prompt = torch.nonzero(attn[:prompt_len]).flatten()
    start = int(real_prompt[0]) if len(real_prompt) else prompt_len
    resp_used = (attn[prompt_len:] != 0) | (e.action_mask[0] != 0)
    used = torch.nonzero(resp_used).flatten()
    keep = int(used[-1]) + 1 if len(used) else 0
    if start == 0 and keep == a:
        return e
    out: dict[str, Any] = {}
    for f in fields(e):
        v = getattr(e, f.name)
        if f.name in ("sequences", "attention_mask"):
            v = torch.cat([v[:, start:prompt_len], v[:, prompt_len:prompt_len + keep]], dim=1)
        elif isinstance(v, torch.Tensor) and v.dim() == 2:
            v = v[:, :keep]
        out[f.name] = v
    return Experience(**out)


class ExperienceStore:
    """The buffer's state and rules, without Ray (the actor adds waiting)."""

    def __init__(self, limit: int, pad_token_id: int = 0, seed: int = 0):
        if limit < 1:
            raise ValueError(f"ExperienceBuffer limit must be >= 1, got {limit}")
        self.limit, self.pad_token_id = limit, pad_token_id
        self._items: dict[str, Experience] = {}  # insertion order = arrival order (take is FIFO)
        self._seen: set[str] = set()
        self._rng = random.Random(seed)
        self.counts = {"put": 0, "duplicates": 0, "taken": 0, "dropped": 0, "cleared": 0, "sampled": 0,
                       "passes": 0}

    def __len__(self) -> int:
        return len(self._items)

    def free(self) -> int:
        return self.limit - len(self._items)

    def new_ids(self, experience: Experience) -> list[str]:
        """Sample ids of `experience` not seen before (first occurrence only)."""
        ids = [str(s) for s in experience.sample_ids]
        if len(ids) != len(experience):
            raise ValueError(f"Experience has {len(experience)} samples but {len(ids)} sample_ids")
        out, batch = [], set()
        for sid in ids:
            if sid not in self._seen and sid not in batch:
                out.append(sid)
                batch.add(sid)
        return out

    def put(self, experience: Experience) -> PutResult:
        """Store the new samples of `experience` (all or none; BufferFull when they do not fit)."""
        new = self.new_ids(experience)
        if len(new) > self.limit:
            raise ValueError(f"put of {len(new)} samples can never fit a buffer of {self.limit}")
        if len(new) > self.free():
            raise BufferFull(f"{len(new)} new samples do not fit ({len(self)}/{self.limit} used)")
        wanted = set(new)
        for item in experience.split():
            sid = str(item.sample_ids[0])
            if sid in wanted:
                wanted.discard(sid)  # a duplicate inside the batch keeps its first copy
                self._items[sid] = trim(item)
                self._seen.add(sid)
        self.counts["put"] += len(new)
        self.counts["duplicates"] += len(experience) - len(new)
        return PutResult(len(new), len(experience) - len(new), len(self))

    def _collate(self, ids: list[str]) -> Experience:
        return Experience.collate([self._items[i] for i in ids], self.pad_token_id)

    def _order(self, shuffle: bool, seed: int | None) -> list[str]:
        ids = list(self._items)
        if shuffle:
            (random.Random(seed) if seed is not None else self._rng).shuffle(ids)
        return ids

    def sample(self, batch_size: int, shuffle: bool = True, seed: int | None = None,
               drop_last: bool = False) -> list[Experience]:
        """One pass over everything held, as collated mini-batches; nothing is removed."""
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        ids = self._order(shuffle, seed)
        batches = [ids[i:i + batch_size] for i in range(0, len(ids), batch_size)]
        if drop_last and batches and len(batches[-1]) < batch_size:
            batches.pop()
        self.counts["sampled"] += sum(len(b) for b in batches)
        self.counts["passes"] += 1
        return [self._collate(b) for b in batches]

    def take(self, n: int, shuffle: bool = False, seed: int | None = None) -> Experience | None:
        """Remove and return up to `n` samples, oldest first (then shuffled inside the batch if asked)."""
        ids = list(self._items)[:n]
        if not ids:
            return None
        if shuffle:
            (random.Random(seed) if seed is not None else self._rng).shuffle(ids)
        batch = self._collate(ids)
        self._remove(ids, "taken")
        return batch

    def take_all(self, batch_size: int | None = None, shuffle: bool = False,
                 seed: int | None = None) -> list[Experience]:
        """Remove everything, returned as mini-batches of `batch_size` (one batch when None)."""
        ids = self._order(shuffle, seed)
        if not ids:
            return []
        size = batch_size or len(ids)
        out = [self._collate(ids[i:i + size]) for i in range(0, len(ids), size)]
        self._remove(ids, "taken")
        return out

    def clear(self, forget: bool = False) -> int:
        """Discard everything (e.g. after the PPO epochs of a sync episode); returns how many. `forget`: also
        forget which sample ids were seen, so they may be put again (a run that went back to a checkpoint)."""
        n = len(self._items)
        self._remove(list(self._items), "cleared")
        if forget:
            self._seen.clear()
        return n

    def evict_stale(self, current_version: int, max_staleness: int) -> int:
        """Drop samples generated more than `max_staleness` versions before `current_version`."""
        old = [i for i, e in self._items.items() if current_version - int(e.weight_version[0]) > max_staleness]
        self._remove(old, "dropped")
        return len(old)

    def _remove(self, ids: Iterable[str], counter: str) -> None:
        n = 0
        for i in ids:
            del self._items[i]
            n += 1
        self.counts[counter] += n

    def stats(self, current_version: int | None = None) -> dict[str, Any]:
        versions = [int(e.weight_version[0]) for e in self._items.values()]
        c = self.counts
        out: dict[str, Any] = {"size": len(self), "limit": self.limit, **c,
                               "balanced": c["put"] == len(self) + c["taken"] + c["dropped"] + c["cleared"],
                               "version_min": min(versions) if versions else None,
                               "version_max": max(versions) if versions else None}
        if current_version is not None:
            stale = [current_version - v for v in versions]
            out["staleness_mean"] = sum(stale) / len(stale) if stale else 0.0
            out["staleness_max"] = max(stale) if stale else 0
        return out


class _BufferActor:
    """Async Ray actor around ExperienceStore: `put` waits for room without blocking other calls."""

    def __init__(self, limit: int, pad_token_id: int = 0, seed: int = 0, put_timeout_s: float = 300.0):
        self.store = ExperienceStore(limit, pad_token_id, seed)
        self.put_timeout_s = put_timeout_s
        self._cond: asyncio.Condition | None = None

    def _condition(self) -> asyncio.Condition:
        if self._cond is None:  # created on the actor's event loop
            self._cond = asyncio.Condition()
        return self._cond

    async def put(self, experience: Experience, timeout_s: float | None = None) -> PutResult:
        cond = self._condition()
        timeout_s = self.put_timeout_s if timeout_s is None else timeout_s
        async with cond:
            if len(self.store.new_ids(experience)) > self.store.limit:
                return self.store.put(experience)  # raises ValueError: it can never fit
            try:
                await asyncio.wait_for(
                    cond.wait_for(lambda: len(self.store.new_ids(experience)) <= self.store.free()), timeout_s)
            except asyncio.TimeoutError:
                raise BufferFull(f"buffer full for {timeout_s:g} s ({len(self.store)}/{self.store.limit} used); "
                                 "nothing stored") from None
            result = self.store.put(experience)
            result.pid = os.getpid()
            cond.notify_all()  # wake `take` callers waiting for samples
            return result

    async def _freed(self, result: Any) -> Any:
        cond = self._condition()
        async with cond:
            cond.notify_all()
        return result

    async def take(self, n: int, timeout_s: float = 0.0, partial: bool = True, shuffle: bool = False,
                   seed: int | None = None) -> Experience | None:
        """Remove up to `n` samples (oldest first). Waits up to `timeout_s` for `n` to be there; then returns
        what there is (`partial`) or None."""
        cond = self._condition()
        async with cond:
            if timeout_s > 0:
                try:
                    await asyncio.wait_for(cond.wait_for(lambda: len(self.store) >= n), timeout_s)
                except asyncio.TimeoutError:
                    pass
            if len(self.store) < n and not partial:
                return None
            batch = self.store.take(n, shuffle, seed)
            cond.notify_all()
            return batch

    async def sample(self, batch_size: int, shuffle: bool = True, seed: int | None = None,
                     drop_last: bool = False) -> list[Experience]:
        return self.store.sample(batch_size, shuffle, seed, drop_last)

    async def take_all(self, batch_size: int | None = None, shuffle: bool = False,
                       seed: int | None = None) -> list[Experience]:
        return await self._freed(self.store.take_all(batch_size, shuffle, seed))

    async def clear(self, forget: bool = False) -> int:
        return await self._freed(self.store.clear(forget))

    async def evict_stale(self, current_version: int, max_staleness: int) -> int:
        return await self._freed(self.store.evict_stale(current_version, max_staleness))

    async def size(self) -> int:
        return len(self.store)

    async def stats(self, current_version: int | None = None) -> dict[str, Any]:
        # the pid tells a driver that Ray restarted the actor (a new process, an empty buffer)
        return {**self.store.stats(current_version), "pid": os.getpid()}


ExperienceBuffer = ray.remote(_BufferActor)
"""The Ray actor class; `start_buffer` names it relay/buffer."""


@dataclass
class BufferClient:
    """Driver/learner-side handle of the buffer; every call has a timeout (RemoteCallTimeout)."""

    actor: Any
    timeout_s: float = 300.0
    name: str = "relay/buffer"

    def _get(self, ref: Any, what: str, timeout_s: float | None = None) -> Any:
        from relay.cluster.calls import get

        return get(ref, timeout_s or self.timeout_s, f"{self.name}.{what}")

    def put(self, experience: Experience, timeout_s: float | None = None) -> PutResult:
        """Blocks while the buffer is full (BufferFull after `timeout_s`, default the actor's)."""
        wait = timeout_s if timeout_s is not None else self.timeout_s
        return self._get(self.actor.put.remote(experience, timeout_s), "put", wait + 30)

    def put_async(self, experience: Experience, timeout_s: float | None = None) -> Any:
        return self.actor.put.remote(experience, timeout_s)

    def take(self, n: int, timeout_s: float = 0.0, partial: bool = True, shuffle: bool = False,
             seed: int | None = None) -> Experience | None:
        return self._get(self.actor.take.remote(n, timeout_s, partial, shuffle, seed), "take", timeout_s + 60)

    def sample(self, batch_size: int, shuffle: bool = True, seed: int | None = None,
               drop_last: bool = False) -> list[Experience]:
        return self._get(self.actor.sample.remote(batch_size, shuffle, seed, drop_last), "sample")

    def take_all(self, batch_size: int | None = None, shuffle: bool = False,
                 seed: int | None = None) -> list[Experience]:
        return self._get(self.actor.take_all.remote(batch_size, shuffle, seed), "take_all")

    def clear(self, forget: bool = False) -> int:
        return self._get(self.actor.clear.remote(forget), "clear")

    def evict_stale(self, current_version: int, max_staleness: int) -> int:
        return self._get(self.actor.evict_stale.remote(current_version, max_staleness), "evict_stale")

    def size(self) -> int:
        return self._get(self.actor.size.remote(), "size", 60)

    def stats(self, current_version: int | None = None, timeout_s: float = 60.0) -> dict[str, Any]:
        return self._get(self.actor.stats.remote(current_version), "stats", timeout_s)

    def info(self, timeout_s: float = 60.0) -> dict[str, Any]:
        """Its process id and counters (`stats`; the name every Relay actor client answers to)."""
        return self.stats(timeout_s=timeout_s)

    def kill(self) -> None:
        ray.kill(self.actor, no_restart=True)


def start_buffer(limit: int, name: str = "buffer", pad_token_id: int = 0, seed: int = 0,
                 put_timeout_s: float = 300.0, num_cpus: float = 0.5, timeout_s: float = 300.0,
                 max_restarts: int = 0, **options: Any) -> BufferClient:
    """Start the `relay/<name>` buffer actor and wait until it answers. Ray restarts it (empty) up to
    `max_restarts` times if its process dies, without re-running the calls in flight: what the buffer held is
    gone, so its caller redoes its exchange (`relay.launch.ppo_buffer`)."""
    from relay.cluster.calls import get
    from relay.cluster.options import actor_options
    from relay.restarts import restart_options

    opts = actor_options(name=name, num_cpus=num_cpus, **{**restart_options(max_restarts, retry_calls=False),
                                                          **options})
    actor = ExperienceBuffer.options(**opts).remote(limit, pad_token_id, seed, put_timeout_s)
    get(actor.size.remote(), 120, f"relay/{name} start")
    return BufferClient(actor, timeout_s, opts["name"])
