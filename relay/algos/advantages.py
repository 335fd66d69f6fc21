"""Advantage estimators in a registry (as verl does): `gae` for PPO with a critic, `grpo` and `rloo` for group
baselines without one. Each returns (advantages [B, T], returns [B, T]) over action tokens."""
from __future__ import annotations

from typing import Callable

import torch

from relay.algos.masked import masked_whiten

ADVANTAGE_ESTIMATORS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {}


def register_estimator(name: str):
    def wrap(fn):
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn

    return wrap


def get_estimator(name: str):
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"advantage_estimator: unknown {name!r}; registered: {sorted(ADVANTAGE_ESTIMATORS)}")
    return ADVANTAGE_ESTIMATORS[name]


def token_level_rewards(
    scores: torch.Tensor, action_mask: torch.Tensor, kl: torch.Tensor | None = None, kl_coef: float = 0.0
) -> torch.Tensor:
    """Per-token rewards [B, T]: -kl_coef * kl on every action token, plus the sequence score on the last one."""
    mask = action_mask.float()
    rewards = torch.zeros_like(mask) if kl is None else -kl_coef * kl.float() * mask
    # index of the last action token per row (rows with no action token get nothing)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask.bool(), positions, torch.full_like(positions, -1)).max(dim=1).values
    has_action = last >= 0
    rows = torch.nonzero(has_action).squeeze(-1)
    rewards[rows, last[rows]] += scores.float()[rows]
    return rewards


@register_estimator("gae")
def gae_advantages(
    rewards: torch.Tensor,
    values: torch.Tensor,
    action_mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
    **_: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over action tokens (values after the last action token are 0)."""
    mask = action_mask.float()
    values = values.float() * mask
    rewards = rewards.float() * mask
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last_gae)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = (delta + gamma * lam * last_gae) * mask[:, t]
        advantages[:, t] = last_gae
    returns = (advantages + values) * mask
    return advantages, returns


def _grouped(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    if scores.numel() % group_size:
        raise ValueError(f"{scores.numel()} scores cannot be split into groups of {group_size}")
    return scores.float().view(-1, group_size)


@register_estimator("grpo")
def grpo_advantages(
    scores: torch.Tensor, action_mask: torch.Tensor, group_size: int, eps: float = 1e-6, **_: object
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO: (score - group mean) / (group std + eps), broadcast to every action token of the response."""
    groups = _grouped(scores, group_size)
    std = groups.std(dim=1, keepdim=True, unbiased=True) if group_size > 1 else torch.zeros_like(groups)
    adv = ((groups - groups.mean(dim=1, keepdim=True)) / (std + eps)).view(-1)
    advantages = adv[:, None] * action_mask.float()
    return advantages, advantages.clone()


@register_estimator("rloo")
def rloo_advantages(
    scores: torch.Tensor, action_mask: torch.Tensor, group_size: int, **_: object
) -> tuple[torch.Tensor, torch.Tensor]:
    """RLOO: score minus the mean of the other samples of the same prompt."""
    if group_size < 2:
        raise ValueError("rloo needs at least 2 samples per prompt")
    groups = _grouped(scores, group_size)
    baseline = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    adv = (groups - baseline).view(-1)
    advantages = adv[:, None] * action_mask.float()
    return advantages, advantages.clone()


def compute_advantages(
    estimator: str,
    *,
    scores: torch.Tensor,
    action_mask: torch.Tensor,
    values: torch.Tensor | None = None,
    kl: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    gamma: float = 1.0,
    lam: float = 0.95,
    group_size: int = 1,
    whiten: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One entry point for every estimator: returns (advantages, returns, token rewards), all [B, T].

    `whiten` normalises GAE advantages to mean 0, std 1 over the batch's action tokens. It does not touch grpo /
    rloo: their advantages are already relative to the sample's group, and re-centring them across groups with a
    token-weighted mean can flip a sample's sign (a long, good answer in one group pushes the batch mean above a
    weaker group's positive advantages). Peers do the same: verl's GRPO/RLOO outcome advantages, OpenRLHF
    (normalises only gae / reinforce / reinforce_baseline, not group_norm / rloo) and TRL's GRPO (per-group
    scaling only) apply no batch-level whitening to group advantages.
    """
    rewards = token_level_rewards(scores, action_mask, kl, kl_coef)
    if estimator == "gae":
        if values is None:
            raise ValueError("gae needs critic values")
        advantages, returns = gae_advantages(rewards, values, action_mask, gamma=gamma, lam=lam)
        if whiten:
            advantages = masked_whiten(advantages, action_mask)
        return advantages, returns, rewards
    # group estimators: the KL penalty (if any) is folded into the sequence score; no batch whitening (see above)
    seq_scores = (rewards * action_mask.float()).sum(dim=1)
    advantages, returns = get_estimator(estimator)(scores=seq_scores, action_mask=action_mask, group_size=group_size)
    return advantages, returns, rewards
