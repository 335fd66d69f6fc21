"""Prompt dispatch for `GeneratorPool`: the step loop that hands queued prompts to idle generators in chunks,
routes every reply, and turns finished chunks into `PromptResult`s, each prompt counted once (`DispatchLedger`)."""
from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import replace
from typing import Any

import ray

from relay.actors.pool_types import (
    ACTIVE,
    DRAINING,
    PoolError,
    PromptResult,
    _Member,
    _short,
    is_generator_failure,
)
from relay.actors.sampling import GenerationResult

# One logger name for every pool line, as before the pool was split into modules.
logger = logging.getLogger("relay.actors.pool")


class DispatchMixin:
    """Prompt flow of `GeneratorPool` (its state is set up in `GeneratorPool.__init__`)."""

    def _step(self, timeout: float) -> None:
        with self._lock:
            self._poll_control()
            self._check_deadlines()
            self._dispatch()
            refs = list(self._refs) + list(self._stopping)
        ready: list[Any] = []
        if refs:
            ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
            if ready:
                ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        elif timeout > 0:
            time.sleep(min(timeout, 0.05))
        errors: list[PoolError] = []
        with self._lock:
            for ref in ready:
                try:
                    self._handle(ref)
                except PoolError as err:
                    errors.append(err)
            self._dispatch()
        if errors:
            raise errors[0]

    def _handle(self, ref: Any) -> None:
        if ref in self._stopping:
            actor, _ = self._stopping.pop(ref)
            ray.kill(actor, no_restart=True)
            return
        entry = self._refs.pop(ref, None)
        if entry is None:
            return  # its member was removed meanwhile
        kind, name = entry
        m = self._members.get(name)
        if m is None:
            return
        try:
            value = ray.get(ref, timeout=0)
        except Exception as err:  # noqa: BLE001 - classified below
            if kind == "generate" and not is_generator_failure(err):
                self._on_request_error(m, err)
            elif kind == "load" and isinstance(err, ray.exceptions.ObjectLostError):
                # The kept weights went with their sender (a learner that died): not this generator's fault.
                # It waits, still loading, for the next push (`_catch_up_waiting`).
                logger.warning("generator pool: %s cannot load v%d, its buckets are gone with their sender "
                               "(%s); it waits for the next push", m.name, self.version, _short(err))
            else:
                if kind in ("ready", "load"):
                    self.counters["start_failures"] += 1
                self._remove(m, failed=True, reason=f"{kind}: {_short(err)}")
                self._reconcile()
            return
        if kind == "ready":
            m.pid, m.version, m.node_id = value["pid"], value["version"], value.get("node_id")
            self._bring_up_to_date(m)
        elif kind == "load":
            m.version = int(value["version"])
            self._bring_up_to_date(m)
        elif kind == "health":
            m.last_health = time.monotonic()
            if not value.get("ok", False):
                self._remove(m, failed=True, reason=f"health: {value.get('broken')}")
                self._reconcile()
        elif kind == "generate":
            self._on_generated(m, value)

    def _on_generated(self, m: _Member, results: list[GenerationResult]) -> None:
        chunk = self._ledger.complete(m.chunk_id) if m.chunk_id is not None else None
        m.chunk_id = None
        m.last_health = self._progress_at = time.monotonic()
        if chunk is not None:
            job = self._jobs[chunk.group]
            by_prompt: dict[int, list[GenerationResult]] = defaultdict(list)
            for r in results:
                by_prompt[r.prompt_index].append(r)
            for k, pid in enumerate(chunk.prompt_ids):
                samples = sorted(by_prompt.get(k, []), key=lambda r: r.sample_index)
                if len(samples) != job.sampling.n:
                    raise PoolError(f"{m.name} returned {len(samples)} samples for prompt {pid!r}, "
                                    f"expected {job.sampling.n}")
                for s in samples:
                    s.prompt_index = chunk.first_position + k
                    s.meta.update(prompt_id=pid, generator=m.name)
                self._done[pid] = PromptResult(pid, samples, samples[0].weight_version, m.name,
                                               self._ledger.attempts(pid))
        if m.state == DRAINING:
            self._remove(m, failed=False)

    def _on_request_error(self, m: _Member, err: BaseException) -> None:
        """The generator is alive but the call failed (e.g. a prompt longer than max_model_len)."""
        chunk_id, m.chunk_id = m.chunk_id, None
        if chunk_id is None:
            return
        requeued, exhausted = self._ledger.fail(chunk_id)
        logger.warning("generator pool: %s failed a chunk (%s); re-queued %d prompts",
                       m.name, _short(err), len(requeued))
        if m.state == DRAINING:
            self._remove(m, failed=False)
        if exhausted:
            self._ledger.forget(exhausted)
            for pid in exhausted:
                self._drop_from_job(pid)
            raise PoolError(f"{len(exhausted)} prompt(s) failed {self.options.max_attempts} times, e.g. "
                            f"{exhausted[:3]}: {_short(err)}")

    def _dispatch(self) -> None:
        idle = sorted((m for m in self._members.values() if m.state == ACTIVE and m.chunk_id is None),
                      key=lambda m: m.index)
        for i, m in enumerate(idle):
            if not self._ledger.queued:
                return
            size = math.ceil(self._ledger.queued / (len(idle) - i))
            if self.options.max_chunk_size:
                size = min(size, self.options.max_chunk_size)
            chunk = self._ledger.take(m.name, size)
            job = self._jobs[chunk.group]
            sampling = job.sampling
            if sampling.seed is not None:
                sampling = replace(sampling, seed=sampling.seed + chunk.first_position * sampling.n)
            prompts = [job.prompts[p] for p in chunk.prompt_ids]
            m.chunk_id, m.chunk_sent = chunk.chunk_id, time.monotonic()
            self._refs[m.actor.generate.remote(prompts, sampling)] = ("generate", m.name)

    def _pop(self, ids: Sequence[Hashable]) -> list[PromptResult]:
        out = [self._done.pop(i) for i in ids]
        self._ledger.forget(ids)
        for i in ids:
            self._drop_from_job(i)
        return out

    def _drop_from_job(self, pid: Hashable) -> None:
        for job_id, job in list(self._jobs.items()):
            if pid in job.prompts:
                job.remaining -= 1
                if job.remaining == 0:
                    del self._jobs[job_id]
                return
