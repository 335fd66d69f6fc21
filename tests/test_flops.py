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
