"""One rank of a learner group: a Ray actor that joins the torch.distributed group and runs a ColossalAI Booster.

Driven by `relay.learners.group.LearnerGroup`; every method is collective (called on all ranks at once).
"""
from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass, field
from typing import Any

import ray

from relay.config import PLAIN_FORWARD_PLUGINS
from relay.cluster.calls import free_port
from relay.learners.accumulate import StepStats
from relay.learners.lossfn import (
    LossFn, resolve_loss, row_group, split_micro_batches, split_rows,
)
from relay.learners.worker_state import WeightsAndCheckpoints

KINDS = ("causal_lm", "critic")
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LearnerSpec:
    """What every rank builds. Plugin rules: `relay.config.plugin_rules.check_plugin_support`."""

    model_path: str
    kind: str = "causal_lm"  # 'causal_lm' (policy/SFT/DPO) or 'critic' (value head: critic/reward model)
    plugin: str = "ddp"  # ddp | zero2 | zero2_cpu | 3d | gemini | gemini_auto (gemini: CUDA only)
    tp: int = 1
    pp: int = 1
    sp: int = 1
    zero_stage: int = 0  # '3d' only
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16: CUDA only)
    max_norm: float = 1.0  # gradient clipping; 0 disables
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    lora_rank: int = 0  # 0: full fine-tuning
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target_modules: tuple[str, ...] = DEFAULT_LORA_TARGETS
    grad_checkpoint: bool = False
    dtype: str = "float32"  # dtype the weights are loaded in; bf16/fp16 plugins cast to their precision
    seed: int = 42  # same on every rank: a fresh value head / LoRA init must match across ranks
    attn_implementation: str | None = None  # e.g. 'sdpa' or 'flash_attention_2'; None: transformers' default
    plugin_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind {self.kind!r} is unknown; use one of {KINDS}")
        object.__setattr__(self, "betas", tuple(self.betas))
        object.__setattr__(self, "lora_target_modules", tuple(self.lora_target_modules))


class LearnerWorker(WeightsAndCheckpoints):
    """One rank of a learner group. Create through `LearnerGroup`; methods are collective (call on all ranks)."""

    def __init__(self, rank: int, world_size: int) -> None:
        import torch

        torch.set_num_threads(1)  # one thread per process: measured up to 10x faster on busy small machines
        self.rank, self.world_size = rank, world_size
        self.spec: LearnerSpec | None = None
        self.booster = self.plugin = self.model = self.optimizer = None
        self.step = 0

    # ---- process group -----------------------------------------------------------------------------------
    def address(self) -> tuple[str, str, int]:
        """(node id, node ip, a free port on this node): rank 0's becomes the rendezvous address."""
        ctx = ray.get_runtime_context()
        return ctx.get_node_id(), ray.util.get_node_ip_address(), free_port()

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def device(self) -> str:
        """'cuda' when torch sees a device in this process (a GPU id from Ray alone is not enough), else 'cpu'."""
        from relay.cluster.devices import torch_device

        return torch_device()

    def pid(self) -> int:
        return os.getpid()

    def cores(self) -> int:
        """Cores this rank's process may use (affinity, cgroup quota)."""
        from relay.cpu import usable_cores

        return usable_cores()

    def memory_mib(self, reset: bool = False, trim: bool = False) -> dict[str, float | None]:
        """{'rss', 'peak'} of this rank's process in MiB, the peak since start or the last reset; `reset`: start
        a new peak after reading (to measure one step's); `trim`: first return freed heap pages to the kernel."""
        from relay.procmem import memory_mib

        return memory_mib(reset, trim)

    def set_num_threads(self, n: int) -> int:
        """torch's intra-op threads from now on; returns the count before (for handing cores back)."""
        import torch

        before = torch.get_num_threads()
        if n != before:
            torch.set_num_threads(n)
        return before

    def setup(self, master_addr: str, master_port: int, seed: int) -> int:
        import colossalai

        from relay.learners import colossal_compat

        colossal_compat.apply()
        # Under Ray each GPU actor sees exactly its own device, so the local device index is always 0.
        colossalai.launch(
            rank=self.rank,
            world_size=self.world_size,
            host=master_addr,
            port=master_port,
            local_rank=0,
            seed=seed,
            verbose=False,
        )
        from colossalai.logging import get_dist_logger

        get_dist_logger().set_level("WARNING")  # its INFO lines (one per checkpoint shard) drown test output
        return os.getpid()

    # ---- building --------------------------------------------------------------------------------------------
    def build(self, spec: LearnerSpec) -> dict[str, Any]:
        """(Re)build model, optimizer and booster from `spec`; an earlier build on these ranks is dropped."""
        import torch
        from colossalai.booster import Booster

        from relay.learners.plugins import make_plugin, plugin_needs_hybrid_adam

        self._drop()
        self.spec, self.step = spec, 0
        torch.manual_seed(spec.seed)
        self.plugin = make_plugin(
            spec.plugin,
            spec.tp,
            spec.pp,
            spec.sp,
            spec.zero_stage,
            spec.precision,
            spec.max_norm,
            kind=spec.kind,
            lora_rank=spec.lora_rank,
            num_ranks=self.world_size,
            **spec.plugin_kwargs,
        )
        self.booster = Booster(plugin=self.plugin)
        model = self._load_model(spec)
        if spec.grad_checkpoint:
            # Non-reentrant checkpointing works with frozen inputs (LoRA) and DDP without extra hooks.
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if spec.lora_rank > 0:
            from peft import LoraConfig

            lora = LoraConfig(
                r=spec.lora_rank,
                lora_alpha=spec.lora_alpha,
                lora_dropout=spec.lora_dropout,
                target_modules=list(spec.lora_target_modules),
                # A critic's value head is new: it must train along with the adapters.
                modules_to_save=["value_head"] if spec.kind == "critic" else None,
                bias="none",
            )
            model = self.booster.enable_lora(model, lora_config=lora)
        params = [p for p in model.parameters() if p.requires_grad]
        if plugin_needs_hybrid_adam(spec.plugin):
            from colossalai.nn.optimizer import HybridAdam

            optim = HybridAdam(params, lr=spec.lr, betas=spec.betas, eps=spec.eps, weight_decay=spec.weight_decay)
        else:
            # fused: one kernel over all parameters instead of a Python loop per tensor (what TRL's default
            # adamw_torch_fused does). Measured on SmolLM2, 1 thread: 0.08 s per step against 0.51 s.
            optim = torch.optim.AdamW(
                params, lr=spec.lr, betas=spec.betas, eps=spec.eps, weight_decay=spec.weight_decay, fused=True
            )
        self.model, self.optimizer, *_ = self.booster.boost(model, optim)
        self.model.train()
        return self.info()

    def _load_model(self, spec: LearnerSpec) -> Any:
        import torch

        dtype = getattr(torch, spec.dtype)
        extra = {"attn_implementation": spec.attn_implementation} if spec.attn_implementation else {}
        if spec.kind == "critic":
            from relay.models.heads import CriticModel

            return CriticModel.from_pretrained(spec.model_path, dtype=dtype, seed=spec.seed, **extra)
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(spec.model_path, dtype=dtype, **extra)

    def _drop(self) -> None:
        self.model = self.optimizer = self.booster = self.plugin = None
        gc.collect()

    def info(self) -> dict[str, Any]:
        inner = self._inner(unwrap_peft=False)
        trainable = [n for n, p in inner.named_parameters() if p.requires_grad]
        return {
            "rank": self.rank,
            "dp_rank": self._dp_rank(),
            "dp_size": self._dp_size(),
            "tp_rank": self._tp_rank(),
            "tp_size": self.spec.tp if self.spec.plugin == "3d" else 1,
            "trainable": trainable,
            "num_params_local": sum(p.numel() for p in inner.parameters()),
            "step": self.step,
        }

    # ---- topology ----------------------------------------------------------------------------------------
    def _dp_group(self) -> Any:
        return getattr(self.plugin, "dp_group", None)  # None: the whole world (ddp/zero/gemini)

    def _tp_group(self) -> Any:
        return getattr(self.plugin, "tp_group", None) if self.spec.plugin == "3d" else None

    def _dp_rank(self) -> int:
        import torch.distributed as dist

        return dist.get_rank(self._dp_group()) if self._dp_group() is not None else dist.get_rank()

    def _dp_size(self) -> int:
        import torch.distributed as dist

        return dist.get_world_size(self._dp_group()) if self._dp_group() is not None else dist.get_world_size()

    def _tp_rank(self) -> int:
        import torch.distributed as dist

        return dist.get_rank(self._tp_group()) if self._tp_group() is not None else 0

    def _device(self) -> Any:
        from colossalai.accelerator import get_accelerator

        return get_accelerator().get_current_device()

    def _inner(self, unwrap_peft: bool = False) -> Any:
        """The module inside the booster wrappers (a PeftModel when LoRA is on, unless unwrap_peft)."""
        inner = self.model.unwrap(unwrap_peft=False)
        if unwrap_peft and self.spec.lora_rank > 0:
            inner = inner.get_base_model()
        return inner

    def _local_batch(self, batch: dict[str, Any], require_even: bool) -> dict[str, Any]:
        """This rank's rows as tensors on the device: a contiguous split by dp rank (tp peers share rows), each
        row group (main rows, `ptx_*` rows) cut by its own row count; only the main rows must split evenly."""
        import numpy as np
        import torch

        # Arrays from the object store are read-only views: copy them into tensors torch may write to.
        tensors = {k: (torch.tensor(v) if isinstance(v, np.ndarray) else v) for k, v in batch.items()}
        main = [v for k, v in tensors.items() if torch.is_tensor(v) and v.dim() > 0 and not row_group(k)]
        rows = main[0].shape[0] if main else 0
        dp, r = self._dp_size(), self._dp_rank()
        if require_even and rows % dp:
            raise ValueError(f"batch of {rows} rows cannot be split evenly over {dp} data-parallel ranks")
        dev = self._device()
        return {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in split_rows(tensors, r, dp).items()}

    def _dp_sum(self, values: list[float]) -> list[float]:
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self._device())
        dist.all_reduce(t, group=self._dp_group())
        return t.tolist()

    # ---- training ----------------------------------------------------------------------------------------
    def train_step(
        self, batch: dict[str, Any], loss: str | LossFn = "causal_lm", loss_kwargs: dict | None = None,
        micro_batches: int = 1,
    ):
        """One optimizer step on the global `batch`; returns dp-averaged {'loss', metrics..., 'nonfinite_skipped',
        'step'} and this rank's 'step_started' / 'step_ended' (Unix seconds: when two groups overlap). A
        non-finite loss or gradient on any rank skips the step on every rank (gradients dropped, weights and
        optimizer state untouched) and reports nonfinite_skipped = 1."""
        from relay.learners.plugins import plugin_clips_gradients

        started = time.time()
        self.model.train()
        self.optimizer.zero_grad()
        stats = self._accumulate(batch, loss, loss_kwargs, micro_batches)
        skip = self._nonfinite(stats.loss)
        if not skip:
            if self.spec.max_norm > 0 and not plugin_clips_gradients(self.spec.plugin):
                self.optimizer.clip_grad_by_norm(self.spec.max_norm)
            self.optimizer.step()
            self.step += 1
        self.optimizer.zero_grad()
        out = stats.reduce(self._dp_sum, self._dp_size())
        return {**out, "nonfinite_skipped": float(skip), "step": self.step, "step_started": started,
                "step_ended": time.time()}

    def _accumulate(
        self, batch: dict[str, Any], loss: str | LossFn, loss_kwargs: dict | None, micro_batches: int
    ) -> StepStats:
        """Forward + backward of this rank's rows in `micro_batches` slices, gradients summed in place: only one
        slice's activations are alive at a time. A `normalized` loss gets the step's unit counts over all dp
        ranks (per rank: global count / dp, since DDP/ZeRO average gradients over ranks), so the accumulated
        gradient is the big batch's whatever the slice sizes; other losses weigh each slice 1/n."""
        import contextlib

        loss_fn = resolve_loss(loss)
        local = self._local_batch(batch, require_even=True)
        parts = split_micro_batches(local, micro_batches)
        kwargs = dict(loss_kwargs or {})
        counts = getattr(loss_fn, "loss_counts", None)
        stats = StepStats(getattr(loss_fn, "summed_metrics", frozenset()))
        if counts is not None:
            local_counts = counts(local)
            totals = self._dp_sum(list(local_counts.values()))
            kwargs["denominators"] = {u: max(t, 1.0) / self._dp_size() for u, t in zip(local_counts, totals)}
        for i, part in enumerate(parts):
            # Torch DDP can skip the all-reduce until the last slice; ColossalAI's ZeRO/hybrid optimizers
            # reduce every backward (as ColossalChat accumulates), which is correct, only chattier.
            quiet = self.spec.plugin == "ddp" and i < len(parts) - 1
            ctx = self.booster.no_sync(self.model, self.optimizer) if quiet else contextlib.nullcontext()
            with ctx:
                value, metrics = _split_loss(loss_fn(self.model, part, **kwargs))
                if counts is None:
                    value = value / len(parts)
                self.booster.backward(value, self.optimizer)
            weight = next(iter(counts(part).values())) if counts is not None else 1.0
            stats.add(float(value.detach()), metrics, weight)
            del value
        return stats

    def _nonfinite(self, loss: float) -> bool:
        """Whether the loss or any gradient is non-finite on any rank (collective over the whole group)."""
        import math

        import torch
        import torch.distributed as dist

        bad = not math.isfinite(loss)
        if not bad:
            grads = list(self._local_grads())
            if grads:
                norms = torch._foreach_norm([g.detach() for g in grads])
                bad = not bool(torch.isfinite(torch.stack([n.float() for n in norms])).all())
        flag = torch.tensor([1.0 if bad else 0.0], device=self._device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def _local_grads(self):
        """This rank's gradients: ZeRO optimizers keep the reduced (partitioned) ones in their grad stores, the
        other plugins in `param.grad` (Gemini's chunks are not visited: its loss is still checked)."""
        stores = getattr(self.optimizer, "pg_to_grad_store", None)
        if stores:
            for store in stores.values():
                for group_id in range(self.optimizer.num_param_groups):
                    yield from store.get_working_grads_by_group_id(group_id)
            return
        for p in self.model.parameters():
            if p.grad is not None:
                yield p.grad

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def gradients(
        self, batch: dict[str, Any], loss: str | LossFn = "causal_lm", loss_kwargs: dict | None = None,
        micro_batches: int = 1,
    ):
        """Full (unsharded) gradients of one (accumulated) forward/backward on `batch`, no optimizer step
        (tests/debugging). Only where gradients live in `param.grad`: 'ddp' and '3d' with zero_stage 0."""
        if self.spec.plugin not in ("ddp", "3d") or self.spec.zero_stage:
            raise ValueError("gradients() needs plugin 'ddp' or '3d' with zero_stage=0 (ZeRO shards gradients)")
        self.model.train()
        self.optimizer.zero_grad()
        stats = self._accumulate(batch, loss, loss_kwargs, micro_batches)
        grads = {}
        for name, p in self._inner().named_parameters():
            if p.grad is not None:
                grads[name] = self._full_tensor(p.grad, p).float().cpu()
        self.optimizer.zero_grad()
        out = stats.reduce(self._dp_sum, self._dp_size())  # collective: every rank must call it
        return {**out, "grads": grads} if self.rank == 0 else None

    # ---- inference ---------------------------------------------------------------------------------------
    def forward(
        self, batch: dict[str, Any], what: str = "logprobs", temperature: float = 1.0, last: int | None = None,
        micro_batch_size: int = 0,
    ) -> Any:
        """No-grad forward on this rank's rows: 'logprobs' (B, T-1), or only their last `last` columns, or
        'values' (B, T), fp32 CPU tensors. `micro_batch_size` > 0: at most that many rows per forward, each
        trimmed of its padding columns (`relay.learners.forwards`). Returns None on tp ranks other than 0 (their
        rows are the same)."""
        import torch

        from relay.learners.forwards import WHATS, forward_count, micro_batched_forward

        if what not in WHATS:
            raise ValueError(f"forward: unknown output {what!r} (use one of {WHATS})")
        local = self._local_batch(batch, require_even=False)
        # the same count on every dp rank, whatever its own rows: ranks short of rows keep in step with the rest
        count = forward_count(int(batch["input_ids"].shape[0]), self._dp_size(), micro_batch_size)
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            out = micro_batched_forward(
                self.model, local, what, count=count, micro_batch_size=micro_batch_size, temperature=temperature,
                last=last, shared_prefix=self.spec.plugin in PLAIN_FORWARD_PLUGINS,
            )
        self.model.train(was_training)
        if self._tp_rank() != 0:
            return None
        return (self._dp_rank(), None if out is None else out.float().cpu())

    def shutdown(self) -> None:
        import torch.distributed as dist

        from relay.scratch import release_reused_dirs

        self._drop()
        release_reused_dirs()  # the weight-transfer folder rank 0 kept between pushes
        if dist.is_initialized():
            dist.destroy_process_group()


def _split_loss(out: Any) -> tuple[Any, dict[str, float]]:
    if isinstance(out, tuple):
        value, metrics = out
        return value, dict(metrics or {})
    return out, {}
