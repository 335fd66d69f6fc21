"""`GeneratorPool`: N vLLM generator actors behind one driver-side object that can be resized while it works
and replaces generators that die, without losing or repeating a prompt.

How it keeps its promises:

- **Exactly once.** Prompts are split into chunks (contiguous runs of one submission) and tracked by the pure
  `DispatchLedger`. A chunk counts only while it is live; when its generator dies, hangs past
  `generate_timeout_s`, reports itself broken (e.g. its vLLM engine process died: the generator notices, and
  the pool health-checks busy and idle generators) or is removed, the generator is killed first and the
  chunk's prompts go back to the queue, so a late reply can never be counted as well.
- **Current weights only.** A push runs where the weights are (a learner's rank 0, `weight_push.WeightPush`),
  never through this object: the sender leaves the buckets in the object store and the pool keeps only their
  refs. A new or replacement generator loads them before it is given any work, and its reported version is
  checked; Ray's own actor restart is not used because it would bring a generator back with the folder's
  weights. When the sender died with its buckets, new generators wait for the next push.
- **Names.** Generators are `relay/<name_prefix>-<i>` with a pool-wide counter: an index is never reused, so
  logs and the dashboard tell a replacement from the generator it replaced.
- **Scaling.** `scale(n)` starts generators in the background (work continues on the others meanwhile) and
  removes idle ones at once and busy ones after their chunk (or at once with `drain=False`, their prompts
  re-queued). Another process asks through the `relay/control` actor (`relay scale --generators N`), which
  the pool polls whenever it is stepped (`generate`, `collect`, `wait_ready`).

Sampling seeds: chunk prompt k of a submission gets the seed it would have had in one unsplit call
(`seed + k * n`, as `Generator.generate` does), so with a seed the samples do not depend on how prompts were
split or on which generator ran them (up to the engine's batch-dependent numerics).

Use from one thread; `push_weights` and `scale` may also be called from a second thread while another
`generate` runs (all state is guarded by one lock, which is released while waiting on Ray).

Usage (the PPO driver)::

    pool = GeneratorPool(GeneratorConfig(model=folder), 2, PoolOptions(control_name="control"))
    # sync: collect, update, push
    results = pool.generate(prompt_ids, sampling, ids=[f"ep{e}-{i}" for i in ...])  # list[PromptResult]
    pool.push_weights(actor_group.publish_weights, version=e + 1)  # the learner sends; the driver holds no tensors
    # async: keep the queue fed, collect what is finished, push whenever the learner has new weights
    pool.submit(prompt_ids, sampling, ids=...)
    for r in pool.collect(timeout_s=1.0): ...  # r.prompt_id, r.samples, r.weight_version, r.sample_ids()
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import ray

from relay.actors.control import start_control
from relay.actors.generator import GeneratorClient, GeneratorConfig
from relay.actors.ledger import DispatchLedger
from relay.actors.pool_dispatch import DispatchMixin
from relay.actors.pool_members import MembershipMixin
from relay.actors.pool_types import (
    ACTIVE,
    DRAINING,
    LOADING,
    STARTING,
    PoolError,
    PoolOptions,
    PromptResult,
    _Job,
    _Member,
    _Weights,
    is_generator_failure,
    stalled,
)
from relay.actors.sampling import SamplingConfig
from relay.actors.weight_push import WeightPush, push_error
from relay.cluster.calls import RemoteCallTimeout, get, waiting_actors_text

# Callers import the pool's data classes and error from here, where they lived before the split.
__all__ = ["ACTIVE", "DRAINING", "LOADING", "STARTING", "GeneratorPool", "PoolError", "PoolOptions", "PromptResult",
           "is_generator_failure"]

logger = logging.getLogger(__name__)


class GeneratorPool(MembershipMixin, DispatchMixin):
    """N generators, resizable while working; see the module docstring. Also a context manager."""

    def __init__(self, config: GeneratorConfig, num_generators: int, options: PoolOptions | None = None,
                 wait: bool = True):
        if num_generators < 1:
            raise ValueError("GeneratorPool needs at least one generator")
        self.config = config
        self.options = options or PoolOptions()
        self._lock = threading.RLock()
        self._ledger = DispatchLedger(self.options.max_attempts)
        self._members: dict[str, _Member] = {}
        self._refs: dict[Any, tuple[str, str]] = {}  # ObjectRef -> (kind, member name)
        self._stopping: dict[Any, tuple[Any, float]] = {}  # shutdown ref -> (actor, deadline)
        self._jobs: dict[int, _Job] = {}
        self._done: dict[Hashable, PromptResult] = {}
        self._next_index = 0
        self._next_job = 0
        self._target = num_generators
        self._weights: _Weights | None = None
        self._progress_at = time.monotonic()  # a chunk finished or a generator became active (see stall_timeout_s)
        self.counters = {"started": 0, "failed": 0, "removed": 0, "start_failures": 0}
        self._control = None
        self._control_seq = 0
        self._control_polled = 0.0
        if self.options.control_name:
            self._control = start_control(num_generators, self.options.control_name)
            get(self._control.desired.remote(), 60, "control actor start")
        self._reconcile()
        if wait:
            try:
                self.wait_ready(self.options.start_timeout_s)
            except BaseException:
                self.shutdown()  # the caller gets no pool to stop: its generators must not linger in the cluster
                raise

    # ------------------------------------------------------------------------------------------ public API

    @property
    def version(self) -> int:
        """Current weight version (0 = the model folder's weights)."""
        return self._weights.version if self._weights else 0

    @property
    def target(self) -> int:
        return self._target

    def size(self) -> int:
        """Generators that take work now (active)."""
        with self._lock:
            return sum(1 for m in self._members.values() if m.state == ACTIVE)

    def submit(self, prompts: Sequence[Sequence[int]] | Mapping[Hashable, Sequence[int]],
               sampling: SamplingConfig | None = None, ids: Sequence[Hashable] | None = None) -> list[Hashable]:
        """Queue prompts (token ids; a mapping id -> tokens, or a list with optional `ids`); returns the ids.

        Ids must be unique among prompts not yet collected (ValueError otherwise). Work starts at the next
        `collect`/`generate` step."""
        sampling = sampling or SamplingConfig()
        with self._lock:
            job_id = self._next_job
            self._next_job += 1
            if isinstance(prompts, Mapping):
                ids, token_lists = list(prompts.keys()), list(prompts.values())
            else:
                token_lists = list(prompts)
                ids = list(ids) if ids is not None else [f"{job_id}:{k}" for k in range(len(token_lists))]
            if len(ids) != len(token_lists):
                raise ValueError(f"submit: {len(ids)} ids for {len(token_lists)} prompts")
            if not ids:
                return []
            self._ledger.add(ids, group=job_id)
            self._jobs[job_id] = _Job(sampling, {i: [int(t) for t in p] for i, p in zip(ids, token_lists)}, len(ids))
            return ids

    def collect(self, timeout_s: float = 0.0, ids: Sequence[Hashable] | None = None) -> list[PromptResult]:
        """Advance the pool for up to `timeout_s` and return (and forget) finished prompts: those in `ids`
        only when given, else all finished ones, in completion order."""
        deadline = time.monotonic() + timeout_s
        while True:
            self._step(max(0.0, min(0.5, deadline - time.monotonic())))
            if time.monotonic() >= deadline:
                break
        with self._lock:
            wanted = [i for i in (ids if ids is not None else list(self._done)) if i in self._done]
            return self._pop(wanted)

    def generate(self, prompts: Sequence[Sequence[int]] | Mapping[Hashable, Sequence[int]],
                 sampling: SamplingConfig | None = None, ids: Sequence[Hashable] | None = None,
                 timeout_s: float | None = None) -> list[PromptResult]:
        """Submit and wait: one PromptResult per prompt, in input order. RemoteCallTimeout after `timeout_s`, or
        without one after `options.stall_timeout_s` without progress (the prompts stay in the pool; a later
        `collect` returns them)."""
        ids = self.submit(prompts, sampling, ids)
        started = time.monotonic()
        deadline = None if timeout_s is None else started + timeout_s
        stall_s = self.options.stall_limit_s() if timeout_s is None else None
        wanted = set(ids)
        while True:
            with self._lock:
                if all(i in self._done for i in wanted):
                    return self._pop(ids)
                left = sum(1 for i in wanted if i not in self._done)
            now = time.monotonic()
            if deadline is not None and now > deadline:
                raise RemoteCallTimeout(f"GeneratorPool.generate: {len(ids)} prompts not done in {timeout_s:.0f} s")
            if stall_s is not None and stalled(started, self._progress_at, now, stall_s):
                raise RemoteCallTimeout(
                    f"GeneratorPool.generate: no progress in {stall_s:.0f} s (no chunk finished, no generator "
                    f"became active), {left} of {len(ids)} prompts not done: {self.status()}")
            self._step(0.5)

    def pending(self) -> int:
        """Prompts submitted and not yet finished (queued or being generated)."""
        with self._lock:
            return self._ledger.unfinished()

    def push_weights(self, send: Callable[[WeightPush], dict], version: int, timeout_s: float | None = None,
                     rewind: bool = False) -> dict:
        """Have the process holding the weights load them into every active generator as `version`.

        `send(push)` runs a `WeightPush` (generator handles, node ids, version) where the weights are, e.g.
        `LearnerGroup.publish_weights` (the learner's rank 0 pushes them: same-node generators through its
        node's /dev/shm, others through the object store), or `weight_push.local_sender(state_dict)` for
        weights held in this process; the driver passes only handles and refs, never tensors. The sender
        leaves the buckets in the object store and the pool keeps their refs for generators started later.
        Generators that die or break during the push are replaced (the replacement starts with these
        weights). Raises WeightUpdateError when no generator could load them (e.g. they do not fit the model);
        the previous weights then stay current. An error of the sender itself (a dead learner) is raised as
        it is, the pool unchanged. `rewind`: `version` may be older than the current one (a run that went
        back to a checkpoint; call it while no work is queued)."""
        if isinstance(send, Mapping) or not callable(send):
            raise TypeError("GeneratorPool.push_weights takes a sender (LearnerGroup.publish_weights, or "
                            "weight_push.local_sender(state_dict) for weights held in this process), not the "
                            f"weights themselves (got {type(send).__name__})")
        timeout_s = timeout_s or self.options.weight_timeout_s
        with self._lock:
            if version <= self.version and not rewind:
                raise ValueError(f"push_weights: version {version} is not newer than the current {self.version}")
            targets = [m for m in self._members.values() if m.state == ACTIVE]
            push = WeightPush([m.actor for m in targets], version, nodes=[m.node_id for m in targets],
                              strategy=self.options.push_strategy, timeout_s=timeout_s, rewind=rewind, keep=True,
                              reuse=True, names=[m.name for m in targets])
            report = dict(send(push))
            blobs = list(report.pop("blobs", None) or [])
            if not blobs:
                raise ValueError("push_weights: the sender kept no buckets for late joiners (WeightPush.keep)")
            previous, self._weights = self._weights, _Weights(version, blobs)
            if (err := push_error(report, push)) is not None:
                report.update(self._recover_push(targets, version, err, previous, rewind))
            for m in targets:
                if m.name in self._members:
                    m.version = version
            self._catch_up_waiting()
            return report

    def scale(self, n: int, wait: bool = False, drain: bool = True, timeout_s: float | None = None) -> None:
        """Resize to `n` generators. New ones start in the background and load the current weights before
        taking work; removed ones are idle ones first, then the newest busy ones, which finish their chunk
        first (`drain=True`) or are stopped at once with their prompts re-queued. `wait` blocks (while still
        generating) until the pool has exactly `n` active generators at the current version."""
        if n < 1:
            raise ValueError(f"GeneratorPool.scale: n must be >= 1, got {n}")
        with self._lock:
            logger.info("generator pool: scale %d -> %d", self._target, n)
            self._target = n
            live = [m for m in self._members.values() if m.state != DRAINING]
            excess = len(live) - n
            if excess > 0:
                rank = {STARTING: 0, LOADING: 0, ACTIVE: 1}
                order = sorted(live, key=lambda m: (rank[m.state] + (m.chunk_id is not None), -m.index))
                for m in order[:excess]:
                    if m.state != ACTIVE or m.chunk_id is None or not drain:
                        self._remove(m, failed=False)
                    else:
                        m.state = DRAINING  # finishes its chunk, then `_on_generated` stops it
            self._reconcile()
        if wait:
            self.wait_ready(timeout_s or self.options.start_timeout_s)

    def poll_control(self) -> None:
        """Apply a pending outside request (`relay scale`) now. While stepped, the pool polls its control
        actor at most every `control_poll_s`, so a request can wait a whole short episode; drivers call this
        at their natural boundaries (the PPO driver: before each episode)."""
        with self._lock:
            self._control_polled = 0.0
            self._poll_control()

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Step the pool until it has `target` active generators at the current version and none draining."""
        timeout_s = timeout_s or self.options.start_timeout_s
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                states = [m.state for m in self._members.values()]
                if states.count(ACTIVE) == self._target == len(states) and all(
                        m.version == self.version for m in self._members.values()):
                    return
            if time.monotonic() > deadline:
                with self._lock:
                    waiting = {m.name: m.actor for m in self._members.values() if m.state == STARTING}
                why = f"; Ray says {waiting_actors_text(waiting)}" if waiting else ""
                raise RemoteCallTimeout(f"generator pool not ready within {timeout_s:.0f} s: {self.status()}{why}")
            self._step(0.5)

    def clients(self) -> dict[str, GeneratorClient]:
        """Active generators as `GeneratorClient`s (for direct calls in tests and tools)."""
        with self._lock:
            return {m.name: GeneratorClient(m.actor, m.name) for m in self._members.values() if m.state == ACTIVE}

    def versions(self, timeout_s: float = 30.0) -> dict[str, int]:
        """Weight version reported by each active generator (asked now, not remembered)."""
        return self._ask("version", timeout_s)

    def pids(self, timeout_s: float = 30.0) -> dict[str, int]:
        """Process id of each active generator."""
        return self._ask("pid", timeout_s)

    def status(self) -> dict[str, Any]:
        """Members, ledger counts and counters (also what `relay scale --status` shows)."""
        with self._lock:
            c = self._ledger.counts
            return {
                "target": self._target,
                "active": sum(1 for m in self._members.values() if m.state == ACTIVE),
                "version": self.version,
                "members": {m.name: {"state": m.state, "pid": m.pid, "version": m.version, "node": m.node_id,
                                     "busy": m.chunk_id is not None} for m in self._members.values()},
                "queued": self._ledger.queued,
                "in_flight": self._ledger.in_flight,
                "submitted": c.submitted, "completed": c.completed, "reassigned": c.reassigned,
                "stale_replies": c.stale, "completed_by": dict(c.by_worker),
                **self.counters,
            }

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop every generator (and the control actor). Unfinished prompts are dropped."""
        with self._lock:
            for m in list(self._members.values()):
                self._remove(m, failed=False)
            self._target = 0
            if self._stopping:  # give engines a moment to free their temp folders, then end them
                ray.wait(list(self._stopping), num_returns=len(self._stopping), timeout=max(0.1, timeout_s))
            for actor, _ in self._stopping.values():
                ray.kill(actor, no_restart=True)
            self._stopping.clear()
            if self._control is not None:
                ray.kill(self._control, no_restart=True)
                self._control = None

    def __enter__(self) -> GeneratorPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
