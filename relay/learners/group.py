"""Learner groups: N Ray actors forming one torch.distributed group that runs one ColossalAI Booster.

The driver holds a `LearnerGroup`; every method fans out to all ranks (collectives need every rank), waits
with a timeout, and returns rank 0's answer. Ranks split each batch by data-parallel rank (tensor-parallel
peers take the same rows), so callers always pass the global batch.

Losses are pluggable: `train_step(batch, loss=...)` takes a registered name ('causal_lm', 'value_mse', or one
added with `register_loss`) or any picklable callable `fn(model, batch, **loss_kwargs) -> loss | (loss,
metrics)`, where `model` is the boosted model (call it like the HF model / `CriticModel`) and `batch` is this
rank's shard as tensors (functions the workers cannot import, e.g. from a test module, must be
closures or registered with `cloudpickle.register_pickle_by_value`; `__main__` ones ship by value). The reported loss/metrics are averaged over data-parallel ranks, which is also what
the gradients optimise (DDP/ZeRO average gradients over ranks).

Checkpoint layout (`save_checkpoint(dir)`; `dir` must be on storage every rank sees):
  model/      HF folder transformers loads (config.json, safetensors, tokenizer files); for a critic the
              `relay.models.heads` layout; with LoRA the merged full weights
  adapter/    LoRA only: the peft adapter (what `load_checkpoint` restores)
  optimizer/  ColossalAI's (possibly sharded) optimizer state
  learner.json  step and settings
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Iterator
from typing import Any

import ray

from relay.cluster.calls import DEFAULT_TIMEOUT_S, RemoteCallTimeout, get
from relay.cluster.options import NAMESPACE, actor_options, scoped
from relay.cluster.placement import learner_plan
from relay.cluster.placement_groups import Placement
from relay.config.plugin_rules import check_plugin_support
from relay.learners.lossfn import (  # noqa: F401  (re-exported: the loss API belongs to the group's API)
    LossFn,
    causal_lm_loss,
    causal_logits,
    model_inputs,
    position_ids_from_mask,
    register_loss,
    resolve_loss,
    token_logprobs,
    value_mse_loss,
)
from relay.learners.worker import LearnerSpec, LearnerWorker

__all__ = [
    "LearnerGroup",
    "LearnerGroupError",
    "LearnerSpec",
    "LearnerWorker",
    "LossFn",
    "PendingCall",
    "causal_lm_loss",
    "causal_logits",
    "model_inputs",
    "position_ids_from_mask",
    "register_loss",
    "resolve_loss",
    "token_logprobs",
    "value_mse_loss",
]

def _micro_batch_size(n: int) -> int:
    """A forward's rows per micro-batch, checked on the driver (0: all of a rank's rows at once)."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"micro_batch_size must be an int >= 0 (0: one forward per rank), got {n!r}")
    return n


@dataclasses.dataclass
class PendingCall:
    """A fan-out call that was started and not yet waited for (`LearnerGroup.finish`): lets two groups run at
    the same time, e.g. the PPO actor's and critic's update steps."""

    refs: list[Any]  # one object ref per rank, in rank order
    what: str  # what the call does, for errors and timeouts


def share_node_cores(groups: list[list[tuple[str, int]]]) -> list[list[int]]:
    """Threads per rank for groups that compute at the same time: each node's cores split evenly over every rank
    of every group on it (at least 1). `groups[g][r]` is rank r's (node id, cores it may use)."""
    per_node: dict[str, int] = {}
    for ranks in groups:
        for node, _ in ranks:
            per_node[node] = per_node.get(node, 0) + 1
    return [[max(1, cores // per_node[node]) for node, cores in ranks] for ranks in groups]


class LearnerGroupError(RuntimeError):
    """A rank failed. If every rank failed the same way the group stays usable; if some rank is still waiting
    in a collective the group is marked broken and refuses further calls (shut it down, create a new one)."""


# After one rank fails, how long to wait for the others to fail too (same error before any collective)
# before declaring the group out of step.
_FAILURE_GRACE_S = 10.0


class LearnerGroup:
    """Driver handle for N `LearnerWorker` actors named `relay/<role>-rank<i>`."""

    def __init__(self, workers: list[Any], spec: LearnerSpec, role: str, timeout_s: float) -> None:
        self.workers, self.spec, self.role, self.timeout_s = workers, spec, role, timeout_s
        self.device = "cpu"
        self.info: dict[str, Any] = {}
        self.broken: str | None = None  # why the ranks are out of step, once they are
        self.run: str | None = None  # in the ranks' names
        self._placement: Placement | None = None  # a placement group this group made for itself

    @classmethod
    def create(
        cls,
        num_ranks: int,
        model_path: str | os.PathLike,
        kind: str = "causal_lm",
        *,
        role: str | None = None,
        run: str | None = None,
        num_cpus: float = 1.0,
        num_gpus: float | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        spec: LearnerSpec | None = None,
        placement: Placement | None = None,
        placement_role: str | None = None,
        resources: dict[str, float] | None = None,
        node_pin: str | None = None,
        strategy: str = "PACK",
        **options: Any,
    ) -> "LearnerGroup":
        """Start `num_ranks` actors, form their process group (gloo on CPU, nccl on GPU) and build the booster.

        Ranks are named `relay/<role>-rank<i>` (`...@<run>` with `run`, so two runs share a cluster) and live in
        a placement group, one bundle per rank, numbered by node: `placement_role`'s group of `placement` (a
        run's whole plan, reserved by its driver), or else a group of their own (`num_cpus`, `num_gpus`,
        `resources` and `node_pin` per rank, `strategy` PACK or STRICT_PACK), removed with the group.
        `options` are `LearnerSpec` fields (plugin, tp, zero_stage, precision, lr, lora_rank, ...); an
        unsupported combination, or one that does not fit the cluster, raises here, before any actor starts."""
        spec = spec or LearnerSpec(model_path=str(model_path), kind=kind, **options)
        device = "cuda" if num_gpus else "cpu"  # asked for; the ranks say below what torch really sees
        errors = check_plugin_support(
            spec.plugin, spec.tp, spec.pp, spec.sp, spec.zero_stage, spec.precision, spec.lora_rank, device, num_ranks
        )
        if errors:
            raise ValueError("unsupported learner setup:\n- " + "\n- ".join(errors))
        role = role or ("critic" if spec.kind == "critic" else "actor")
        owned = None
        if placement is None:
            plan = learner_plan(role, num_ranks, num_cpus, num_gpus or 0.0, resources, node_pin, strategy)
            placement = owned = Placement.reserve(plan, run, timeout_s)
            placement_role = role
        remote_cls = ray.remote(LearnerWorker)
        try:
            workers = [
                remote_cls.options(**actor_options(name=scoped(f"{role}-rank{i}", run),
                                                   **placement.options(placement_role or role, i))).remote(i, num_ranks)
                for i in range(num_ranks)
            ]
        except BaseException:
            if owned is not None:
                owned.release()
            raise
        group = cls(workers, spec, role, timeout_s)
        group.device, group.run, group._placement = device, run, owned
        try:
            nodes = group._call_each("node_id", what="learner start")
            group._check_device(num_ranks)
            node0, ip0, port = get(workers[0].address.remote(), timeout_s, f"{role}: rendezvous address")
            addr = "127.0.0.1" if all(n == node0 for n in nodes) else ip0
            group._call("setup", addr, port, spec.seed, what="process group")
            group.info = group._call("build", spec, what="booster build")[0]
        except BaseException:
            group.shutdown()
            raise
        return group

    def _check_device(self, num_ranks: int) -> None:
        """The device is what torch sees in the ranks (CUDA only where it finds one, never from a GPU count
        alone); the plugin rules are checked again when that differs from what was asked for."""
        devices = set(self._call_each("device", what="learner device"))
        device = "cuda" if devices == {"cuda"} else "cpu"
        if device != self.device:
            s = self.spec
            errors = check_plugin_support(s.plugin, s.tp, s.pp, s.sp, s.zero_stage, s.precision, s.lora_rank, device,
                                          num_ranks)
            if errors:
                raise ValueError(f"unsupported learner setup on the ranks' device ({device}):\n- " + "\n- ".join(errors))
            self.device = device

    def _release_placement(self) -> None:
        if self._placement is not None:
            self._placement.release()
            self._placement = None

    # ---- fan-out plumbing --------------------------------------------------------------------------------
    def _start_each(self, method: str, *args: Any, what: str | None = None, **kwargs: Any) -> PendingCall:
        if self.broken:
            raise LearnerGroupError(f"{self.role}: group is broken ({self.broken}); shut it down and create a new one")
        return PendingCall([getattr(w, method).remote(*args, **kwargs) for w in self.workers], what or method)

    def _start(self, method: str, *args: Any, what: str | None = None, **kwargs: Any) -> PendingCall:
        # Large arguments (batches) go to the object store once, not once per rank.
        args = tuple(ray.put(a) if isinstance(a, dict) else a for a in args)
        return self._start_each(method, *args, what=what, **kwargs)

    def _call_each(self, method: str, *args: Any, what: str | None = None, **kwargs: Any) -> list[Any]:
        pending = self._start_each(method, *args, what=what, **kwargs)
        return self._wait(pending.refs, pending.what)

    def _call(self, method: str, *args: Any, what: str | None = None, **kwargs: Any) -> list[Any]:
        pending = self._start(method, *args, what=what, **kwargs)
        return self._wait(pending.refs, pending.what)

    def _wait(self, refs: list[Any], what: str) -> list[Any]:
        """Results in rank order; raise the first failure at once (the other ranks would wait on collectives)."""
        deadline = time.monotonic() + self.timeout_s
        pending = list(refs)
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                self.broken = f"{what} timed out"
                raise RemoteCallTimeout(f"{self.role}: {what} did not finish within {self.timeout_s:.0f} s")
            done, pending = ray.wait(pending, num_returns=1, timeout=left)
            for ref in done:
                try:
                    get(ref, timeout=60.0, what=f"{self.role}: {what}")
                except RemoteCallTimeout:
                    raise
                except Exception as err:
                    _, still = ray.wait(pending, num_returns=len(pending), timeout=_FAILURE_GRACE_S)
                    if still:
                        self.broken = f"{what} failed on rank {refs.index(ref)} while others kept waiting"
                    rank = refs.index(ref)
                    raise LearnerGroupError(f"{self.role}: {what} failed on rank {rank}: {err}{self._log_hint(rank)}") from err
        return get(refs, timeout=60.0, what=f"{self.role}: {what}")

    def _log_hint(self, rank: int) -> str:
        """Where that rank's own output went (quiet runs: SAVE_DIR/logs/<role>-rank<i>.log), if anywhere."""
        from relay import logs

        folder = logs.log_dir()
        return f" (rank log: {folder / logs.role_file_name(f'{self.role}-rank{rank}')})" if folder else ""

    # ---- public API --------------------------------------------------------------------------------------
    @property
    def num_ranks(self) -> int:
        return len(self.workers)

    def rebuild(self, **changes: Any) -> dict[str, Any]:
        """Build a new model/optimizer/booster on the same ranks (and process group) with some spec fields
        changed, e.g. another plugin or model; saves the actors' start-up and import time."""
        spec = dataclasses.replace(self.spec, **changes)
        errors = check_plugin_support(
            spec.plugin, spec.tp, spec.pp, spec.sp, spec.zero_stage, spec.precision, spec.lora_rank,
            self.device, self.num_ranks,
        )
        if errors:
            raise ValueError("unsupported learner setup:\n- " + "\n- ".join(errors))
        self.info = self._call("build", spec, what="booster build")[0]
        self.spec = spec
        return self.info

    def train_step(
        self, batch: dict[str, Any], loss: str | LossFn = "causal_lm", micro_batches: int = 1, **loss_kwargs: Any
    ) -> dict:
        """One optimizer step on the global batch (rows split over dp ranks, then each rank's rows into
        `micro_batches` slices whose gradients accumulate); dp-averaged loss and metrics."""
        return self.finish(self.start_train_step(batch, loss, micro_batches, **loss_kwargs))

    def start_train_step(
        self, batch: dict[str, Any], loss: str | LossFn = "causal_lm", micro_batches: int = 1, **loss_kwargs: Any
    ) -> PendingCall:
        """`train_step` without waiting: the ranks start it and the driver goes on (another group's step, say);
        `finish(pending)` waits and returns what `train_step` would."""
        return self._start("train_step", batch, loss, loss_kwargs, micro_batches, what="train_step")

    def finish(self, pending: PendingCall) -> Any:
        """Wait for a call this group started (`start_train_step`); rank 0's answer, failures as in every call."""
        return self._wait(pending.refs, pending.what)[0]

    def gradients(
        self, batch: dict[str, Any], loss: str | LossFn = "causal_lm", micro_batches: int = 1, **loss_kwargs: Any
    ) -> dict:
        """{'loss', 'grads': full HF-named gradients} of one forward/backward, no step ('ddp' / '3d' zero 0)."""
        return self._call("gradients", batch, loss, loss_kwargs, micro_batches, what="gradients")[0]

    def forward_logprobs(self, batch: dict[str, Any], temperature: float = 1.0, last: int | None = None,
                         micro_batch_size: int = 0) -> Any:
        """(B, T-1) fp32 tensor: log p(input_ids[:, t] | input_ids[:, :t]) for t = 1..T-1; with `last`, only the
        last `last` columns (B, last), computed without the LM head over the rest. `micro_batch_size` > 0: each
        rank runs at most that many rows per forward (peak memory follows it), padding trimmed per micro-batch,
        entries of padding tokens and of each row's first token 0 (`relay.learners.forwards`)."""
        return self._gather_rows(self._call("forward", batch, "logprobs", temperature, last,
                                            _micro_batch_size(micro_batch_size), what="forward_logprobs"))

    def forward_values(self, batch: dict[str, Any], micro_batch_size: int = 0) -> Any:
        """(B, T) fp32 tensor of per-token values (critic groups); `micro_batch_size` as in `forward_logprobs`
        (values at padding positions 0)."""
        return self._gather_rows(self._call("forward", batch, "values", 1.0, None,
                                            _micro_batch_size(micro_batch_size), what="forward_values"))

    @staticmethod
    def _gather_rows(results: list[Any]) -> Any:
        import torch

        parts = sorted((r for r in results if r is not None), key=lambda r: r[0])
        return torch.cat([t for _, t in parts if t is not None], dim=0)

    def set_lr(self, lr: float) -> None:
        self._call("set_lr", lr, what="set_lr")

    def full_state_dict(self, dtype: str | None = None) -> dict[str, Any]:
        """Full unsharded HF-named weights (LoRA merged; a tied weight appears once, as HF saves it)."""
        return self._call("full_state_dict", dtype, what="full_state_dict")[0]

    def publish_weights(self, send: Any, dtype: str | None = None) -> Any:
        """Call `send(full_state_dict)` on rank 0 (every rank helps gather the state) and return its result;
        the weights stay in the ranks. `send` is any picklable callable, e.g. the `WeightPush` a
        `GeneratorPool.push_weights` builds: `pool.push_weights(group.publish_weights, version)`."""
        return self._call("publish_weights", send, dtype, what="publish_weights")[0]

    def save_checkpoint(self, path: str | os.PathLike) -> dict[str, Any]:
        """Write model/ (HF folder), optimizer/, adapter/ (LoRA) and learner.json under `path` (layout above)."""
        return self._call("save_checkpoint", str(path), what="save_checkpoint")[0]

    def load_checkpoint(self, path: str | os.PathLike) -> dict[str, Any]:
        """Restore weights (or the LoRA adapter), optimizer state and step from a `save_checkpoint` folder into
        the current build (build it with the same plugin, tp and LoRA settings as the one that saved)."""
        return self._call("load_checkpoint", str(path), what="load_checkpoint")[0]

    def rank_cores(self) -> list[tuple[str, int]]:
        """Per rank: (its Ray node id, the cores its process may use); `share_node_cores` turns the groups' lists
        into threads per rank for placement timeshare."""
        return list(zip(self._call_each("node_id", what="node_id"), self._call_each("cores", what="cores")))

    @contextlib.contextmanager
    def hand_over_threads(self, counts: list[int]) -> Iterator[None]:
        """Each rank trains with counts[rank] torch threads inside the block, then gets its own count back."""
        before = self._wait([w.set_num_threads.remote(n) for w, n in zip(self.workers, counts)], "set_num_threads")
        try:
            yield
        finally:
            if not self.broken:
                self._wait([w.set_num_threads.remote(n) for w, n in zip(self.workers, before)], "set_num_threads")

    def memory_mib(self, reset: bool = False, trim: bool = False) -> list[dict[str, float | None]]:
        """Per rank: {'rss', 'peak'} resident memory in MiB (peak since start or the last `reset=True` call;
        `trim`: freed heap pages go back to the kernel first, see `relay.procmem.trim_heap`)."""
        return self._call_each("memory_mib", reset, trim, what="memory_mib")

    def pids(self) -> list[int]:
        """Each rank's process id, in rank order."""
        return self._call_each("pid", what="pid")

    def nodes(self) -> list[str]:
        """Each rank's Ray node id, in rank order."""
        return self._call_each("node_id", what="node_id")

    def dead_ranks(self, timeout_s: float = 10.0) -> list[int]:
        """Ranks whose process is gone. A rank still waiting in a collective for a dead peer does not answer
        either (its calls run one at a time), but it is alive: only Ray's actor-died error counts."""
        refs = [w.node_id.remote() for w in self.workers]
        ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        dead = []
        for rank, ref in enumerate(refs):
            try:
                ray.get(ref, timeout=0.01)
            except ray.exceptions.RayActorError:
                dead.append(rank)
            except Exception:  # noqa: BLE001 - busy or slow, not dead
                pass
        return dead

    def kill(self, timeout_s: float = 30.0) -> None:
        """End every rank at once (no goodbye: survivors of a dead peer are stuck in collectives) and wait until
        their names are free, so a new group of the same role can start."""
        for w in self.workers:
            try:
                ray.kill(w, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        names = [f"relay/{scoped(f'{self.role}-rank{i}', self.run)}" for i in range(len(self.workers))]
        self.workers = []
        self._release_placement()
        deadline = time.monotonic() + timeout_s
        for name in names:
            while time.monotonic() < deadline:
                try:
                    ray.get_actor(name, namespace=NAMESPACE)
                except ValueError:
                    break
                time.sleep(0.1)

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Close the process group and end the actors (kills them if they do not answer in time)."""
        refs = [w.shutdown.remote() for w in self.workers]
        try:
            ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        finally:
            for w in self.workers:
                try:
                    ray.kill(w)
                except Exception:  # already gone
                    pass
            self.workers = []
            self._release_placement()
