"""The plain data of `GeneratorPool` (`relay.actors.pool`): its options, results and error, the records it keeps
per generator and per submission, the weights it keeps for late joiners, and how it tells a dead generator
from a failed request."""
from __future__ import annotations

import math
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import ray

from relay.actors.weight_push import STRATEGIES
from relay.actors.generator import GeneratorBroken
from relay.actors.sampling import GenerationResult, SamplingConfig

STARTING, LOADING, ACTIVE, DRAINING = "starting", "loading", "active", "draining"


class PoolError(RuntimeError):
    """The pool cannot finish: prompts failed `max_attempts` times, or generators keep dying."""


@dataclass
class PoolOptions:
    """How a `GeneratorPool` starts, feeds and watches its generators."""

    name_prefix: str = "generator"
    """Actors are named `relay/<name_prefix>-<i>` (`relay/<name_prefix>-<i>@<run>` with `run`)."""
    run: str | None = None
    """The run these generators belong to (in their names, so two runs share a cluster)."""
    num_cpus: float | None = None
    """Logical CPUs per generator; None = what `start_generator` would reserve (cpu_threads)."""
    num_gpus: float | None = None
    """GPUs per generator; None = tensor_parallel_size when the cluster has GPUs, else 0."""
    placement: Any = None
    """(index, name) -> Ray options that place that generator (resources, scheduling strategy; they win over
    num_cpus / num_gpus), e.g. `lambda i, n: placement.options("generator", i, n)` with a
    `relay.cluster.placement_groups.Placement`; None = Ray's default."""
    max_chunk_size: int | None = None
    """Most prompts per generate call. None = split the queue evenly over idle generators (best throughput);
    a small value lets newly added generators share a long batch and shortens the tail."""
    start_timeout_s: float = 300.0
    """A generator whose engine is not up (and loaded with the current weights) this long after its start is
    killed and replaced."""
    generate_timeout_s: float = 600.0
    """Per chunk: a generator that takes longer is killed and replaced; its prompts are re-dispatched."""
    stall_timeout_s: float | None = None
    """`generate` without a `timeout_s` raises RemoteCallTimeout when the pool makes no progress (no chunk
    finished, no generator became active) for this long, so it cannot wait for ever. None = 2 x
    generate_timeout_s: a hung chunk is killed after generate_timeout_s and its replacement's activation is
    progress, so a pool still without progress after twice that is stuck (e.g. generators Ray cannot place)."""
    weight_timeout_s: float = 600.0
    """Per weight load (a push, or a new generator catching up): a generator that takes longer is replaced."""
    max_attempts: int = 3
    """Dispatches per prompt before the pool gives up on it (PoolError)."""
    max_failures: int = 16
    """Generator failures (died, broken, hung, failed start) the pool absorbs by replacing them before it
    gives up with PoolError."""
    push_strategy: str = "auto"
    """How the sender reaches each generator (`weight_push.choose_transports`): auto (shared memory for those
    on the sender's node, the object store for the others, by Ray node id), shm or object_store."""
    control_name: str | None = None
    """Create and poll this control actor (e.g. "control" -> relay/control); None = no outside control."""
    control_poll_s: float = 1.0
    health_interval_s: float = 5.0
    """Active generators, busy or idle, are health-checked this often, so one that died while idle, or whose
    engine process died (it reports itself broken), is replaced early."""

    def __post_init__(self) -> None:
        for name in ("start_timeout_s", "generate_timeout_s", "stall_timeout_s", "weight_timeout_s",
                     "control_poll_s", "health_interval_s"):
            value = getattr(self, name)
            if value is None and name == "stall_timeout_s":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"PoolOptions.{name} must be a finite number of seconds > 0, not {value!r}")
        if self.max_attempts < 1 or self.max_failures < 0:
            raise ValueError("PoolOptions: max_attempts must be >= 1 and max_failures >= 0")
        if self.push_strategy not in STRATEGIES:
            raise ValueError(f"PoolOptions.push_strategy must be one of {', '.join(STRATEGIES)}, "
                             f"not {self.push_strategy!r}")
        if self.max_chunk_size is not None and self.max_chunk_size < 1:
            raise ValueError("PoolOptions.max_chunk_size must be >= 1 or None")

    def stall_limit_s(self) -> float:
        """`stall_timeout_s`, its default resolved."""
        return self.stall_timeout_s if self.stall_timeout_s is not None else 2 * self.generate_timeout_s


def stalled(started: float, progress_at: float, now: float, limit_s: float) -> bool:
    """Whether a wait that began at `started` has seen no progress (last at `progress_at`) for over `limit_s`."""
    return now - max(started, progress_at) > limit_s


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
    node_id: str | None = None  # Ray node, from `ready`: the sender picks the transport by it


@dataclass
class _Job:
    sampling: SamplingConfig
    prompts: dict[Hashable, list[int]]
    remaining: int


@dataclass
class _Weights:
    """The last pushed weights, kept so that late joiners load exactly them: the refs of their safetensors
    buckets in the object store. The sender (a learner rank) owns the bytes; the pool holds only refs."""

    version: int
    blobs: list[Any]


def is_generator_failure(err: BaseException) -> bool:
    """True when the generator itself is gone or unusable (replace it), False for an error in the request."""
    if isinstance(err, (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, GeneratorBroken)):
        return True
    cause = getattr(err, "cause", None)
    return isinstance(cause, GeneratorBroken)


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[-1][:300] if text else ''}"
