"""Pure math: KL estimators, advantage estimators and losses, checked against direct formulas. No Ray."""
from __future__ import annotations

import math

import pytest
import torch

from relay.algos.advantages import ADVANTAGE_ESTIMATORS, compute_advantages, gae_advantages, token_level_rewards
from relay.algos.kl import AdaptiveKLController, approx_kl, kl_estimate
from relay.algos.losses import dpo_loss, lm_loss, logprobs_from_logits, policy_loss, reward_model_loss, value_loss
from relay.algos.masked import masked_mean, masked_whiten


def test_kl_estimators_zero_at_equal_and_k3_nonnegative():
    torch.manual_seed(0)
    a = torch.randn(4, 7)
    for est in ("k1", "k2", "k3"):
        assert torch.allclose(kl_estimate(a, a, est), torch.zeros_like(a))
    b = torch.randn(4, 7)
    assert (kl_estimate(a, b, "k3") >= 0).all()
    with pytest.raises(ValueError, match="kl_estimator"):
        kl_estimate(a, b, "k9")


def test_k1_and_k3_are_unbiased_for_true_kl():
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(6), 0)
    q = torch.softmax(torch.randn(6), 0)
    true_kl = (p * (p.log() - q.log())).sum()
    samples = torch.multinomial(p, 200_000, replacement=True)
    lp, lq = p.log()[samples], q.log()[samples]
    assert kl_estimate(lp, lq, "k1").mean() == pytest.approx(true_kl.item(), abs=0.01)
    assert kl_estimate(lp, lq, "k3").mean() == pytest.approx(true_kl.item(), abs=0.01)


def _gae_reference(rewards, values, mask, gamma, lam):
    B, T = rewards.shape
    adv = torch.zeros(B, T)
    for b in range(B):
        n = int(mask[b].sum())
        for t in range(n):
            total = 0.0
            for k in range(t, n):
                next_v = values[b, k + 1].item() if k + 1 < n else 0.0
                delta = rewards[b, k].item() + gamma * next_v - values[b, k].item()
                total += (gamma * lam) ** (k - t) * delta
            adv[b, t] = total
    return adv


def test_gae_matches_direct_sum():
    torch.manual_seed(1)
    B, T = 3, 6
    rewards, values = torch.randn(B, T), torch.randn(B, T)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4]).float()
    adv, ret = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
    ref = _gae_reference(rewards * mask, values * mask, mask, 0.9, 0.8)
    assert torch.allclose(adv, ref, atol=1e-5)
    assert torch.allclose(ret, (ref + values) * mask, atol=1e-5)


def test_gae_lambda_one_gives_reward_to_go_minus_value():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.2, 0.5, 0.7]])
    adv, ret = gae_advantages(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    assert torch.allclose(ret, torch.ones(1, 3))
    assert torch.allclose(adv, 1.0 - values)


def test_token_level_rewards_put_score_on_last_action_token():
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]]).float()
    kl = torch.ones(3, 4)
    r = token_level_rewards(torch.tensor([2.0, 3.0, 5.0]), mask, kl, kl_coef=0.1)
    assert torch.allclose(r[0], torch.tensor([0.0, -0.1, 1.9, 0.0]))
    assert torch.allclose(r[1], torch.tensor([-0.1, -0.1, -0.1, 2.9]))
    assert torch.allclose(r[2], torch.zeros(4))  # no action token: no reward anywhere


def test_group_estimators():
    scores = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 4.0])
    mask = torch.ones(6, 3)
    grpo, _ = ADVANTAGE_ESTIMATORS["grpo"](scores=scores, action_mask=mask, group_size=3)
    rloo, _ = ADVANTAGE_ESTIMATORS["rloo"](scores=scores, action_mask=mask, group_size=3)
    for adv in (grpo, rloo):
        per_group = adv[:, 0].view(2, 3).sum(1)
        assert torch.allclose(per_group, torch.zeros(2), atol=1e-5)
    assert rloo[0, 0].item() == pytest.approx(1.0 - 2.5)
    assert grpo[2, 0].item() == pytest.approx(1.0, abs=1e-4)  # (3 - 2) / std([1,2,3]) = 1
    with pytest.raises(ValueError):
        ADVANTAGE_ESTIMATORS["grpo"](scores=torch.ones(5), action_mask=torch.ones(5, 2), group_size=3)


def test_compute_advantages_whitens_over_mask():
    torch.manual_seed(2)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]).float()
    adv, ret, rewards = compute_advantages("gae", scores=torch.tensor([1.0, -1.0]), action_mask=mask,
                                           values=torch.randn(2, 4), kl=torch.zeros(2, 4), kl_coef=0.1)
    assert masked_mean(adv, mask).abs() < 1e-5
    assert (adv * (1 - mask)).abs().sum() == 0
    with pytest.raises(ValueError, match="critic"):
        compute_advantages("gae", scores=torch.ones(2), action_mask=mask)


def test_masked_whiten_unit_variance():
    torch.manual_seed(3)
    x, mask = torch.randn(5, 9) * 3 + 2, (torch.rand(5, 9) > 0.3).float()
    w = masked_whiten(x, mask)
    assert masked_mean(w, mask).abs() < 1e-5
    assert masked_mean(w**2, mask) == pytest.approx(1.0, abs=1e-3)


def test_policy_loss_on_policy_equals_negative_advantage_and_zero_kl():
    torch.manual_seed(4)
    lp, adv, mask = torch.randn(3, 5), torch.randn(3, 5), torch.ones(3, 5)
    loss, stats = policy_loss(lp, lp.clone(), adv, mask)
    assert loss.item() == pytest.approx(-adv.mean().item(), abs=1e-6)
    assert stats["approx_kl"].item() == pytest.approx(0.0, abs=1e-7) and stats["clip_frac"].item() == 0.0


def test_policy_loss_clips():
    old = torch.zeros(1, 2)
    new = torch.log(torch.tensor([[1.5, 0.5]]))  # ratios 1.5 and 0.5
    adv = torch.tensor([[1.0, -1.0]])
    loss, stats = policy_loss(new, old, adv, torch.ones(1, 2), clip_eps=0.2)
    # min(1.5*1, 1.2*1) = 1.2 ; min(0.5*-1, 0.8*-1) = -0.8 -> loss = -(1.2 - 0.8)/2
    assert loss.item() == pytest.approx(-0.2, abs=1e-6)
    assert stats["clip_frac"].item() == 1.0


def test_value_loss_clipping():
    returns, old = torch.tensor([[1.0]]), torch.tensor([[0.0]])
    values = torch.tensor([[0.5]])
    assert value_loss(values, old, returns, torch.ones(1, 1), clip_eps=0.2).item() == pytest.approx(0.5 * 0.8**2)
    assert value_loss(values, old, returns, torch.ones(1, 1), clip_eps=0.0).item() == pytest.approx(0.5 * 0.5**2)


def test_lm_loss_matches_transformers(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    ids = torch.randint(0, 1000, (2, 12))
    labels = ids.clone()
    labels[:, :5] = -100
    out = model(input_ids=ids, labels=labels)
    assert lm_loss(out.logits, labels).item() == pytest.approx(out.loss.item(), rel=1e-5)
    lp = logprobs_from_logits(out.logits[:, :-1], labels[:, 1:])
    assert -(lp.sum() / (labels[:, 1:] != -100).sum()).item() == pytest.approx(out.loss.item(), rel=1e-5)


def test_reward_model_losses_agree():
    c, r = torch.randn(8), torch.randn(8)
    a, b = reward_model_loss(c, r, "log_sig"), reward_model_loss(c, r, "log_exp")
    assert a.item() == pytest.approx(b.item(), rel=1e-5)
    assert reward_model_loss(torch.zeros(3), torch.zeros(3)).item() == pytest.approx(math.log(2))
    assert reward_model_loss(torch.full((3,), 10.0), torch.zeros(3)).item() < 1e-4


def test_dpo_losses():
    pc, pr = torch.randn(4), torch.randn(4)
    loss, cr, rr = dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6) and cr.abs().max() == 0
    better, _, _ = dpo_loss(pc + 1, pr - 1, pc, pr, beta=0.1)
    assert better.item() < math.log(2)
    ipo, _, _ = dpo_loss(pc, pr, pc, pr, beta=0.1, loss_type="ipo")
    assert ipo.item() == pytest.approx((1 / 0.2) ** 2)
    lengths = torch.full((4,), 2.0)
    simpo, c2, _ = dpo_loss(pc, pr, None, None, beta=2.0, loss_type="simpo", gamma=0.0,
                            chosen_lengths=lengths, rejected_lengths=lengths)
    assert torch.allclose(c2, pc)  # beta * logp / length
    with pytest.raises(ValueError, match="reference"):
        dpo_loss(pc, pr, None, None)


def test_adaptive_kl_moves_toward_target():
    ctl = AdaptiveKLController(0.1, target=1.0, horizon=100)
    assert ctl.update(5.0, 10) > 0.1
    ctl2 = AdaptiveKLController(0.1, target=1.0, horizon=100)
    assert ctl2.update(0.1, 10) < 0.1


def test_approx_kl_zero_when_equal():
    x = torch.randn(3, 3)
    assert torch.allclose(approx_kl(x, x), torch.zeros(3, 3))
