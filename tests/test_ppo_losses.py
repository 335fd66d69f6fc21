"""PPO pieces without Ray: loss alignment with the learner's logprobs, rollout tensor layout, running moments."""
from __future__ import annotations

import pytest
import torch

from relay.actors.pool import PromptResult
from relay.actors.sampling import GenerationResult
from relay.launch.ppo_rollout import RunningMoments, build_rollout
from relay.learners.lossfn import causal_logits, token_logprobs
from relay.learners.ppo import ppo_actor_loss, ppo_critic_loss, response_logprobs, response_values


def _sample(prompt, tokens, version=3, idx=0):
    return GenerationResult(prompt_index=0, sample_index=idx, prompt_token_ids=prompt, token_ids=tokens,
                            logprobs=[-0.5] * len(tokens), finish_reason="stop", weight_version=version)


def test_build_rollout_pads_prompt_left_and_response_right():
    results = [
        PromptResult("a", [_sample([5, 6, 7], [8, 9], idx=0), _sample([5, 6, 7], [10], idx=1)], 3, "g0", 1),
        PromptResult("b", [_sample([11], [12, 13, 14], idx=0), _sample([11], [15, 16], idx=1)], 3, "g1", 1),
    ]
    r = build_rollout(results, pad_id=0)
    assert r.sequences.tolist()[0] == [5, 6, 7, 8, 9, 0]
    assert r.sequences.tolist()[2] == [0, 0, 11, 12, 13, 14]
    assert r.attention_mask.tolist()[1] == [1, 1, 1, 1, 0, 0]
    assert r.action_mask.tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]]
    assert r.sample_ids == ["a/0", "a/1", "b/0", "b/1"]  # groups stay contiguous (grpo/rloo rely on it)
    assert r.gen_logprobs[1].tolist() == [-0.5, 0.0, 0.0] and r.num_tokens == 8
    assert r.weight_version.tolist() == [3, 3, 3, 3]


def test_actor_loss_ratio_is_one_with_own_logprobs_and_matches_forward(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    ids = torch.randint(3, 1000, (4, 12))
    attn = torch.ones_like(ids)
    attn[0, :3] = 0  # left padding
    A = 5
    batch = {"input_ids": ids, "attention_mask": attn}
    with torch.no_grad():
        full = token_logprobs(causal_logits(model, batch), ids)
        own = response_logprobs(causal_logits(model, batch), ids, A)
    torch.testing.assert_close(own, full[:, -A:])
    mask = torch.ones(4, A)
    mask[1, 3:] = 0
    batch.update(action_mask=mask, old_logprobs=own, advantages=torch.randn(4, A), ref_logprobs=own)
    loss, m = ppo_actor_loss(model, batch, clip_eps=0.2, kl_coef=0.1)
    assert m["approx_kl"] < 1e-9 and abs(m["ratio"] - 1) < 1e-6 and m["clip_frac"] == 0.0
    assert abs(m["kl_loss"]) < 1e-9 and m["entropy"] > 0
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    # truncated IS weights scale the surrogate token by token
    batch["is_weights"] = torch.full((4, A), 0.5)
    half, _ = ppo_actor_loss(model, batch, clip_eps=0.2)
    plain, _ = ppo_actor_loss(model, {k: v for k, v in batch.items() if k != "is_weights"}, clip_eps=0.2)
    torch.testing.assert_close(half, 0.5 * plain)


def test_critic_loss_uses_prefix_values():
    class Values(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, position_ids=None):
            return input_ids.float()  # value of position t = its token id

    ids = torch.tensor([[1, 2, 3, 4, 5]])
    assert response_values(ids.float(), 2).tolist() == [[3.0, 4.0]]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "action_mask": torch.ones(1, 2),
             "old_values": torch.tensor([[3.0, 4.0]]), "returns": torch.tensor([[3.0, 4.0]])}
    loss, m = ppo_critic_loss(Values(), batch, value_clip=0.2)
    assert float(loss) == 0.0 and m["value_mean"] == pytest.approx(3.5)


def test_running_moments_match_batch_statistics():
    rm = RunningMoments()
    data = torch.randn(1000) * 3 + 2
    for chunk in data.split(100):
        rm.update(chunk)
    assert rm.mean == pytest.approx(float(data.mean()), abs=1e-3)
    assert rm.var == pytest.approx(float(data.var(unbiased=False)), rel=1e-3)


def test_split_micro_batches_cuts_each_tensor_by_its_own_rows():
    from relay.learners.lossfn import split_micro_batches

    batch = {"input_ids": torch.arange(10).view(5, 2), "ptx_input_ids": torch.arange(6).view(3, 2), "note": "x"}
    parts = split_micro_batches(batch, 2)
    assert [p["input_ids"].shape[0] for p in parts] == [2, 3]
    assert [p["ptx_input_ids"].shape[0] for p in parts] == [1, 2]
    assert torch.equal(torch.cat([p["input_ids"] for p in parts]), batch["input_ids"])
    assert torch.equal(torch.cat([p["ptx_input_ids"] for p in parts]), batch["ptx_input_ids"])
    assert all(p["note"] == "x" for p in parts)
    assert len(split_micro_batches(batch, 9)) == 5  # never more slices than main rows


def test_padding_columns_are_trimmed_without_changing_the_loss(tiny_llama_dir):
    """An episode padded wider than a micro-batch needs (2 extra left-pad and 3 extra right-pad columns):
    the trimmed loss and gradients equal the tight batch's."""
    from transformers import AutoModelForCausalLM

    from relay.learners.ppo import trim_padding_columns

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    B, P, A = 3, 6, 4
    ids = torch.randint(3, 1000, (B, P + A))
    attn = torch.ones_like(ids)
    attn[0, :2] = 0
    act = torch.ones(B, A)
    act[1, 2:] = 0
    attn[1, P + 2 :] = 0
    tight = {"input_ids": ids, "attention_mask": attn, "action_mask": act, "old_logprobs": torch.full((B, A), -2.0),
             "advantages": torch.randn(B, A)}
    wide = {"input_ids": torch.cat([torch.zeros(B, 2, dtype=ids.dtype), ids, torch.zeros(B, 3, dtype=ids.dtype)], 1),
            "attention_mask": torch.cat([torch.zeros(B, 2, dtype=attn.dtype), attn, torch.zeros(B, 3, dtype=attn.dtype)], 1)}
    for k in ("action_mask", "old_logprobs", "advantages"):
        wide[k] = torch.cat([tight[k], torch.zeros(B, 3)], 1)
    trimmed = trim_padding_columns(wide)
    assert trimmed["input_ids"].shape == (B, P + A) and trimmed["advantages"].shape == (B, A)
    assert torch.equal(trimmed["input_ids"], ids)
    grads = []
    for batch in (tight, wide):
        model.zero_grad()
        loss, m = ppo_actor_loss(model, batch, clip_eps=0.2)
        loss.backward()
        grads.append((float(loss.detach()), m["entropy"], [p.grad.clone() for p in model.parameters()]))
    assert grads[0][0] == pytest.approx(grads[1][0], abs=1e-6) and grads[0][1] == pytest.approx(grads[1][1], rel=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads[0][2], grads[1][2]))


def test_shared_prompt_forward_matches_the_plain_forward(tiny_llama_dir):
    """Two groups of 3 samples (left-padded prompts, right-padded responses) and a lone row: the actor loss
    with each prompt computed once equals the plain forward's, value and gradients."""
    from transformers import AutoModelForCausalLM

    from relay.learners.prefix_forward import prompt_groups

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32, attn_implementation="sdpa")
    B, P, A = 7, 6, 4
    prompts = torch.randint(3, 1000, (3, P))
    ids = torch.cat([prompts[[0, 0, 0, 1, 1, 1, 2]], torch.randint(3, 1000, (B, A))], 1)
    attn = torch.ones_like(ids)
    attn[3:6, :2] = 0  # group 1's prompt is shorter (left padding)
    act = torch.ones(B, A)
    act[1, 2:] = 0
    attn[1, P + 2 :] = 0
    batch = {"input_ids": ids, "attention_mask": attn, "action_mask": act, "old_logprobs": torch.full((B, A), -6.0),
             "advantages": torch.randn(B, A)}
    assert prompt_groups(ids, attn, A).tolist() == [0, 0, 0, 1, 1, 1, 2]
    runs = []
    for shared in (False, True):
        model.zero_grad()
        loss, m = ppo_actor_loss(model, batch, clip_eps=0.2, shared_prompt=shared)
        loss.backward()
        runs.append((float(loss.detach()), m, [p.grad.clone() for p in model.parameters()]))
    (plain, mp, gp), (shared, ms, gs) = runs
    assert shared == pytest.approx(plain, abs=1e-6) and ms["entropy"] == pytest.approx(mp["entropy"], rel=1e-5)
    assert ms["logprob_diff"] == pytest.approx(mp["logprob_diff"], rel=1e-5)
    assert max(float((a - b).norm() / b.norm().clamp(min=1e-12)) for a, b in zip(gs, gp)) < 1e-4


def test_shared_prefix_logprobs_match_token_logprobs(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from relay.learners.lossfn import last_token_logprobs
    from relay.learners.prefix_forward import shared_prefix_logprobs

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    ids = torch.cat([torch.randint(3, 1000, (2, 5)).repeat_interleave(2, 0), torch.randint(3, 1000, (4, 3))], 1)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        want = token_logprobs(causal_logits(model, batch), ids, temperature=0.7)[:, -3:]
        torch.testing.assert_close(last_token_logprobs(model, batch, 3, temperature=0.7), want)
        torch.testing.assert_close(shared_prefix_logprobs(model, batch, 3, temperature=0.7), want, rtol=1e-5, atol=1e-5)
        assert shared_prefix_logprobs(model, {k: v[::2] for k, v in batch.items()}, 3) is None  # nothing repeats
