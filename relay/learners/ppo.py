"""PPO losses for learner groups, registered by name (`train_step(batch, loss="ppo_actor")`).

Batch layout (the driver builds it from `Experience`s): `input_ids` [B, S] = left-padded prompt then
right-padded response, `attention_mask` [B, S], and response-aligned [B, A] tensors (`action_mask`,
`old_logprobs`, `advantages`, ...) over the last A positions of `input_ids`. Logprobs of response token j come
from the logits at position S-A+j-1; the critic's value for action j is the value of that same prefix.

The learner workers import this module through `relay.learners.ppo` when the loss name is resolved, so the
driver imports it once (registration) and passes names, not closures.
"""
from __future__ import annotations

from typing import Any

import torch

from relay.algos.kl import kl_estimate
from relay.algos.losses import entropy_from_logits, lm_loss, policy_loss, truncated_is_weights, value_loss
from relay.algos.masked import masked_mean, masked_token_mean
from relay.learners.lossfn import (
    IGNORE_INDEX, causal_logits, denominators_or_counts, model_inputs, normalized, register_loss,
)
from relay.learners.autocast import autocast_forward
from relay.learners.logprobs import chunked_logprobs
from relay.learners.sft import prepare_step
from relay.learners.prefix_forward import prompt_groups, shared_prefix_response_logits

PTX_PREFIX = "ptx_"


def response_logits(logits: torch.Tensor, num_actions: int) -> torch.Tensor:
    """Logits that predict the A response tokens: positions S-A-1 .. S-2 of [B, S, V] -> [B, A, V]."""
    return logits[:, -num_actions - 1 : -1]


def gather_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """fp32 log_softmax(logits)[token]: [B, A, V] and [B, A] -> [B, A], chunked (`relay.learners.logprobs`)."""
    return chunked_logprobs(logits, tokens)[0]


def response_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, num_actions: int) -> torch.Tensor:
    """fp32 log p(response token j | prefix) [B, A], the same numbers `LearnerGroup.forward_logprobs`[:, -A:]
    gives (and the generator reports from raw logits)."""
    return gather_logprobs(response_logits(logits, num_actions), input_ids[:, -num_actions:])


def response_values(values: torch.Tensor, num_actions: int) -> torch.Tensor:
    """Per-token critic values [B, S] -> [B, A]: the value of the prefix before each response token."""
    return values[:, -num_actions - 1 : -1]


def trim_padding_columns(batch: dict[str, Any]) -> dict[str, Any]:
    """Drop the columns no row of this micro-batch uses: left padding before the longest prompt and right
    padding after the longest response. The driver pads an episode to its longest prompt and response; a
    micro-batch of a few prompts needs much less, and padding costs as much compute as real tokens."""
    mask, actions = batch["attention_mask"], batch["action_mask"]
    S, A = mask.shape[1], actions.shape[1]
    used = mask[:, : S - A].any(dim=0).nonzero()
    left = int(used.min()) if used.numel() else S - A
    acted = actions.any(dim=0).nonzero()
    keep_a = int(acted.max()) + 1 if acted.numel() else 1
    if left == 0 and keep_a == A:
        return batch
    cut = A - keep_a
    out = {}
    for k, v in batch.items():
        if k.startswith(PTX_PREFIX) or not torch.is_tensor(v) or v.dim() != 2:
            out[k] = v
        elif v.shape[1] == S:
            out[k] = v[:, left : S - cut]
        elif v.shape[1] == A:
            out[k] = v[:, :keep_a]
        else:
            out[k] = v
    return out


def actor_token_counts(batch: dict[str, Any], shared_prompt: bool) -> dict[str, int]:
    """Real tokens one actor pass over `batch` computes, for FLOP counts (`relay.models.flops`): `tokens`
    (prompt + response tokens, padding not counted; with `shared_prompt` a group's repeated prompt counts once)
    and `logit_tokens` (response tokens: the LM head runs only there)."""
    mask, actions = batch["attention_mask"], batch["action_mask"]
    A = actions.shape[1]
    prompt_rows = mask[:, : mask.shape[1] - A].sum(1)
    groups = prompt_groups(batch["input_ids"], mask, A) if shared_prompt else None
    if groups is not None:  # only each group's first row runs its prompt
        first = torch.ones_like(groups, dtype=torch.bool)
        first[1:] = groups[1:] != groups[:-1]
        prompt_rows = prompt_rows[first]
    n_actions = int(actions.sum())
    return {"tokens": int(prompt_rows.sum()) + n_actions, "logit_tokens": n_actions}


def _ptx_batch(batch: dict[str, Any]) -> dict[str, Any] | None:
    ptx = {k[len(PTX_PREFIX):]: v for k, v in batch.items() if k.startswith(PTX_PREFIX)}
    return ptx if ptx.get("input_ids") is not None and ptx["input_ids"].shape[0] > 0 else None


def actor_counts(batch: dict[str, Any]) -> dict[str, float]:
    """Units the actor loss averages over: action tokens (primary) and ptx label tokens."""
    ptx = _ptx_batch(batch)
    ptx_tokens = float((ptx["labels"][:, 1:] != IGNORE_INDEX).sum()) if ptx is not None else 0.0
    return {"actions": float(batch["action_mask"].sum()), "ptx_tokens": ptx_tokens}


def action_counts(batch: dict[str, Any]) -> dict[str, float]:
    return {"actions": float(batch["action_mask"].sum())}


@register_loss("ppo_actor")
@normalized(actor_counts, summed=("pg_loss", "entropy", "kl_loss", "ptx_loss"))
def ppo_actor_loss(
    model: Any,
    batch: dict[str, Any],
    clip_eps: float = 0.2,
    ptx_coef: float = 0.0,
    entropy_coef: float = 0.0,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    shared_prompt: bool = False,
    temperature: float = 1.0,
    denominators: dict[str, float] | None = None,
    num_threads: int | None = None,
    autocast: str | None = None,
    old_from_forward: bool = False,
    tis_cap: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped PPO surrogate (x truncated IS weights `is_weights` when present, async mode)
    - entropy_coef x entropy + kl_coef x KL(policy || ref) (only when the KL is a loss term: `ref_logprobs`
    present and kl_coef > 0), each a mean over the step's action tokens, + ptx_coef x next-token loss, a mean
    over the step's ptx label tokens (`ptx_*` rows). Logprobs and entropy come from logits / `temperature`
    (the sampling temperature, as the generator sampled). `shared_prompt`: run repeated prompts once
    (`relay.learners.prefix_forward`; plain HF forwards only). `denominators`: see `lossfn.normalized`.
    `num_threads`: torch threads of this rank from now on (actor_learner.num_threads). `autocast`: "bf16" (or
    "auto" where this rank's hardware computes bf16 natively) runs the policy forward under bf16 autocast
    (`relay.learners.autocast`; fp32 weights and loss math; algo.update_autocast). `old_from_forward`: the
    ratio's old logprobs are this forward's own, detached (algo.old_logprobs 'loss': the step is the episode's
    only one); `old_logprobs` then holds the generator's, which `tis_cap` > 0 turns into truncated importance
    weights min(pi_learner / pi_generator, tis_cap) (async mode)."""
    prepare_step(num_threads)
    den = denominators_or_counts(denominators, actor_counts, batch)
    batch = trim_padding_columns(batch)
    mask = batch["action_mask"].float()
    num_actions = mask.shape[1]
    with autocast_forward(model, autocast):
        resp_logits = shared_prefix_response_logits(model, batch, num_actions) if shared_prompt else None
        if resp_logits is None:
            resp_logits = response_logits(causal_logits(model, batch, keep=num_actions + 1), num_actions)
    # fp32 only per chunk: no [B, A, V] fp32 log-softmax (nor a copy of the logits / temperature) is kept.
    logprobs, token_entropy = chunked_logprobs(resp_logits, batch["input_ids"][:, -num_actions:], temperature)
    n = den["actions"]
    sampled = batch["old_logprobs"]
    old, is_weights = sampled, batch.get("is_weights")
    if old_from_forward:
        old = logprobs.detach()
        if tis_cap > 0:
            is_weights = truncated_is_weights(old, sampled, tis_cap, mask)
    pg_loss, stats = policy_loss(logprobs, old, batch["advantages"], mask, clip_eps, is_weights, token_normalizer=n)
    loss = pg_loss
    # Entropy with a gradient is [B, A, V] work of its own: only when it is in the loss; else the chunked
    # pass's (no-grad) entropy serves the metric.
    if entropy_coef > 0:
        scaled = resp_logits.float() / temperature if temperature != 1.0 else resp_logits
        entropy = masked_token_mean(entropy_from_logits(scaled), mask, n)
        loss = loss - entropy_coef * entropy
    else:
        entropy = masked_token_mean(token_entropy, mask, n)
    metrics = {
        # at an episode's first step with generator old logprobs: the learner against its sampler
        "logprob_diff": float(masked_mean((logprobs.detach() - sampled).abs(), mask)),
        "pg_loss": float(pg_loss.detach()),
        "entropy": float(entropy.detach()),
        "clip_frac": float(stats["clip_frac"]),
        "approx_kl": float(stats["approx_kl"]),
        "ratio": float(stats["ratio"]),
    }
    if old_from_forward and tis_cap > 0:
        metrics["is_weight_mean"] = float(masked_mean(is_weights, mask))
    if kl_coef > 0 and "ref_logprobs" in batch:
        kl = masked_token_mean(kl_estimate(logprobs, batch["ref_logprobs"], kl_estimator), mask, n)
        loss = loss + kl_coef * kl
        metrics["kl_loss"] = float(kl.detach())
    if ptx_coef > 0:
        ptx = _ptx_batch(batch)
        ptx_loss = 0.0  # reported by every micro-batch: ranks must report the same metric names
        if ptx is not None:
            ptx_loss = lm_loss(causal_logits(model, ptx), ptx["labels"], token_normalizer=den["ptx_tokens"])
            loss = loss + ptx_coef * ptx_loss
            ptx_loss = float(ptx_loss.detach())
        metrics["ptx_loss"] = ptx_loss
    return loss, metrics


@register_loss("ppo_critic")
@normalized(action_counts)
def ppo_critic_loss(
    model: Any, batch: dict[str, Any], value_clip: float = 0.2, denominators: dict[str, float] | None = None,
    num_threads: int | None = None,
    autocast: str | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss of the critic's response values against `returns` (clip around `old_values`), a
    mean over the step's action tokens. `autocast`: as in `ppo_actor_loss` (the critic's forward under bf16
    autocast, values and loss in fp32)."""
    prepare_step(num_threads)
    den = denominators_or_counts(denominators, action_counts, batch)
    batch = trim_padding_columns(batch)
    mask = batch["action_mask"].float()
    with autocast_forward(model, autocast):
        out = model(**model_inputs(batch))
    values = response_values(out.float(), mask.shape[1])
    loss = value_loss(values, batch["old_values"], batch["returns"], mask, value_clip, token_normalizer=den["actions"])
    return loss, {"value_mean": float(masked_mean(values.detach(), mask))}
