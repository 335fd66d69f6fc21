"""Scorers for PPO experiences: the reference actor `relay/ref` (frozen initial policy -> per-token logprobs)
and small dense reward rules for learning tests. Rewards come from `relay.actors.rewards`, values from the
critic learner group.

The reference is a plain Ray actor running transformers rather than a 1-rank learner group: it never trains, so
a ColossalAI booster and optimizer would only cost start-up time and memory. `ReferenceScorer` is its core (no
Ray): the model on the device Ray gave the actor (`relay.actors.scoring`), in `reference.dtype`, scoring in
micro-batches of `reference.micro_batch_size` rows. It computes logprobs exactly as the learners do (same
position ids from the attention mask, fp32 log-softmax of logits / the sampling temperature) and returns them as
fp32 CPU tensors. In bf16 (the GPU default) the logits come from bf16 matmuls, so the KL against an fp32 actor
carries bf16 rounding noise (measured 1e-3 per token on average, 3e-3 at most, on the tiny test
model): it is not exactly 0 before the first update. float32 keeps it exact.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import ray

from relay.actors.scoring import ScorerPrecision, row_slices, scorer_precision
from relay.cluster.calls import get
from relay.cluster.options import actor_options
from relay.restarts import call_or_explain, restart_options


class ReferenceScorer:
    """The frozen reference model on this process's device in the configured dtype; `logprobs(...)` ->
    [B, S-1] fp32 CPU tensor like `forward_logprobs`, computed `micro_batch_size` rows at a time."""

    def __init__(self, model_path: str, dtype: str = "auto", micro_batch_size: int = 16,
                 field: str = "reference"):
        from transformers import AutoModelForCausalLM

        if micro_batch_size < 1:
            raise ValueError(f"{field}.micro_batch_size must be >= 1, got {micro_batch_size}")
        self.precision: ScorerPrecision = scorer_precision(dtype, f"{field}.dtype")
        self.micro_batch_size = micro_batch_size
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=self.precision.torch_dtype)
        self.model.to(self.precision.device).eval().requires_grad_(False)

    def logprobs(self, input_ids: Any, attention_mask: Any, last: int | None = None,
                 temperature: float = 1.0) -> Any:
        """[B, S-1] logprobs of logits / `temperature`, or only their last `last` columns (PPO needs the
        response's)."""
        import torch

        from relay.learners.lossfn import causal_logits, last_token_logprobs, token_logprobs

        ids, mask = torch.as_tensor(input_ids), torch.as_tensor(attention_mask)
        device, outs = self.precision.device, []
        with torch.no_grad():
            for rows in row_slices(ids.shape[0], self.micro_batch_size):
                part = {"input_ids": ids[rows].to(device), "attention_mask": mask[rows].to(device)}
                if last:
                    out = last_token_logprobs(self.model, part, last, temperature)
                else:
                    out = token_logprobs(causal_logits(self.model, part), part["input_ids"], temperature)
                outs.append(out.float().cpu())
        if not outs:  # no rows: the shape a forward would give
            return torch.zeros(0, last or max(ids.shape[-1] - 1, 0))
        return torch.cat(outs)


class ReferenceServer:
    """Body of the `relay/ref` actor: a `ReferenceScorer` plus call counters; `logprobs(batch)` -> [B, S-1]
    fp32 CPU tensor like `forward_logprobs`."""

    def __init__(self, model_path: str, dtype: str = "auto", micro_batch_size: int = 16, num_threads: int = 1):
        import torch

        torch.set_num_threads(num_threads)  # one thread per process: fastest on small shared CPUs
        self.scorer = ReferenceScorer(model_path, dtype, micro_batch_size)
        self.model = self.scorer.model
        self.calls = 0

    def logprobs(self, batch: dict[str, Any], last: int | None = None, temperature: float = 1.0) -> Any:
        """[B, S-1] logprobs of logits / `temperature`, or only their last `last` columns."""
        out = self.scorer.logprobs(batch["input_ids"], batch["attention_mask"], last, temperature)
        self.calls += 1
        return out

    def info(self) -> dict[str, Any]:
        """pid, calls, params, and the device and dtype it scores in."""
        p = self.scorer.precision
        return {"pid": os.getpid(), "calls": self.calls, "device": p.device, "dtype": p.dtype,
                "micro_batch_size": self.scorer.micro_batch_size,
                "params": sum(q.numel() for q in self.model.parameters())}


class ReferenceClient:
    """Driver handle of `relay/ref`; every call has a timeout. The actor is stateless: Ray restarts it up to
    `max_restarts` times and re-runs the calls in flight (`relay.restarts`); after that a wait raises ActorLost
    naming it."""

    def __init__(self, actor: Any, timeout_s: float, max_restarts: int = 0, name: str = "relay/ref"):
        self.actor, self.timeout_s, self.max_restarts, self.name = actor, timeout_s, max_restarts, name

    def logprobs_async(self, batch: dict[str, Any], last: int | None = None, temperature: float = 1.0) -> Any:
        return self.actor.logprobs.remote(batch, last, temperature)

    def result(self, ref: Any, what: str = "logprobs") -> Any:
        """Wait for a call's ObjectRef (ActorLost once Ray gave up restarting the actor)."""
        return call_or_explain(lambda: get(ref, self.timeout_s, f"{self.name}.{what}"), self.name, self.max_restarts)

    def logprobs(self, batch: dict[str, Any], last: int | None = None, temperature: float = 1.0) -> Any:
        return self.result(self.logprobs_async(batch, last, temperature))

    def info(self, timeout_s: float = 60.0) -> dict[str, Any]:
        """pid, calls, params, device, dtype (a restarting actor answers once it has loaded its model again)."""
        return call_or_explain(lambda: get(self.actor.info.remote(), timeout_s, f"{self.name}.info"), self.name,
                               self.max_restarts)

    def kill(self) -> None:
        ray.kill(self.actor, no_restart=True)


def start_reference(model_path: str, name: str = "ref", num_cpus: float = 0.5, dtype: str = "auto",
                    timeout_s: float = 600.0, max_restarts: int = 0, micro_batch_size: int = 16,
                    **options: Any) -> ReferenceClient:
    """Start `relay/<name>` on `model_path` and wait until the model is loaded (on the device Ray gave it, in
    `dtype`: see `relay.actors.scoring`; a dtype that cannot run there fails here); Ray restarts it up to
    `max_restarts` times if its process dies. `options` go to Ray (num_gpus, resources, scheduling_strategy)."""
    opts = actor_options(name=name, num_cpus=num_cpus, **{**restart_options(max_restarts), **options})
    actor = ray.remote(ReferenceServer).options(**opts).remote(model_path, dtype, micro_batch_size)
    client = ReferenceClient(actor, timeout_s, max_restarts, opts["name"])
    try:  # a plain wait, so that an error raised while loading (e.g. a dtype this device cannot run) shows
        get(actor.info.remote(), timeout_s, f"{opts['name']} start")
    except Exception:
        client.kill()
        raise
    return client


def ref_logprobs_async(client: ReferenceClient, input_ids: Any, attention_mask: Any) -> Any:
    """ObjectRef of reference logprobs for a padded batch (lets the driver overlap ref/reward/critic)."""
    return client.logprobs_async({"input_ids": input_ids, "attention_mask": attention_mask})


# ------------------------------------------------------------------------------- rules for learning tests


def low_token_share(prompt: str, response: str, response_ids: Sequence[int] | None = None,
                    eos_token_ids: Sequence[int] | None = None) -> float:
    """Share of response tokens (EOS excluded) whose id is below 512: about 0.5 for a random tiny model
    (vocab 1024), so the signal is dense and a policy that learns it moves the mean reward clearly."""
    ids = [int(t) for t in (response_ids or []) if int(t) not in set(map(int, eos_token_ids or ()))]
    return sum(1 for t in ids if t < 512) / max(1, len(ids))
