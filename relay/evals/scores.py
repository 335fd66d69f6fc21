"""Scores of held-out data, one small pure function each. Inputs are plain tensors or lists; every function
returns a dict of floats (JSON-ready) so results can be logged and compared as they are."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def pairwise_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """Share of pairs whose chosen score is above the rejected one (a tie counts half: a constant scorer gets
    0.5, not 0), and the mean margin. Scores [N] from a reward model or implicit rewards."""
    chosen, rejected = chosen.double().flatten(), rejected.double().flatten()
    if chosen.shape != rejected.shape or chosen.numel() == 0:
        raise ValueError(f"pairwise_accuracy: need two equal non-empty score lists, got {chosen.shape} and {rejected.shape}")
    wins = (chosen > rejected).double() + 0.5 * (chosen == rejected).double()
    return {"accuracy": float(wins.mean()), "margin": float((chosen - rejected).mean()), "pairs": float(chosen.numel())}


def implicit_rewards(policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO's implicit reward beta * (log pi(y|x) - log pi_ref(y|x)) from summed response logprobs [N]."""
    return beta * (policy_logps.double() - ref_logps.double())


def preference_accuracy(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                        ref_rejected: torch.Tensor, beta: float = 0.1) -> dict[str, float]:
    """How often a policy's implicit reward ranks the chosen reply above the rejected one (Rafailov et al.:
    the policy as a reward model against its reference), with the mean margin and rewards."""
    c = implicit_rewards(policy_chosen, ref_chosen, beta)
    r = implicit_rewards(policy_rejected, ref_rejected, beta)
    out = pairwise_accuracy(c, r)
    out.update(reward_chosen=float(c.mean()), reward_rejected=float(r.mean()))
    return out


def answer_rewards(rewards: Sequence[Sequence[float]], pass_threshold: float | None = None) -> dict[str, float]:
    """Rewards of sampled answers, one list per prompt (n samples each): mean, the spread of per-prompt means
    across prompts (`prompt_sd`, the yardstick for 'rose by one standard deviation'), and the pass rate (share
    of answers scoring >= pass_threshold) when a threshold is given."""
    per_prompt = [sum(r) / len(r) for r in rewards if len(r)]
    if not per_prompt:
        raise ValueError("answer_rewards: no rewards")
    flat = [x for r in rewards for x in r]
    mean = sum(flat) / len(flat)
    out = {"reward_mean": mean, "reward_std": _sd(flat), "prompt_sd": _sd(per_prompt),
           "prompts": float(len(per_prompt)), "samples": float(len(flat))}
    if pass_threshold is not None:
        out["pass_rate"] = sum(x >= pass_threshold for x in flat) / len(flat)
    return out


def per_prompt_means(rewards: Sequence[Sequence[float]]) -> list[float]:
    return [sum(r) / len(r) for r in rewards if len(r)]


def sequence_kl(policy_logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """KL(policy || reference) per answer, estimated on answers sampled from the policy at temperature 1:
    k1 = sum_t (log pi - log ref) (unbiased) and k3 = sum_t (exp(-r) - 1 + r) (unbiased, never negative), both
    averaged over answers. Inputs [N, T] over response tokens."""
    m = mask.double()
    r = (policy_logprobs.double() - ref_logprobs.double()) * m
    k3 = (torch.exp(-r) - 1.0 + r) * m
    return {"kl": float(r.sum(1).mean()), "kl_k3": float(k3.sum(1).mean()),
            "kl_per_token": float(r.sum() / m.sum().clamp(min=1.0))}


def effect_in_prompt_sd(before: Sequence[float], after: Sequence[float]) -> float:
    """(mean after - mean before) / SD of the per-prompt means before: how many 'prompt standard deviations'
    the policy moved (inputs: per-prompt mean rewards on the same held-out prompts)."""
    sd = _sd(before)
    delta = sum(after) / len(after) - sum(before) / len(before)
    return delta / sd if sd > 0 else (math.inf if delta > 0 else 0.0)


def gap_closed(before: float, after: float, best: float = 1.0) -> float:
    """Share of the gap between a starting score and the best possible one that training closed."""
    gap = best - before
    return (after - before) / gap if gap > 0 else 0.0


def length_stats(lengths: Sequence[int], finished: Sequence[bool] | None = None) -> dict[str, float]:
    """Mean answer length in tokens (a sign of reward hacking when it runs away) and the share of answers that
    ended by themselves rather than at max_new_tokens."""
    out = {"response_length": sum(lengths) / max(1, len(lengths))}
    if finished is not None:
        out["eos_rate"] = sum(bool(f) for f in finished) / max(1, len(finished))
    return out


def _sd(xs: Sequence[float]) -> float:
    """Sample standard deviation (n - 1), 0 for fewer than two values."""
    n = len(xs)
    if n < 2:
        return 0.0
    mean = sum(xs) / n
    return math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
