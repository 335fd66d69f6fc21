"""Held-out scores (relay/evals) against hand-written reference computations. No Ray."""
from __future__ import annotations

import math
import statistics

import pytest
import torch

from relay.evals.scores import (
    answer_rewards, effect_in_prompt_sd, gap_closed, pairwise_accuracy, preference_accuracy, sequence_kl,
)


def test_pairwise_accuracy_counts_ties_as_half():
    chosen = torch.tensor([1.0, 2.0, 0.5, 3.0])
    rejected = torch.tensor([0.0, 2.0, 1.0, 1.0])
    out = pairwise_accuracy(chosen, rejected)
    assert out["accuracy"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert out["margin"] == pytest.approx((1 + 0 - 0.5 + 2) / 4)
    with pytest.raises(ValueError):
        pairwise_accuracy(torch.tensor([1.0]), torch.tensor([1.0, 2.0]))


def test_preference_accuracy_is_dpo_implicit_reward_ranking():
    pc, pr = torch.tensor([-10.0, -20.0, -5.0]), torch.tensor([-12.0, -19.0, -9.0])
    rc, rr = torch.tensor([-11.0, -20.0, -5.0]), torch.tensor([-11.0, -20.0, -8.0])
    beta = 0.5
    # Rafailov et al.: r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x))
    margins = [beta * ((a - b) - (c - d)) for a, b, c, d in zip(pc.tolist(), rc.tolist(), pr.tolist(), rr.tolist())]
    out = preference_accuracy(pc, pr, rc, rr, beta)
    assert out["accuracy"] == pytest.approx(sum(m > 0 for m in margins) / 3)
    assert out["margin"] == pytest.approx(sum(margins) / 3)


def test_answer_rewards_spread_across_prompts_and_pass_rate():
    rewards = [[1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [0.5, 1.0]]
    out = answer_rewards(rewards, pass_threshold=1.0)
    flat = [x for r in rewards for x in r]
    assert out["reward_mean"] == pytest.approx(statistics.mean(flat))
    assert out["prompt_sd"] == pytest.approx(statistics.stdev([statistics.mean(r) for r in rewards]))
    assert out["pass_rate"] == pytest.approx(4 / 8)
    assert "pass_rate" not in answer_rewards(rewards)


def test_sequence_kl_matches_per_answer_sums():
    pol = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -3.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-0.3, -3.0, -9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    k1 = [sum(p - q for p, q, m in zip(pr, rr, mr) if m) for pr, rr, mr in zip(pol.tolist(), ref.tolist(), mask.tolist())]
    k3 = [sum(math.exp(q - p) - 1 + (p - q) for p, q, m in zip(pr, rr, mr) if m)
          for pr, rr, mr in zip(pol.tolist(), ref.tolist(), mask.tolist())]
    out = sequence_kl(pol, ref, mask)
    assert out["kl"] == pytest.approx(sum(k1) / 2)
    assert out["kl_k3"] == pytest.approx(sum(k3) / 2)


def test_effect_size_and_gap_closed():
    before, after = [0.0, 0.2, 0.4, 0.2], [0.5, 0.6, 0.4, 0.5]
    sd = statistics.stdev(before)
    assert effect_in_prompt_sd(before, after) == pytest.approx((statistics.mean(after) - statistics.mean(before)) / sd)
    assert gap_closed(0.2, 0.6) == pytest.approx(0.5)
    assert gap_closed(1.0, 1.0) == 0.0
