"""relay.algos against independent references: each expected value is computed here, in a few lines of plain Python
(math / statistics, float64), from the paper's or a peer's formula, never by calling the code under test."""
from __future__ import annotations

import math
import statistics

import pytest
import torch

from relay.algos.advantages import compute_advantages
from relay.algos.kl import kl_estimate
from relay.algos.losses import dpo_loss, entropy_from_logits, lm_loss, lm_token_count, policy_loss, value_loss
from relay.algos.masked import masked_token_mean


def _right_padded_mask(lengths: list[int], width: int) -> torch.Tensor:
    return torch.tensor([[1.0] * n + [0.0] * (width - n) for n in lengths])


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


# ---------------------------------------------------------------- group estimators keep each sample's sign

# Two prompts, 3 samples each. Prompt 0: only the long (20-token) answer is right; prompt 1: two short right
# answers. Whitening with a token-weighted batch mean (the long answer's advantage counted 20 times) moves the
# mean above prompt 1's positive advantages and flips them negative.
GROUP_SCORES = [0.0, 0.0, 1.0, 1.0, 1.0, 0.0]
GROUP_LENGTHS = [1, 1, 20, 1, 1, 1]


def _grpo_reference(scores: list[float], n: int, eps: float = 1e-6) -> list[float]:
    out = []
    for g in range(0, len(scores), n):
        group = scores[g : g + n]
        mu, sd = statistics.mean(group), statistics.stdev(group)  # stdev: n - 1, as verl / TRL torch.std
        out += [(s - mu) / (sd + eps) for s in group]
    return out


def _rloo_reference(scores: list[float], n: int) -> list[float]:
    out = []
    for g in range(0, len(scores), n):
        group = scores[g : g + n]
        out += [s - statistics.mean(group[:i] + group[i + 1 :]) for i, s in enumerate(group)]
    return out


@pytest.mark.parametrize("estimator,reference", [("grpo", _grpo_reference), ("rloo", _rloo_reference)])
def test_group_advantages_keep_the_sign_of_score_minus_group_mean(estimator, reference):
    mask = _right_padded_mask(GROUP_LENGTHS, 20)
    adv, _, _ = compute_advantages(estimator, scores=torch.tensor(GROUP_SCORES), action_mask=mask, group_size=3)
    for i, score in enumerate(GROUP_SCORES):
        group = GROUP_SCORES[3 * (i // 3) : 3 * (i // 3) + 3]
        want = _sign(score - statistics.mean(group))
        got = {_sign(float(a)) for a in adv[i][mask[i].bool()]}
        assert got == {want}, f"sample {i}: advantage signs {got}, score - group mean has sign {want}"
    # the values are the peers' group advantages on every action token, 0 elsewhere
    want = torch.tensor(reference(GROUP_SCORES, 3), dtype=torch.float32)[:, None] * mask
    torch.testing.assert_close(adv, want, rtol=1e-5, atol=1e-5)


def test_group_advantages_fold_the_kl_penalty_into_the_sequence_score():
    lengths, coef = [2, 3, 1, 4], 0.5
    mask = _right_padded_mask(lengths, 4)
    kl = torch.tensor([[0.1, 0.2, 9.0, 9.0], [0.3, 0.0, 0.1, 9.0], [0.5, 9.0, 9.0, 9.0], [0.1, 0.1, 0.1, 0.1]])
    scores = [1.0, 0.0, 2.0, 0.5]
    adv, _, _ = compute_advantages("rloo", scores=torch.tensor(scores), action_mask=mask, kl=kl * mask,
                                   kl_coef=coef, group_size=2)
    seq = [s - coef * sum(float(k) for k in kl[i, :n]) for i, (s, n) in enumerate(zip(scores, lengths))]
    torch.testing.assert_close(adv[:, 0], torch.tensor(_rloo_reference(seq, 2)), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- k3 KL clamped as verl / OpenRLHF


def test_k3_is_bounded_for_extreme_log_ratios_and_exact_in_the_normal_range():
    log_ratio = [-40.0, -20.0, -2.0, -0.5, 0.0, 0.3, 1.7, 50.0]
    lp = torch.tensor(log_ratio, requires_grad=True)
    k3 = kl_estimate(lp, torch.zeros(len(log_ratio)), "k3")
    assert torch.isfinite(k3).all() and (k3 >= 0).all() and (k3 <= 10.0).all()
    for r, got in zip(log_ratio, k3.tolist()):
        exact = math.exp(-r) - 1.0 + r  # Schulman's k3 with r = log pi - log pi_ref
        if exact <= 10.0:
            assert got == pytest.approx(exact, rel=1e-5, abs=1e-6)
        else:
            assert got == pytest.approx(10.0)  # verl low_var_kl / OpenRLHF clamp the estimate to [-10, 10]
    k3.sum().backward()
    assert torch.isfinite(lp.grad).all()


# ---------------------------------------------------------------- PPO clip fraction and truncated IS weights


def _ppo_reference(ratios, advs, mask, eps, weights=None):
    """Per-token (loss, clipped-term-active) from the PPO paper: objective min(r A, clip(r) A)."""
    losses, active = [], []
    for i, (r, a, m) in enumerate(zip(ratios, advs, mask)):
        unclipped, clipped = r * a, min(max(r, 1 - eps), 1 + eps) * a
        w = 1.0 if weights is None else weights[i]
        if m:
            losses.append(-min(unclipped, clipped) * w)
            active.append(clipped < unclipped)
    return sum(losses) / len(losses), sum(active) / len(active)


def test_clip_frac_counts_tokens_where_the_clipped_term_is_active_for_both_advantage_signs():
    # (ratio, advantage): clipped active for (1.5, +) and (0.5, -); out of range but unclipped active for
    # (0.5, +) and (1.5, -); in range twice; a masked-out clipped token last
    ratios = [1.5, 0.5, 1.5, 0.5, 1.1, 0.9, 1.5]
    advs = [1.0, 1.0, -1.0, -1.0, 2.0, -2.0, 1.0]
    mask = [1, 1, 1, 1, 1, 1, 0]
    loss, stats = policy_loss(torch.log(torch.tensor([ratios])), torch.zeros(1, 7), torch.tensor([advs]),
                              torch.tensor([mask], dtype=torch.float32), clip_eps=0.2)
    want_loss, want_frac = _ppo_reference(ratios, advs, mask, 0.2)
    assert want_frac == pytest.approx(2 / 6)
    assert stats["clip_frac"].item() == pytest.approx(want_frac)
    assert loss.item() == pytest.approx(want_loss, rel=1e-6)


def test_truncated_is_weights_scale_each_token_of_the_clipped_loss():
    torch.manual_seed(0)
    ratios = (torch.rand(12) * 1.2 + 0.4).tolist()
    advs = torch.randn(12).tolist()
    weights = (torch.rand(12) * 2.0).clamp(max=1.5).tolist()  # truncated at 1.5
    mask = [1] * 9 + [0] * 3
    lp = torch.log(torch.tensor([ratios])).requires_grad_()
    w = torch.tensor([weights], requires_grad=True)
    loss, _ = policy_loss(lp, torch.zeros(1, 12), torch.tensor([advs]), torch.tensor([mask], dtype=torch.float32),
                          clip_eps=0.2, is_weights=w)
    want, _ = _ppo_reference(ratios, advs, mask, 0.2, weights)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    loss.backward()
    assert w.grad is None  # the weights are a constant factor, no gradient flows into them


# ---------------------------------------------------------------- entropy and the LM (SFT / ptx) loss


def test_entropy_is_sum_of_minus_p_log_p():
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 7) * 3
    got = entropy_from_logits(logits)
    for b in range(2):
        for t in range(3):
            z = [math.exp(x) for x in logits[b, t].double().tolist()]
            p = [v / sum(z) for v in z]
            assert got[b, t].item() == pytest.approx(-sum(q * math.log(q) for q in p), rel=1e-5)
    assert entropy_from_logits(torch.zeros(1, 1, 50)).item() == pytest.approx(math.log(50), rel=1e-6)


def _nll_reference(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Summed -log softmax(logits[t])[labels[t + 1]] over labelled targets, and their count."""
    total, count = 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            y = int(labels[b, t + 1])
            if y == -100:
                continue
            row = logits[b, t].double().tolist()
            top = max(row)
            total += -(row[y] - top - math.log(sum(math.exp(x - top) for x in row)))
            count += 1
    return total, count


def test_lm_loss_is_mean_next_token_nll_over_labelled_tokens():
    torch.manual_seed(2)
    logits, labels = torch.randn(3, 6, 11), torch.randint(0, 11, (3, 6))
    labels[0, :3] = -100
    labels[2, 4:] = -100
    total, count = _nll_reference(logits, labels)
    assert lm_token_count(labels) == count
    assert lm_loss(logits, labels).item() == pytest.approx(total / count, rel=1e-5)
    # a ptx row with no labelled token adds nothing, instead of nan
    assert lm_loss(logits, torch.full_like(labels, -100)).item() == 0.0


# ---------------------------------------------------------------- DPO family


def _logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


PC, PR, RC, RR = [-12.0, -30.5, -7.25, -20.0], [-15.0, -28.0, -9.0, -26.5], [-13.0, -29.0, -8.0, -21.0], \
    [-14.5, -29.5, -8.5, -24.0]
LC, LR = [4.0, 10.0, 3.0, 7.0], [5.0, 9.0, 2.0, 11.0]


def _t(x):
    return torch.tensor(x, dtype=torch.float64)


def test_dpo_conservative_label_smoothing_matches_mitchell_trl_formula():
    beta, eps = 0.3, 0.2
    loss, cr, rr = dpo_loss(_t(PC), _t(PR), _t(RC), _t(RR), beta=beta, label_smoothing=eps)
    want = []
    for pc, pr, rc, rrf in zip(PC, PR, RC, RR):
        logits = (pc - rc) - (pr - rrf)
        want.append(-(1 - eps) * _logsigmoid(beta * logits) - eps * _logsigmoid(-beta * logits))
    assert loss.item() == pytest.approx(sum(want) / len(want), rel=1e-9)
    assert cr.tolist() == pytest.approx([beta * (pc - rc) for pc, rc in zip(PC, RC)])
    assert rr.tolist() == pytest.approx([beta * (pr - rrf) for pr, rrf in zip(PR, RR)])


def test_ipo_with_length_normalised_logprobs_matches_azar_trl():
    beta = 0.1
    loss, cr, rr = dpo_loss(_t(PC), _t(PR), _t(RC), _t(RR), beta=beta, loss_type="ipo",
                            chosen_lengths=_t(LC), rejected_lengths=_t(LR))
    # TRL's ipo: logps averaged over the response, h = (avg pi_c - avg ref_c) - (avg pi_r - avg ref_r),
    # loss (h - 1 / (2 beta))^2 (Azar et al., eq. 17); rewards beta x the averaged log-ratios
    h = [(pc - rc) / lc - (pr - rrf) / lr for pc, pr, rc, rrf, lc, lr in zip(PC, PR, RC, RR, LC, LR)]
    assert loss.item() == pytest.approx(sum((x - 1 / (2 * beta)) ** 2 for x in h) / len(h), rel=1e-9)
    assert cr.tolist() == pytest.approx([beta * (pc - rc) / lc for pc, rc, lc in zip(PC, RC, LC)])
    assert rr.tolist() == pytest.approx([beta * (pr - rrf) / lr for pr, rrf, lr in zip(PR, RR, LR)])


def test_simpo_with_gamma_matches_meng_et_al():
    beta, gamma = 2.0, 0.8
    loss, cr, rr = dpo_loss(_t(PC), _t(PR), None, None, beta=beta, loss_type="simpo", gamma=gamma,
                            chosen_lengths=_t(LC), rejected_lengths=_t(LR))
    # Meng et al. eq. 6: -log sigmoid(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma)
    want = [-_logsigmoid(beta * pc / lc - beta * pr / lr - gamma) for pc, pr, lc, lr in zip(PC, PR, LC, LR)]
    assert loss.item() == pytest.approx(sum(want) / len(want), rel=1e-9)
    assert cr.tolist() == pytest.approx([beta * pc / lc for pc, lc in zip(PC, LC)])


# ---------------------------------------------------------------- token-sum normalisation for micro-batches


def test_micro_batch_token_sums_equal_the_big_batch_token_mean():
    torch.manual_seed(3)
    B, T = 5, 6
    mask = _right_padded_mask([6, 1, 2, 5, 3], T)
    old, adv, w = torch.randn(B, T), torch.randn(B, T), torch.rand(B, T) + 0.5
    lp = (old + 0.3 * torch.randn(B, T)).requires_grad_()
    values, old_v, returns = torch.randn(B, T, requires_grad=True), torch.randn(B, T), torch.randn(B, T)
    logits, labels = torch.randn(B, T, 9, requires_grad=True), torch.randint(0, 9, (B, T))
    labels[1, :5] = -100
    labels[3, :2] = -100

    def losses(rows, normalizers):
        n_pg, n_lm = normalizers
        pg, _ = policy_loss(lp[rows], old[rows], adv[rows], mask[rows], 0.2, w[rows], token_normalizer=n_pg)
        v = value_loss(values[rows], old_v[rows], returns[rows], mask[rows], 0.2, token_normalizer=n_pg)
        return pg, v, lm_loss(logits[rows], labels[rows], token_normalizer=n_lm)

    everything = slice(0, B)
    big = losses(everything, (None, None))
    parts = [slice(0, 2), slice(2, 5)]  # 7 and 10 action tokens: unequal micro-batches
    n_tokens, n_lm = float(mask.sum()), float(lm_token_count(labels))
    summed = [sum(x) for x in zip(*(losses(p, (n_tokens, n_lm)) for p in parts))]
    mean_of_means = [sum(x) / 2 for x in zip(*(losses(p, (None, None)) for p in parts))]
    for b, s, m in zip(big, summed, mean_of_means):
        assert s.item() == pytest.approx(b.item(), rel=1e-6)
        assert m.item() != pytest.approx(b.item(), rel=1e-3)  # why the normaliser is needed
    # same gradients as one big batch
    grads = []
    for total in (sum(big), sum(summed)):
        lp.grad = values.grad = logits.grad = None
        total.backward()
        grads.append([t.grad.clone() for t in (lp, values, logits)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="token_normalizer"):
        masked_token_mean(adv, mask, 0.0)
