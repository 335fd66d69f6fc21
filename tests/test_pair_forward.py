"""The shared-prompt pair forward (relay.learners.pair_forward) against the stacked forward, on the tiny Llama
and Qwen2: same summed logprobs, counts and gradients."""
from __future__ import annotations

import pytest
import torch

from relay.algos.losses import IGNORE_INDEX
from relay.learners.dpo import pair_logprobs
from relay.learners.pair_forward import shared_prompt_lengths


def pair_batch(prompt_lens=(5, 9, 3), chosen_lens=(4, 2, 7), rejected_lens=(6, 3, 1), seed=0) -> dict:
    """Right-padded pairs sharing their prompts; the first label of each reply row is its first reply token."""
    g = torch.Generator().manual_seed(seed)
    rows = {"chosen": [], "rejected": []}
    for p, c, r in zip(prompt_lens, chosen_lens, rejected_lens):
        prompt = torch.randint(3, 1000, (p,), generator=g)
        for side, n in (("chosen", c), ("rejected", r)):
            rows[side].append((prompt, torch.randint(3, 1000, (n,), generator=g)))
    width = max(len(p) + len(x) for side in rows.values() for p, x in side) + 2  # trailing padding too
    batch = {}
    for side, items in rows.items():
        ids = torch.zeros(len(items), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, IGNORE_INDEX)
        for i, (prompt, reply) in enumerate(items):
            seq = torch.cat([prompt, reply])
            ids[i, : len(seq)], mask[i, : len(seq)] = seq, 1
            labels[i, len(prompt) : len(seq)] = reply
        batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": mask, f"{side}_labels": labels})
    return batch


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request, tiny_llama_dir, tiny_qwen2_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    path = tiny_llama_dir if request.param == "llama" else tiny_qwen2_dir
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    m.train()
    return m


def _logps_and_grads(model, batch, shared: bool):
    model.zero_grad()
    logps, counts = pair_logprobs(model, batch, shared_prompt=shared)
    (logps * torch.linspace(0.5, 1.5, len(logps))).sum().backward()  # weights: a wrong row order shows
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logps.detach(), counts, grads


def test_shared_prompt_forward_matches_the_stacked_pairs(model):
    batch = pair_batch()
    assert shared_prompt_lengths(batch).tolist() == [5, 9, 3]
    ref_lp, ref_n, ref_g = _logps_and_grads(model, batch, shared=False)
    got_lp, got_n, got_g = _logps_and_grads(model, batch, shared=True)
    assert torch.equal(got_n, ref_n) and got_n.tolist() == [4, 2, 7, 6, 3, 1]
    assert torch.allclose(got_lp, ref_lp, rtol=1e-5, atol=1e-4), (got_lp, ref_lp)
    assert got_g.keys() == ref_g.keys()
    worst = max(float((got_g[k] - ref_g[k]).norm() / ref_g[k].norm().clamp(min=1e-12)) for k in ref_g)
    assert worst < 1e-4, worst


def test_pairs_without_a_shared_prompt_are_detected():
    batch = pair_batch()
    assert shared_prompt_lengths(batch) is not None
    other = {k: v.clone() for k, v in batch.items()}
    other["rejected_input_ids"][1, 2] += 1  # a prompt token differs
    assert shared_prompt_lengths(other) is None
    moved = {k: v.clone() for k, v in batch.items()}
    moved["rejected_labels"][0, 5] = IGNORE_INDEX  # the rejected reply starts later than the chosen one
    assert shared_prompt_lengths(moved) is None
