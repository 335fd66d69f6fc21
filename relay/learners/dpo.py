"""DPO / IPO / SimPO loss, run inside the learner workers.

A batch holds pairs as `chosen_{input_ids,attention_mask,labels}` and `rejected_{...}` (P, T), one padded
length, so a data-parallel split keeps pairs together; both halves go through one forward. The frozen
reference is either given as precomputed summed logprobs (`ref_chosen_logps`, `ref_rejected_logps`, (P,)) or
is a second model each worker loads once (`reference_path`) and runs without gradients. SimPO needs none.

Only positions that predict a label token get logits (`logits_to_keep`): prompts are often half of a pair's
tokens and the LM head is a large share of a small model's forward. Where the forward allows it, a pair's
shared prompt runs once (`relay.learners.pair_forward`, config `shared_prompt_forward`).
"""
from __future__ import annotations

from typing import Any

import torch

from relay.algos.losses import IGNORE_INDEX, dpo_loss, logprobs_from_logits
from relay.learners.lossfn import denominators_or_counts, normalized, register_loss
from relay.learners.pair_forward import shared_prompt_lengths, shared_prompt_logprobs
from relay.learners.rm import pair_counts, stack_pairs
from relay.learners.sft import label_logits, prepare_step, trim_padding

# One frozen reference per worker process: (path, dtype, device) -> model.
_REFERENCE: dict[tuple[str, ...], Any] = {}


def sequence_logprobs(model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log p of each row's label tokens (B,) and their count (B,)."""
    logits, targets = label_logits(model, batch)
    logp = logprobs_from_logits(logits, targets)  # 0 where the target is -100
    return logp.sum(-1), (targets != IGNORE_INDEX).sum(-1)


def token_logprob_sums(token_logprobs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Driver side: `forward_logprobs` output (B, T-1) and labels (B, T) -> summed label logprobs and counts."""
    mask = labels[:, 1 : 1 + token_logprobs.shape[1]] != IGNORE_INDEX
    return (token_logprobs.float() * mask).sum(-1), mask.sum(-1)


def reference_model(path: str, dtype: torch.dtype, device: torch.device, attn: str | None = None) -> Any:
    """The frozen reference, loaded once per worker (a new key replaces the old model)."""
    key = (str(path), str(dtype), str(device), str(attn))
    if key not in _REFERENCE:
        from transformers import AutoModelForCausalLM

        _REFERENCE.clear()
        extra = {"attn_implementation": attn} if attn else {}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **extra).to(device)
        model.eval()
        model.requires_grad_(False)
        _REFERENCE[key] = model
    return _REFERENCE[key]


def dpo_metrics(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, chosen_logps: torch.Tensor, rejected_logps: torch.Tensor,
    prefix: str = "",
) -> dict[str, float]:
    return {
        f"{prefix}rewards/chosen": float(chosen_rewards.mean()),
        f"{prefix}rewards/rejected": float(rejected_rewards.mean()),
        f"{prefix}rewards/margins": float((chosen_rewards - rejected_rewards).mean()),
        f"{prefix}rewards/accuracy": float((chosen_rewards > rejected_rewards).float().mean()),
        f"{prefix}logps/chosen": float(chosen_logps.mean()),
        f"{prefix}logps/rejected": float(rejected_logps.mean()),
    }


def pair_logprobs(model: Any, batch: dict[str, Any], shared_prompt: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed label logprobs and counts of the 2P rows (chosen first): prompt once when allowed and shared
    (`relay.learners.pair_forward`), else the stacked pairs."""
    lengths = shared_prompt_lengths(batch) if shared_prompt else None
    if lengths is not None:
        return shared_prompt_logprobs(model, batch, lengths)
    return sequence_logprobs(model, trim_padding(stack_pairs(batch, ("input_ids", "attention_mask", "labels"))))


def _dpo_loss(
    model: Any, batch: dict[str, Any], beta: float, loss_type: str, label_smoothing: float, gamma: float,
    reference_path: str | None, reference_attn: str | None, shared_prompt: bool, pairs_den: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    pairs = batch["chosen_input_ids"].shape[0]
    logps, lengths = pair_logprobs(model, batch, shared_prompt)
    ref_c = ref_r = None
    if loss_type != "simpo":
        if "ref_chosen_logps" in batch:
            ref_c, ref_r = batch["ref_chosen_logps"].float(), batch["ref_rejected_logps"].float()
        elif reference_path:
            param = next(model.parameters())
            with torch.no_grad():
                ref_model = reference_model(reference_path, param.dtype, param.device, reference_attn)
                ref, _ = pair_logprobs(ref_model, batch, shared_prompt)
            ref_c, ref_r = ref[:pairs], ref[pairs:]
        else:
            raise ValueError(f"loss_type {loss_type!r} needs reference logprobs or a reference_path")
    loss, chosen_rewards, rejected_rewards = dpo_loss(
        logps[:pairs], logps[pairs:], ref_c, ref_r, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
        gamma=gamma, chosen_lengths=lengths[:pairs], rejected_lengths=lengths[pairs:],
    )
    loss = loss * (pairs / pairs_den)  # mean over these pairs -> their share of the step's mean
    return loss, dpo_metrics(chosen_rewards, rejected_rewards, logps[:pairs].detach(), logps[pairs:].detach())


@register_loss("dpo")
@normalized(pair_counts)
def dpo_train_loss(
    model: Any,
    batch: dict[str, Any],
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    gamma: float = 0.5,
    reference_path: str | None = None,
    reference_attn: str | None = None,
    shared_prompt: bool = False,
    num_threads: int | None = None,
    step_seed: int | None = None,
    denominators: dict[str, float] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """DPO-family loss (`relay.algos.losses.dpo_loss`), a mean over the optimizer step's pairs; metrics
    rewards/{chosen,rejected,margins,accuracy} and logps/{chosen,rejected}. Reference: precomputed in the
    batch, else the model at `reference_path`. `shared_prompt`: run each pair's prompt once (only with a plain
    HF forward: see pair_forward)."""
    prepare_step(num_threads, step_seed)
    den = denominators_or_counts(denominators, pair_counts, batch)
    return _dpo_loss(
        model, batch, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, gamma=gamma,
        reference_path=reference_path, reference_attn=reference_attn, shared_prompt=shared_prompt,
        pairs_den=den["pairs"],
    )
