"""Update FLOP counts (`relay.models.flops`) against hand computations. No torch work, no Ray."""
from __future__ import annotations

from relay.models.flops import ParamSplit, achieved_gflops, param_split, update_flops

SMOLLM2 = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
           "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152}


def test_param_split_smollm2_by_hand():
    # per layer: q, o 576*576 each; k, v 576*192 each; gate, up, down 576*1536 each
    per_layer = 2 * 331_776 + 2 * 110_592 + 3 * 884_736
    assert per_layer == 3_538_944
    split = param_split(SMOLLM2)
    assert split == ParamSplit(body=30 * 3_538_944, head=49152 * 576)
    # with the 28.3M tied embedding counted once this is the model's 134,515,008 parameters minus its norms
    assert split.body + split.head == 134_479_872


def test_param_split_without_gqa_or_head_dim():
    split = param_split({"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2,
                         "num_attention_heads": 2, "vocab_size": 10})
    assert split == ParamSplit(body=2 * (4 * 64 + 3 * 128), head=80)


def test_update_flops_by_hand():
    p = ParamSplit(body=1000, head=100)
    # 4 rows x (40 prompt + 64 response) trained, logits at 4 x 64; one forward-only recompute of the same
    trained = 6 * (1000 * 416 + 100 * 256)
    forward = 2 * (1000 * 416 + 100 * 256)
    assert update_flops(p, 416, 256) == trained == 2_649_600
    assert update_flops(p, 416, 256, 416, 256) == trained + forward == 3_532_800
    assert achieved_gflops(3e9, 1.5) == 2.0
    assert achieved_gflops(1.0, 0.0) == 0.0


def test_actor_token_counts_by_hand():
    import torch

    from relay.launch.ppo_update import update_token_metrics
    from relay.learners.ppo import actor_token_counts

    # two groups of two samples; prompt columns 0-2 (group 2 has one left pad), response columns 3-5
    ids = torch.tensor([[5, 6, 7, 8, 9, 0], [5, 6, 7, 4, 0, 0], [0, 11, 12, 13, 14, 15], [0, 11, 12, 16, 17, 0]])
    attn = (ids != 0).long()
    attn[0, 5] = attn[1, 4:] = attn[3, 5] = 0
    actions = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]])
    batch = {"input_ids": ids, "attention_mask": attn, "action_mask": actions}
    # responses 2 + 1 + 3 + 2 = 8; prompts 3 + 3 + 2 + 2 = 10, or 3 + 2 = 5 run once per group
    assert actor_token_counts(batch, shared_prompt=False) == {"tokens": 18, "logit_tokens": 8}
    assert actor_token_counts(batch, shared_prompt=True) == {"tokens": 13, "logit_tokens": 8}
    m = update_token_metrics(batch, shared=True, steps=2, recomputed=True)
    assert m == {"update_tokens": 26.0, "update_logit_tokens": 16.0, "update_forward_tokens": 13.0,
                 "update_forward_logit_tokens": 8.0}
    assert update_token_metrics(batch, shared=False, steps=1, recomputed=False)["update_forward_tokens"] == 0.0
