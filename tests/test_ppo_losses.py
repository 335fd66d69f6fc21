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
