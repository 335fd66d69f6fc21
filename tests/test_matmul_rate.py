"""benchmarks.matmul_rate: the timed shapes are the layer's training matmuls, and bf16 is skipped with a reason
where the CPU lacks native bf16 (forced here with RELAY_CPU_CAPABILITY=avx2). No Ray."""
from __future__ import annotations

from benchmarks.matmul_rate import layer_matmuls, matmul_rate, rate_line
from relay.models.flops import param_split

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 100}


def test_layer_matmuls_are_six_flops_per_weight_per_token():
    tokens = 32
    shapes = layer_matmuls(TINY, tokens)
    assert len(shapes) == 12
    flops = sum(count * 2 * m * k * n for _, m, k, n, count in shapes)
    assert flops == 6 * param_split(TINY).body * tokens


def test_avx2_skips_bf16_with_a_reason(monkeypatch):
    monkeypatch.setenv("RELAY_CPU_CAPABILITY", "avx2")
    rate = matmul_rate(TINY, threads=1, tokens=16, rounds=1)
    assert rate["fp32"]["gflops"] > 0
    assert "gflops" not in rate["bf16"] and "emulated" in rate["bf16"]["skipped"]
    line = rate_line(rate)
    assert line.startswith("matmul rate: fp32 ") and "bf16 skipped" in line and "1 thread," in line
