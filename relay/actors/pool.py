"""`GeneratorPool`: N vLLM generator actors behind one driver-side object that can be resized while it works
and replaces generators that die, without losing or repeating a prompt.

How it keeps its promises:

- **Exactly once.** Prompts are split into chunks (contiguous runs of one submission) and tracked by the pure
  `DispatchLedger`. A chunk counts only while it is live; when its generator dies, hangs past
  `generate_timeout_s` or is removed, the generator is killed first and the chunk's prompts go back to the
  queue, so a late reply can never be counted as well.
- **Current weights only.** The pool remembers the last pushed weights (the state dict, or its safetensors
  buckets in the object store). A new or replacement generator loads them before it is given any work, and
  its reported version is checked; Ray's own actor restart is not used because it would bring a generator
  back with the folder's weights.
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
    pool.push_weights(actor_group_state_dict, version=e + 1)
    # async: keep the queue fed, collect what is finished, push whenever the learner has new weights
    pool.submit(prompt_ids, sampling, ids=...)
    for r in pool.collect(timeout_s=1.0): ...  # r.prompt_id, r.samples, r.weight_version, r.sample_ids()
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections import defaultdict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import ray

from relay.actors import weight_sync
from relay.actors.control import start_control
from relay.actors.generator import Generator, GeneratorBroken, GeneratorClient, GeneratorConfig
from relay.actors.ledger import DispatchLedger
from relay.actors.sampling import GenerationResult, SamplingConfig
from relay.launch.cluster import NAMESPACE, RemoteCallTimeout, actor_options, get

logger = logging.getLogger(__name__)

STARTING, LOADING, ACTIVE, DRAINING = "starting", "loading", "active", "draining"


class PoolError(RuntimeError):
    """The pool cannot finish: prompts failed `max_attempts` times, or generators keep dying."""


@dataclass
class PoolOptions:
    """How a `GeneratorPool` starts, feeds and watches its generators."""

    name_prefix: str = "generator"
    """Actors are named `relay/<name_prefix>-<i>`."""
    num_cpus: float | None = None
    """Logical CPUs per generator; None = what `start_generator` would reserve (cpu_threads)."""
    num_gpus: float | None = None
    """GPUs per generator; None = tensor_parallel_size when the cluster has GPUs, else 0."""
    max_chunk_size: int | None = None
    """Most prompts per generate call. None = split the queue evenly over idle generators (best throughput);
    a small value lets newly added generators share a long batch and shortens the tail."""
    start_timeout_s: float = 300.0
    generate_timeout_s: float = 600.0
    """Per chunk: a generator that takes longer is killed and replaced; its prompts are re-dispatched."""
    weight_timeout_s: float = 600.0
    max_attempts: int = 3
    """Dispatches per prompt before the pool gives up on it (PoolError)."""
    max_failures: int = 16
    """Generator failures (died, broken, hung, failed start) the pool absorbs by replacing them before it
    gives up with PoolError."""
    keep_weights: str = "memory"
    """How the current weights are kept for late joiners: "memory" keeps a reference to the pushed state dict
    (no extra work per push; do not modify its tensors in place afterwards), "object_store" serializes them
    into the Ray object store at every push (driver memory freed; costs a serialization per push)."""
    push_strategy: str = "auto"
    """weight_sync strategy: auto, shm or object_store."""
    control_name: str | None = None
    """Create and poll this control actor (e.g. "control" -> relay/control); None = no outside control."""
    control_poll_s: float = 1.0
    health_interval_s: float = 5.0
    """Idle generators are health-checked this often, so one that died while idle is replaced early."""

    def __post_init__(self) -> None:
        if self.keep_weights not in ("memory", "object_store"):
            raise ValueError(f"PoolOptions.keep_weights must be memory or object_store, not {self.keep_weights!r}")
        if self.max_chunk_size is not None and self.max_chunk_size < 1:
            raise ValueError("PoolOptions.max_chunk_size must be >= 1 or None")


@dataclass
class PromptResult:
    """All `n` samples of one prompt, from one generate call on one generator."""

    prompt_id: Hashable
    samples: list[GenerationResult]
    """In sample_index order; each sample's `prompt_index` is the prompt's position in its submission."""
    weight_version: int
    generator: str
    attempts: int
    """Dispatches it took (1 unless a generator died, hung or was removed while holding it)."""

    def sample_ids(self) -> list[str]:
        """Stable unique ids for the samples (use them as `Experience.sample_ids`)."""
        return [f"{self.prompt_id}/{s.sample_index}" for s in self.samples]


@dataclass
class _Member:
    index: int
    name: str
    actor: Any
    state: str = STARTING
    since: float = field(default_factory=time.monotonic)
    pid: int | None = None
    version: int = 0
    chunk_id: int | None = None
    chunk_sent: float = 0.0
    last_health: float = field(default_factory=time.monotonic)


@dataclass
class _Job:
    sampling: SamplingConfig
    prompts: dict[Hashable, list[int]]
    remaining: int


class _Weights:
    """The last pushed weights, kept so that late joiners load exactly them."""

    def __init__(self, version: int, state_dict: Mapping[str, Any], keep: str):
        self.version = version
        self._state_dict: Mapping[str, Any] | None = state_dict
        self._blobs: list[Any] | None = None
        if keep == "object_store":
            self.blob_refs()
            self._state_dict = None

    def blob_refs(self) -> list[Any]:
        """Safetensors buckets in the object store (made on first use, then shared by every joiner)."""
        if self._blobs is None:
            meta = {"relay_version": str(self.version)}
            self._blobs = [ray.put(b) for b in weight_sync.iter_serialized_buckets(self._state_dict, metadata=meta)]
        return self._blobs


def is_generator_failure(err: BaseException) -> bool:
    """True when the generator itself is gone or unusable (replace it), False for an error in the request."""
    if isinstance(err, (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, GeneratorBroken)):
        return True
    cause = getattr(err, "cause", None)
    return isinstance(cause, GeneratorBroken)


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[-1][:300] if text else ''}"


class GeneratorPool:
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
        self.counters = {"started": 0, "failed": 0, "removed": 0, "start_failures": 0}
        self._control = None
        self._control_seq = 0
        self._control_polled = 0.0
        if self.options.control_name:
            self._control = start_control(num_generators, self.options.control_name)
            get(self._control.desired.remote(), 60, "control actor start")
        self._reconcile()
        if wait:
            self.wait_ready(self.options.start_timeout_s)

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
        """Submit and wait: one PromptResult per prompt, in input order. RemoteCallTimeout after `timeout_s`
        (the prompts stay in the pool; a later `collect` returns them)."""
        ids = self.submit(prompts, sampling, ids)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        wanted = set(ids)
        while True:
            with self._lock:
                if all(i in self._done for i in wanted):
                    return self._pop(ids)
            if deadline is not None and time.monotonic() > deadline:
                raise RemoteCallTimeout(f"GeneratorPool.generate: {len(ids)} prompts not done in {timeout_s:.0f} s")
            self._step(0.5)

    def pending(self) -> int:
        """Prompts submitted and not yet finished (queued or being generated)."""
        with self._lock:
            return self._ledger.unfinished()

    def push_weights(self, state_dict: Mapping[str, Any], version: int, timeout_s: float | None = None) -> dict:
        """Load `state_dict` (HF names) into every active generator as `version` (via `weight_sync`) and keep
        it for generators started later. Generators that die or break during the push are replaced (the
        replacement starts with these weights). Raises WeightUpdateError when no generator could load it
        (e.g. it does not fit the model); the previous weights then stay current."""
        timeout_s = timeout_s or self.options.weight_timeout_s
        with self._lock:
            if version <= self.version:
                raise ValueError(f"push_weights: version {version} is not newer than the current {self.version}")
            previous, self._weights = self._weights, _Weights(version, state_dict, self.options.keep_weights)
            targets = [m for m in self._members.values() if m.state == ACTIVE]
            try:
                report = weight_sync.push_weights([m.actor for m in targets], state_dict, version,
                                                  strategy=self.options.push_strategy, timeout_s=timeout_s)
            except (weight_sync.WeightUpdateError, RemoteCallTimeout) as err:
                report = self._recover_push(targets, version, err, previous)
            except Exception as err:  # noqa: BLE001 - a generator that died since the last step (e.g. its
                # `node_id` probe raises ActorDiedError) is replaced like one that fails the load itself
                if not is_generator_failure(err):
                    raise
                report = self._recover_push(targets, version, err, previous)
            for m in targets:
                if m.name in self._members:
                    m.version = version
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
                raise RemoteCallTimeout(f"generator pool not ready within {timeout_s:.0f} s: {self.status()}")
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
                "members": {m.name: {"state": m.state, "pid": m.pid, "version": m.version,
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

    # ------------------------------------------------------------------------------------------ internals

    def _ask(self, method: str, timeout_s: float) -> dict[str, Any]:
        with self._lock:
            members = [m for m in self._members.values() if m.state == ACTIVE]
        refs = [getattr(m.actor, method).remote() for m in members]
        out: dict[str, Any] = {}
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        with self._lock:
            for m, ref in zip(members, refs):
                try:
                    out[m.name] = ray.get(ref, timeout=0)
                except Exception as err:  # noqa: BLE001 - dead ones are replaced, others reported
                    if is_generator_failure(err) and m.name in self._members:
                        self._remove(m, failed=True, reason=_short(err))
                        self._reconcile()
                    elif isinstance(err, ray.exceptions.GetTimeoutError):
                        raise RemoteCallTimeout(f"{m.name}.{method} did not answer in {timeout_s:.0f} s") from err
                    elif not is_generator_failure(err):
                        raise
        return out

    def _free_name(self) -> tuple[int, str]:
        while True:
            index, self._next_index = self._next_index, self._next_index + 1
            name = f"{self.options.name_prefix}-{index}"
            try:  # a leftover actor from an earlier pool may hold the name: skip the index
                ray.get_actor(f"relay/{name}", namespace=NAMESPACE)
            except ValueError:
                return index, name

    def _reconcile(self) -> None:
        """Start generators until `target` are live (not draining)."""
        live = sum(1 for m in self._members.values() if m.state != DRAINING)
        for _ in range(self._target - live):
            index, name = self._free_name()
            cfg = self.config
            num_cpus = self.options.num_cpus
            if num_cpus is None:
                num_cpus = float(cfg.cpu_threads + (1 if cfg.in_process is False else 0))
            num_gpus = self.options.num_gpus
            if num_gpus is None:
                num_gpus = float(cfg.tensor_parallel_size) if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
            opts = actor_options(name=name, num_cpus=num_cpus, num_gpus=num_gpus,
                                 env={"OMP_NUM_THREADS": str(cfg.cpu_threads)})
            actor = Generator.options(**opts).remote(asdict(cfg))
            self._members[name] = _Member(index, name, actor)
            self._refs[actor.ready.remote()] = ("ready", name)
            self.counters["started"] += 1
            logger.info("generator pool: starting %s (target %d)", name, self._target)

    def _remove(self, m: _Member, failed: bool, reason: str = "") -> None:
        """Take a member out: its live chunk is re-queued, its pending replies forgotten, the actor stopped."""
        self._members.pop(m.name, None)
        self._ledger.release_worker(m.name)
        for ref in [r for r, (_, name) in self._refs.items() if name == m.name]:
            del self._refs[ref]
        if failed:
            ray.kill(m.actor, no_restart=True)  # a half-alive generator must not answer later
            self.counters["failed"] += 1
            logger.warning("generator pool: %s (pid %s) failed (%s); replacing it", m.name, m.pid, reason)
            if self.counters["failed"] > self.options.max_failures:
                raise PoolError(f"generators failed {self.counters['failed']} times (last: {m.name}: {reason})")
        else:
            self.counters["removed"] += 1
            if m.state in (ACTIVE, DRAINING) and m.chunk_id is None:
                # Idle: let it free its engine and temp folder, then end it (see `_stopping`).
                self._stopping[m.actor.shutdown.remote()] = (m.actor, time.monotonic() + 30)
            else:
                ray.kill(m.actor, no_restart=True)

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
            else:
                if kind in ("ready", "load"):
                    self.counters["start_failures"] += 1
                self._remove(m, failed=True, reason=f"{kind}: {_short(err)}")
                self._reconcile()
            return
        if kind == "ready":
            m.pid, m.version = value["pid"], value["version"]
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

    def _bring_up_to_date(self, m: _Member) -> None:
        """Load the current weights into a new member (again, if a push came meanwhile), then activate it."""
        if self._weights is not None and m.version < self._weights.version:
            m.state, m.since = LOADING, time.monotonic()
            ref = m.actor.update_weights_from_blobs.remote(self._weights.version, *self._weights.blob_refs())
            self._refs[ref] = ("load", m.name)
        elif self._weights is not None and m.version > self._weights.version:
            self._remove(m, failed=True, reason=f"version {m.version} is ahead of the pool's {self.version}")
            self._reconcile()
        else:
            m.state, m.last_health = ACTIVE, time.monotonic()
            logger.info("generator pool: %s active (pid %s, version %d)", m.name, m.pid, m.version)

    def _on_generated(self, m: _Member, results: list[GenerationResult]) -> None:
        chunk = self._ledger.complete(m.chunk_id) if m.chunk_id is not None else None
        m.chunk_id = None
        m.last_health = time.monotonic()
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

    def _check_deadlines(self) -> None:
        now, o = time.monotonic(), self.options
        for m in list(self._members.values()):
            late = None
            if m.state == STARTING and now - m.since > o.start_timeout_s:
                late = f"not started within {o.start_timeout_s:.0f} s"
            elif m.state == LOADING and now - m.since > o.weight_timeout_s:
                late = f"weights not loaded within {o.weight_timeout_s:.0f} s"
            elif m.chunk_id is not None and now - m.chunk_sent > o.generate_timeout_s:
                late = f"chunk not done within {o.generate_timeout_s:.0f} s"
            if late:
                self.counters["start_failures"] += m.state in (STARTING, LOADING)
                self._remove(m, failed=True, reason=late)
                self._reconcile()
            elif m.state == ACTIVE and m.chunk_id is None and now - m.last_health > o.health_interval_s:
                m.last_health = now
                if not any(k == "health" and n == m.name for k, n in self._refs.values()):
                    self._refs[m.actor.health.remote()] = ("health", m.name)
        for ref, (actor, deadline) in list(self._stopping.items()):
            if now > deadline:
                del self._stopping[ref]
                ray.kill(actor, no_restart=True)

    def _poll_control(self) -> None:
        if self._control is None or time.monotonic() - self._control_polled < self.options.control_poll_s:
            return
        self._control_polled = time.monotonic()
        try:
            n, seq = get(self._control.desired.remote(), 10, "control poll")
            self._control.report.remote(self.status())
        except Exception as err:  # noqa: BLE001 - outside control is optional; never stop generating for it
            logger.warning("generator pool: control actor unreachable (%s)", _short(err))
            return
        if seq > self._control_seq:
            self._control_seq = seq
            if n != self._target:
                self.scale(n)

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

    def _recover_push(self, targets: list[_Member], version: int, err: BaseException,
                      previous: _Weights | None) -> dict:
        """After a failed push: replace dead/broken generators, retry healthy laggards once."""
        health = {}
        for m in targets:
            try:
                health[m.name] = get(m.actor.health.remote(), 30, f"{m.name}.health")
            except Exception as probe:  # noqa: BLE001
                health[m.name] = {"ok": False, "broken": _short(probe), "version": -1}
        loaded = [m for m in targets if health[m.name].get("version") == version]
        lagging = [m for m in targets if health[m.name].get("ok") and health[m.name].get("version") != version]
        if not loaded and len(lagging) == len(targets) and isinstance(err, weight_sync.WeightUpdateError):
            self._weights = previous  # nobody could load it: the update itself is wrong
            raise err
        for m in targets:
            if not health[m.name].get("ok"):
                self._remove(m, failed=True, reason=f"weight push: {health[m.name].get('broken')}")
        report: dict[str, Any] = {"version": version, "recovered_from": _short(err)}
        if lagging:
            # Retry once from the kept buckets (works for both keep_weights modes and any node).
            blobs = self._weights.blob_refs()
            refs = [m.actor.update_weights_from_blobs.remote(version, *blobs) for m in lagging]
            ray.wait(refs, num_returns=len(refs), timeout=self.options.weight_timeout_s)
            for m, ref in zip(lagging, refs):
                try:
                    get(ref, 0, f"{m.name}.update_weights (retry)")
                except Exception as again:  # noqa: BLE001 - replaced: the replacement loads these weights
                    self._remove(m, failed=True, reason=f"weight push retry: {_short(again)}")
        self._reconcile()
        return report
