"""Stage 2 (reward model) loss, run inside the learner workers.

The model is a `relay.models.heads.CriticModel` (backbone + one linear value head). A sequence's reward is the
head's value at its last attended token, as in ColossalChat's RewardModel. A batch holds pairs as
`chosen_input_ids`, `chosen_attention_mask`, `rejected_input_ids`, `rejected_attention_mask` (P, T), padded
to one length so that rows split over data-parallel ranks keep each pair together; both halves go through
one forward.
"""
from __future__ import annotations

from typing import Any

import torch

from relay.algos.losses import reward_model_loss
from relay.learners.lossfn import denominators_or_counts, model_inputs, normalized, register_loss
from relay.learners.sft import prepare_step, trim_padding


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last attended position (B,)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * positions).max(dim=1).values


def last_token_values(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-token values (B, T) -> the value at each row's last attended token (B,), fp32."""
    idx = last_token_index(attention_mask)
    return values.float()[torch.arange(values.shape[0], device=values.device), idx]


def stack_pairs(batch: dict[str, Any], keys: tuple[str, ...] = ("input_ids", "attention_mask")) -> dict[str, Any]:
    """{key: cat(chosen_key, rejected_key)}: one (2P, T) forward batch, chosen rows first."""
    return {k: torch.cat([batch[f"chosen_{k}"], batch[f"rejected_{k}"]], dim=0) for k in keys if f"chosen_{k}" in batch}


def pair_metrics(chosen: torch.Tensor, rejected: torch.Tensor, prefix: str = "") -> dict[str, float]:
    """Accuracy (chosen scored above rejected) and mean rewards; names match `relay plot`'s charts."""
    acc_name = f"{prefix}acc" if prefix else "train/acc"
    return {
        acc_name: float((chosen > rejected).float().mean()),
        f"{prefix}reward_chosen": float(chosen.mean()),
        f"{prefix}reward_rejected": float(rejected.mean()),
        f"{prefix}reward_margin": float((chosen - rejected).mean()),
    }


def pair_counts(batch: dict[str, Any]) -> dict[str, float]:
    """Units the pairwise losses (RM, DPO) average over: pairs."""
    return {"pairs": float(batch["chosen_input_ids"].shape[0])}


def _rm_micro(model: Any, batch: dict[str, Any], loss_type: str, pairs_den: float) -> tuple[torch.Tensor, dict[str, float]]:
    both = trim_padding(stack_pairs(batch))
    pairs = batch["chosen_input_ids"].shape[0]
    rewards = last_token_values(model(**model_inputs(both)), both["attention_mask"])
    chosen, rejected = rewards[:pairs], rewards[pairs:]
    loss = reward_model_loss(chosen, rejected, loss_type) * (pairs / pairs_den)  # mean -> share of the step's
    return loss, pair_metrics(chosen.detach(), rejected.detach())


@register_loss("rm")
@normalized(pair_counts)
def rm_loss(
    model: Any, batch: dict[str, Any], loss_type: str = "log_sig", num_threads: int | None = None,
    step_seed: int | None = None, denominators: dict[str, float] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Pairwise ranking loss (`log_sig` or `log_exp`) on last-token rewards, a mean over the optimizer step's
    pairs; metrics train/acc, reward_chosen, reward_rejected, reward_margin."""
    prepare_step(num_threads, step_seed)
    den = denominators_or_counts(denominators, pair_counts, batch)
    return _rm_micro(model, batch, loss_type, den["pairs"])


def eval_rewards(values: torch.Tensor, attention_mask: torch.Tensor, pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Driver side: `forward_values` output of a stacked (2P, T) batch -> (chosen, rejected) rewards (P,)."""
    rewards = last_token_values(values, attention_mask)
    return rewards[:pairs], rewards[pairs:]
