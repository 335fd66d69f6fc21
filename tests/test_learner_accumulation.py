"""Loss normalisation across micro-batches and data-parallel ranks, ptx rows, and the non-finite step guard, on
real learner groups (2 ranks, gloo, tiny Llama).

Every reference is written here from the loss's formula and computed in one pass over the whole global batch on
an unwrapped model: accumulated micro-batches of unequal sizes, split over 1 or 2 data-parallel ranks, must
give its gradient.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("colossalai")

from relay.learners.group import LearnerGroup  # noqa: E402
from group_util import group_fixtures  # noqa: E402  (tests/ is on sys.path under pytest)

pytestmark = [pytest.mark.ray, pytest.mark.slow]

RANKS = 2
BASE = dict(kind="causal_lm", plugin="ddp", tp=1, zero_stage=0, precision="fp32", lora_rank=0, lr=1e-3, max_norm=1.0)
DP = {"dp2": dict(plugin="ddp"), "dp1_tp2": dict(plugin="3d", tp=2)}  # data-parallel size 2, and 1 (tp=2)
RTOL = 1e-4


def positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def unwrapped(path, kind: str = "causal_lm"):
    if kind == "critic":
        from relay.models.heads import CriticModel

        return CriticModel.from_pretrained(path, dtype=torch.float32, seed=42).train()
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).train()


def grads_of(model, loss: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    loss.backward()
    return float(loss.detach()), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(got: dict, ref_loss: float, ref_grads: dict) -> None:
    assert abs(got["loss"] - ref_loss) <= RTOL * max(abs(ref_loss), 1e-6), (got["loss"], ref_loss)
    assert got["grads"].keys() == ref_grads.keys()
    # absolute floor: some gradients are 0 in exact arithmetic (the RM's value-head bias cancels in c - r)
    worst = max((float((got["grads"][k] - ref_grads[k]).norm() - RTOL * ref_grads[k].norm()), k) for k in ref_grads)
    assert worst[0] < 1e-7, worst


def np_batch(batch: dict) -> dict:
    return {k: v.numpy() for k, v in batch.items()}


# ------------------------------------------------------------------------------------------------ batches
def ppo_batch(seed: int = 7) -> dict[str, torch.Tensor]:
    """4 experiences (prompt 6 left-padded, response 5 right-padded) with 5, 1, 4, 2 action tokens, and 3 ptx
    rows with 9, 4, 6 label tokens (first two labels masked, right padding)."""
    g = torch.Generator().manual_seed(seed)
    B, P, A = 4, 6, 5
    ids = torch.randint(3, 1024, (B, P + A), generator=g)
    attn = torch.ones_like(ids)
    attn[1, :2] = 0
    attn[3, :4] = 0
    lengths = [5, 1, 4, 2]
    act = torch.zeros(B, A)
    for i, n in enumerate(lengths):
        act[i, :n] = 1
        attn[i, P + n :] = 0
    ids[attn == 0] = 0
    ptx_ids = torch.randint(3, 1024, (3, 12), generator=g)
    ptx_mask = torch.zeros_like(ptx_ids)
    for i, n in enumerate([12, 7, 9]):
        ptx_mask[i, :n] = 1
    ptx_ids[ptx_mask == 0] = 0
    ptx_labels = ptx_ids.clone()
    ptx_labels[ptx_mask == 0] = -100
    ptx_labels[:, :2] = -100
    return {
        "input_ids": ids, "attention_mask": attn, "action_mask": act,
        "old_logprobs": -7.0 + 0.3 * torch.randn(B, A, generator=g),
        "ref_logprobs": -7.0 + 0.3 * torch.randn(B, A, generator=g),
        "advantages": torch.randn(B, A, generator=g) * act,
        "ptx_input_ids": ptx_ids, "ptx_attention_mask": ptx_mask, "ptx_labels": ptx_labels,
    }


ACTOR_KW = dict(clip_eps=0.2, ptx_coef=0.5, entropy_coef=0.01, kl_coef=0.1, kl_estimator="k3")


def reference_actor_loss(model, b: dict, clip_eps, ptx_coef, entropy_coef, kl_coef, kl_estimator="k3",
                         temperature: float = 1.0) -> torch.Tensor:
    """PPO clip + entropy + k3 KL, token means over all action tokens; + ptx_coef x mean CE over all ptx tokens."""
    A = b["action_mask"].shape[1]
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                   position_ids=positions(b["attention_mask"])).logits.float()[:, -A - 1 : -1] / temperature
    logp_all = torch.log_softmax(logits, -1)
    lp = logp_all.gather(-1, b["input_ids"][:, -A:, None])[..., 0]
    m, n = b["action_mask"], b["action_mask"].sum()
    ratio = torch.exp(lp - b["old_logprobs"])
    adv = b["advantages"]
    pg = (-torch.min(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv) * m).sum() / n
    entropy = (-(logp_all.exp() * logp_all).sum(-1) * m).sum() / n
    r = b["ref_logprobs"] - lp
    k3 = ((torch.exp(r) - 1 - r) * m).sum() / n
    ptx_logits = model(input_ids=b["ptx_input_ids"], attention_mask=b["ptx_attention_mask"],
                       position_ids=positions(b["ptx_attention_mask"])).logits.float()
    ptx = F.cross_entropy(ptx_logits[:, :-1].reshape(-1, ptx_logits.shape[-1]), b["ptx_labels"][:, 1:].reshape(-1),
                          ignore_index=-100)
    return pg - entropy_coef * entropy + kl_coef * k3 + ptx_coef * ptx


def sft_batch(seed: int = 3) -> dict[str, torch.Tensor]:
    """6 rows with 13, 2, 7, 11, 3, 9 label tokens: per rank (3 rows) and per micro-batch (1 + 2 rows) the
    counts differ, so a mean of means is not the token mean."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 1024, (6, 16), generator=g)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (start, end) in enumerate([(2, 16), (4, 7), (5, 13), (1, 13), (8, 12), (6, 16)]):
        mask[i, :end] = 1
        labels[i, start:end] = ids[i, start:end]
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def reference_sft_loss(model, b: dict) -> torch.Tensor:
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), b["labels"][:, 1:].reshape(-1),
                           ignore_index=-100)


def pair_batch(seed: int = 5) -> dict[str, torch.Tensor]:
    """6 preference pairs of unequal lengths (labels on the reply tokens), with precomputed reference logps."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for side, lens in (("chosen", [14, 9, 12, 6, 16, 10]), ("rejected", [11, 16, 7, 12, 8, 15])):
        ids = torch.randint(3, 1024, (6, 16), generator=g)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for i, n in enumerate(lens):
            mask[i, :n] = 1
            labels[i, 4:n] = ids[i, 4:n]
        ids[mask == 0] = 0
        out.update({f"{side}_input_ids": ids, f"{side}_attention_mask": mask, f"{side}_labels": labels})
    out["ref_chosen_logps"] = -60.0 + 5 * torch.randn(6, generator=g)
    out["ref_rejected_logps"] = -60.0 + 5 * torch.randn(6, generator=g)
    return out


def summed_label_logps(model, ids, mask, labels) -> torch.Tensor:
    logits = model(input_ids=ids, attention_mask=mask).logits.float()[:, :-1]
    tgt = labels[:, 1:]
    lp = torch.log_softmax(logits, -1).gather(-1, tgt.clamp(min=0)[..., None])[..., 0]
    return (lp * (tgt != -100)).sum(-1)


def reference_dpo_loss(model, b: dict, beta: float) -> torch.Tensor:
    pc = summed_label_logps(model, b["chosen_input_ids"], b["chosen_attention_mask"], b["chosen_labels"])
    pr = summed_label_logps(model, b["rejected_input_ids"], b["rejected_attention_mask"], b["rejected_labels"])
    margin = (pc - b["ref_chosen_logps"]) - (pr - b["ref_rejected_logps"])
    return -F.logsigmoid(beta * margin).mean()


def reference_rm_loss(model, b: dict) -> torch.Tensor:
    def last_value(side):
        mask = b[f"{side}_attention_mask"]
        values = model(input_ids=b[f"{side}_input_ids"], attention_mask=mask, position_ids=positions(mask)).float()
        return values[torch.arange(values.shape[0]), mask.sum(-1) - 1]

    return -F.logsigmoid(last_value("chosen") - last_value("rejected")).mean()


def critic_batch(seed: int = 11) -> dict[str, torch.Tensor]:
    b = ppo_batch(seed)
    g = torch.Generator().manual_seed(seed + 1)
    act = b["action_mask"]
    b = {k: b[k] for k in ("input_ids", "attention_mask", "action_mask")}
    b["old_values"] = 0.1 * torch.randn(act.shape, generator=g) * act
    b["returns"] = torch.randn(act.shape, generator=g) * act
    return b


def reference_critic_loss(model, b: dict, clip: float) -> torch.Tensor:
    A = b["action_mask"].shape[1]
    v = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
              position_ids=positions(b["attention_mask"])).float()[:, -A - 1 : -1]
    clipped = b["old_values"] + (v - b["old_values"]).clamp(-clip, clip)
    per = 0.5 * torch.max((v - b["returns"]) ** 2, (clipped - b["returns"]) ** 2)
    return (per * b["action_mask"]).sum() / b["action_mask"].sum()


# ------------------------------------------------------------------------------------------------ group
_holder, group = group_fixtures("acc-learner", RANKS, BASE)


def configure(group: LearnerGroup, path, **changes) -> dict:
    return group.rebuild(model_path=str(path), **{**BASE, **changes})


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("dp", list(DP))
def test_ptx_and_actor_loss_gradient_is_independent_of_dp_and_accumulation(group, tiny_llama_dir, dp):
    """The actor loss (clip + entropy + k3 KL over action tokens, + ptx_coef x the mean LM loss over all ptx
    tokens) gives the big batch's gradient with dp 1 or 2 and 1 or 2 micro-batches, although the ptx rows (3)
    number differently from the experiences (4) and split unevenly over ranks and micro-batches."""
    from relay.learners.ppo import ppo_actor_loss

    batch = ppo_batch()
    model = unwrapped(tiny_llama_dir)
    ref_loss, ref_grads = grads_of(model, reference_actor_loss(model, batch, **ACTOR_KW))
    configure(group, tiny_llama_dir, **DP[dp])
    runs = [group.gradients(np_batch(batch), ppo_actor_loss, micro_batches=micro, **ACTOR_KW) for micro in (1, 2)]
    for got in runs:
        assert_same_grads(got, ref_loss, ref_grads)
    assert all(got["ptx_loss"] > 0 and got["kl_loss"] > 0 for got in runs)


@pytest.mark.parametrize("loss_name", ["sft", "causal_lm", "dpo"])
def test_unequal_micro_batches_give_the_big_batch_gradient(group, tiny_llama_dir, loss_name):
    """SFT / causal LM (token means over label tokens) and DPO (mean over pairs): 6 rows on 2 ranks in 2
    micro-batches each (1 + 2 rows, unequal token counts) reproduce one big batch's loss and gradient."""
    from relay.learners.dpo import dpo_train_loss
    from relay.learners.sft import sft_loss

    model = unwrapped(tiny_llama_dir)
    if loss_name == "dpo":
        batch, fn, kw = pair_batch(), dpo_train_loss, dict(beta=0.5)
        ref = reference_dpo_loss(model, batch, beta=0.5)
    else:
        batch, fn, kw = sft_batch(), (sft_loss if loss_name == "sft" else "causal_lm"), {}
        ref = reference_sft_loss(model, batch)
    ref_loss, ref_grads = grads_of(model, ref)
    configure(group, tiny_llama_dir)
    got = group.gradients(np_batch(batch), fn, micro_batches=2, **kw)
    assert_same_grads(got, ref_loss, ref_grads)


@pytest.mark.parametrize("loss_name", ["ppo_critic", "rm"])
def test_unequal_micro_batches_critic_and_reward_model(group, tiny_llama_dir, loss_name):
    """The critic's clipped value loss (token mean over action tokens: 5+1 | 4+2 per rank, micro-batches of 1
    and 1 rows) and the reward-model loss (mean over 6 pairs, micro-batches of 1 and 2 pairs)."""
    from relay.learners.ppo import ppo_critic_loss
    from relay.learners.rm import rm_loss

    model = unwrapped(tiny_llama_dir, "critic")
    if loss_name == "rm":
        batch, fn, kw = pair_batch(), rm_loss, {}
        ref = reference_rm_loss(model, batch)
    else:
        batch, fn, kw = critic_batch(), ppo_critic_loss, dict(value_clip=0.05)
        ref = reference_critic_loss(model, batch, 0.05)
    ref_loss, ref_grads = grads_of(model, ref)
    configure(group, tiny_llama_dir, kind="critic")
    got = group.gradients(np_batch(batch), fn, micro_batches=2, **kw)
    assert_same_grads(got, ref_loss, ref_grads)


@pytest.mark.parametrize("plugin, poison", [("ddp", "loss"), ("zero2", "gradient")])
def test_nonfinite_step_is_skipped_and_reported(group, tiny_llama_dir, plugin, poison):
    """A NaN loss (ddp), or a finite loss with a NaN gradient (zero2: gradients in ZeRO's stores), skips the
    optimizer step: weights unchanged, nonfinite_skipped reported; the next finite step trains as usual."""
    configure(group, tiny_llama_dir, plugin=plugin)
    batch = np_batch(sft_batch())

    def poisoned(model, batch, poison: str = "loss"):
        """Cross entropy, made NaN (or given a NaN gradient through an untaken sqrt branch). Local, so
        cloudpickle ships it by value."""
        import torch

        from relay.learners.lossfn import causal_lm_loss

        loss, _ = causal_lm_loss(model, batch)
        if poison == "loss":
            return loss * float("nan")
        t = loss * 0.0 - 1.0  # -1, attached to the graph
        return loss + torch.where(t > 0, torch.sqrt(t), torch.zeros_like(t))

    before = group.full_state_dict()
    out = group.train_step(batch, poisoned, poison=poison)
    assert out["nonfinite_skipped"] == 1.0
    assert math.isfinite(out["loss"]) == (poison == "gradient")
    after = group.full_state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    ok = group.train_step(batch, "causal_lm")
    assert ok["nonfinite_skipped"] == 0.0 and math.isfinite(ok["loss"])
    moved = group.full_state_dict()
    assert any(not torch.equal(moved[k], before[k]) for k in before)
    assert all(torch.isfinite(v).all() for v in moved.values())


def long_rows(rows: int, length: int = 256) -> dict:
    g = torch.Generator().manual_seed(rows)
    ids = torch.randint(3, 1024, (rows, length), generator=g)
    return {"input_ids": ids.numpy(), "attention_mask": torch.ones_like(ids).numpy(), "labels": ids.numpy()}


def test_learner_memory_follows_the_micro_batch_not_the_batch(group, tiny_llama_dir):
    """A step's peak resident memory above the rank's resting size grows with the rows per micro-batch, not with
    the rows per step: accumulation keeps one micro-batch's activations alive at a time."""
    configure(group, tiny_llama_dir)
    group.train_step(long_rows(8), "causal_lm")  # optimizer state and allocator pools exist from here on

    def step_growth(rows: int, micro_batches: int) -> float:
        rest = group.memory_mib(reset=True, trim=True)
        group.train_step(long_rows(rows), "causal_lm", micro_batches=micro_batches)
        return max(m["peak"] - r["rss"] for m, r in zip(group.memory_mib(), rest))

    small = step_growth(16, 2)  # 4 rows per micro-batch and rank
    long_episode = step_growth(64, 8)  # 4x the rows, still 4 per micro-batch
    big_micro = step_growth(64, 2)  # 4x the rows per micro-batch
    print(f"peak growth MiB: 16 rows/4 per micro-batch {small:.1f}, 64/4 {long_episode:.1f}, 64/16 {big_micro:.1f}")
    assert big_micro > 2.5 * small
    assert long_episode < 1.5 * small + 8


def scoring_batch(seed: int = 3) -> tuple[dict[str, torch.Tensor], int]:
    """5 sampled rows laid out as a GRPO rollout (prompt 7 left-padded, response 6 right-padded): rows 0-1 share
    a 5-token prompt, rows 2-4 a 3-token one, responses of 6, 2, 4, 1, 3 tokens. Returns (batch, A)."""
    g = torch.Generator().manual_seed(seed)
    P, A = 7, 6
    ids = torch.randint(3, 1024, (5, P + A), generator=g)
    ids[1, :P] = ids[0, :P]
    ids[3:5, :P] = ids[2, :P]
    attn = torch.ones_like(ids)
    attn[0:2, :2] = 0
    attn[2:5, :4] = 0
    for i, n in enumerate([6, 2, 4, 1, 3]):
        attn[i, P + n :] = 0
    ids[attn == 0] = 0
    return {"input_ids": ids, "attention_mask": attn}, A


def test_micro_batched_forwards_equal_one_forward(group, tiny_llama_dir):
    """The actor's logprobs (last A columns, as old logprobs; and all columns) and the critic's values in
    micro-batches of 1 and 2 rows per rank equal one forward over each rank's rows at every real entry, within
    fp32 rounding (measured 5e-7 on logprobs near -7, 3e-8 on values; bounds 1e-5 and 1e-6); entries without a
    real number read 0. 5 rows on 2 dp ranks split 2 | 3: micro-batches of 2 run 1 + 1 | 1 + 2 rows, of 1 run
    a one-token keep-step forward + 1 + 1 | 1 + 1 + 1 (ranks keep in step); the GRPO groups are cut across
    micro-batches, so the shared-prompt forward meets single rows and partial groups."""
    from relay.learners.forwards import forward_count

    # forwards per rank: the busiest rank's rows (3 of 5 on 2 ranks) over the micro-batch size
    assert [forward_count(5, 2, size) for size in (0, 1, 2, 3)] == [1, 3, 2, 1]
    with pytest.raises(ValueError, match="micro_batch_size must be >= 0"):
        forward_count(5, 2, -1)
    batch, A = scoring_batch()
    mask = batch["attention_mask"].bool()
    real_lp = mask[:, 1:] & mask[:, :-1]  # a token's logprob is real when it and the token before it are
    inputs = np_batch(batch)
    configure(group, tiny_llama_dir)
    with pytest.raises(ValueError, match="micro_batch_size must be an int >= 0"):
        group.forward_logprobs(inputs, last=A, micro_batch_size=-1)
    cases = [(A, real_lp[:, -A:]), (None, real_lp)]
    for last, real in cases:
        one = group.forward_logprobs(inputs, last=last)
        for size in (1, 2):
            got = group.forward_logprobs(inputs, last=last, micro_batch_size=size)
            assert got.shape == one.shape
            torch.testing.assert_close(got[real], one[real], rtol=0, atol=1e-5)
            assert not got[~real].any()
    configure(group, tiny_llama_dir, kind="critic")
    one = group.forward_values(inputs)
    for size in (1, 2):
        got = group.forward_values(inputs, micro_batch_size=size)
        assert got.shape == one.shape == mask.shape
        torch.testing.assert_close(got[mask], one[mask], rtol=0, atol=1e-6)
        assert not got[~mask].any()
    assert float(one[mask].abs().max()) > 1e-3  # the values are not all ~0, so the bound above means something


def test_forward_memory_follows_the_micro_batch(group, tiny_llama_dir):
    """A no-grad forward's peak resident memory above the rank's resting size follows its micro-batch: 64 rows
    of 256 tokens per rank in micro-batches of 2 need a fraction of what one forward over all 64 needs (logits
    and attention scale with the rows). Freed heap pages go back to the kernel before each measure: left
    resident, an earlier test's pages served the whole forward with no growth at all. The sizes leave room for
    the allocator's noise: 32 rows against 4 measured 19 against 59 MiB on one machine and 17 against 72 on
    another, too close to a 3x bound."""
    configure(group, tiny_llama_dir)
    inputs = {k: v for k, v in long_rows(128).items() if k != "labels"}

    def growth(size: int) -> float:
        rest = group.memory_mib(reset=True, trim=True)
        group.forward_logprobs(inputs, micro_batch_size=size)
        return max(m["peak"] - r["rss"] for m, r in zip(group.memory_mib(), rest))

    group.forward_logprobs(inputs, micro_batch_size=2)  # one-time costs (buffers, thread pools) paid here
    micro, whole = growth(2), growth(0)
    print(f"forward peak growth MiB: micro-batches of 2 {micro:.1f}, one forward of 64 {whole:.1f}")
    assert whole > 3 * micro + 8
