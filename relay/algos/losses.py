"""Losses, one small function each: PPO clipped policy loss, clipped value loss, token cross entropy (SFT and
ptx), pairwise reward-model losses, and DPO / IPO / SimPO. Inputs are plain tensors; shapes in docstrings."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from relay.algos.kl import approx_kl
from relay.algos.masked import masked_mean, masked_token_mean

IGNORE_INDEX = -100


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(labels) per position: logits [B, T, V], labels [B, T] -> [B, T] (fp32; label -100 gives 0)."""
    safe = labels.clamp(min=0)
    logp = torch.log_softmax(logits.float(), dim=-1)
    out = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return out.masked_fill(labels == IGNORE_INDEX, 0.0)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the token distribution per position: [B, T, V] -> [B, T]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def lm_token_count(labels: torch.Tensor) -> int:
    """Number of tokens `lm_loss` averages over: shifted labels that are not -100 ([B, T] -> int)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, token_normalizer: float | None = None) -> torch.Tensor:
    """Next-token cross entropy averaged over tokens whose label is not -100 (SFT, ptx).

    logits [B, T, V] and labels [B, T] are aligned with the input ids; the shift happens here. With
    `token_normalizer` the summed cross entropy is divided by it instead (pass the whole batch's
    `lm_token_count` to every micro-batch and sum: the big-batch mean). A batch with no labelled token gives 0
    (F.cross_entropy's mean would give nan and poison the step).
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    total = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    if token_normalizer is None:
        # a tensor count (no host sync on an accelerator)
        return total / (shift_labels != IGNORE_INDEX).sum().clamp(min=1)
    if token_normalizer <= 0:
        raise ValueError(f"token_normalizer must be > 0, got {token_normalizer}")
    return total / token_normalizer


def truncated_is_weights(
    logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, cap: float, action_mask: torch.Tensor
) -> torch.Tensor:
    """Truncated importance weights min(pi / pi_behaviour, cap) per response token [B, T] (verl's TIS), 0 off the
    action mask: how async mode corrects for samples drawn by older generator weights."""
    return torch.exp(logprobs.float() - behaviour_logprobs.float()).clamp(max=cap) * action_mask


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    action_mask: torch.Tensor,
    clip_eps: float = 0.2,
    is_weights: torch.Tensor | None = None,
    token_normalizer: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate. All inputs [B, T] over response tokens; `is_weights` is the (truncated) importance
    weight generator -> learner used in asynchronous mode, a constant factor on each token's clipped loss (as
    verl's TIS). Token mean over `action_mask`, or the masked sum / `token_normalizer` when given (micro-batch
    accumulation: see `masked_token_mean`). Returns the loss and detached stats (per micro-batch means)."""
    ratio = torch.exp(logprobs.float() - old_logprobs.float())
    surr1 = ratio * advantages
    surr2 = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * advantages
    per_token = -torch.min(surr1, surr2)
    if is_weights is not None:
        per_token = per_token * is_weights.detach()
    loss = masked_token_mean(per_token, action_mask, token_normalizer)
    with torch.no_grad():
        # tokens where the clipped term is the active one (strictly larger loss), either advantage sign: verl's
        # pg_clipfrac = mean(pg_losses2 > pg_losses1). A ratio outside the range whose unclipped term is the
        # smaller objective (e.g. A < 0 and ratio > 1 + eps) still gets a gradient and is not counted.
        clipped = (surr2 < surr1).float()
        stats = {
            "clip_frac": masked_mean(clipped, action_mask),
            "approx_kl": masked_mean(approx_kl(logprobs.detach(), old_logprobs), action_mask),
            "ratio": masked_mean(ratio.detach(), action_mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    action_mask: torch.Tensor,
    clip_eps: float = 0.2,
    token_normalizer: float | None = None,
) -> torch.Tensor:
    """Clipped value loss, 0.5 * max((v - R)^2, (clip(v) - R)^2), over action tokens [B, T] (clip 0 = plain MSE).
    Token mean, or masked sum / `token_normalizer` when given (micro-batch accumulation)."""
    values = values.float()
    unclipped = (values - returns) ** 2
    if clip_eps > 0:
        clipped_values = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
        per_token = torch.max(unclipped, (clipped_values - returns) ** 2)
    else:
        per_token = unclipped
    return 0.5 * masked_token_mean(per_token, action_mask, token_normalizer)


def reward_model_loss(chosen: torch.Tensor, rejected: torch.Tensor, loss_type: str = "log_sig") -> torch.Tensor:
    """Pairwise ranking loss on sequence rewards [B]: log_sig = -log sigmoid(c - r); log_exp = log(1 + exp(r - c)).

    The two are the same function mathematically; log_exp is computed as the seed writes it (softplus keeps it
    stable), log_sig through logsigmoid.
    """
    if loss_type == "log_sig":
        return -F.logsigmoid(chosen.float() - rejected.float()).mean()
    if loss_type == "log_exp":
        return F.softplus(rejected.float() - chosen.float()).mean()
    raise ValueError(f"loss_type: unknown reward-model loss {loss_type!r} (use log_sig or log_exp)")


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor | None,
    ref_rejected: torch.Tensor | None,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    gamma: float = 0.5,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO-family loss on summed response logprobs [B]. Returns (loss, chosen_rewards, rejected_rewards).

    sigmoid: Rafailov et al. (with optional conservative label smoothing); ipo: Azar et al., squared distance of
    the log-ratio margin to 1/(2 beta), length-normalised when lengths are given (as TRL's ipo, rewards too);
    simpo: Meng et al., reference-free, average logprob per token, target margin gamma.
    """
    if loss_type == "simpo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("simpo needs chosen_lengths and rejected_lengths")
        chosen_rewards = beta * policy_chosen / chosen_lengths.clamp(min=1)
        rejected_rewards = beta * policy_rejected / rejected_lengths.clamp(min=1)
        loss = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma).mean()
        return loss, chosen_rewards.detach(), rejected_rewards.detach()
    if ref_chosen is None or ref_rejected is None:
        raise ValueError(f"{loss_type} needs reference logprobs")
    chosen_logratio = policy_chosen - ref_chosen
    rejected_logratio = policy_rejected - ref_rejected
    margin = chosen_logratio - rejected_logratio
    if loss_type == "sigmoid":
        loss = (
            -F.logsigmoid(beta * margin) * (1 - label_smoothing) - F.logsigmoid(-beta * margin) * label_smoothing
        ).mean()
    elif loss_type == "ipo":
        if chosen_lengths is not None and rejected_lengths is not None:
            # TRL's ipo averages logprobs over the response; its implicit rewards use the same averages, so the
            # reward metrics (accuracy, margins) describe the margin this loss optimises
            chosen_logratio = chosen_logratio / chosen_lengths.clamp(min=1)
            rejected_logratio = rejected_logratio / rejected_lengths.clamp(min=1)
            margin = chosen_logratio - rejected_logratio
        loss = ((margin - 1.0 / (2.0 * beta)) ** 2).mean()
    else:
        raise ValueError(f"loss_type: unknown DPO loss {loss_type!r} (use sigmoid, ipo or simpo)")
    return loss, (beta * chosen_logratio).detach(), (beta * rejected_logratio).detach()
