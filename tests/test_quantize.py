"""Int4 checkpoints made locally (relay.models.quantize): packing round trips, RTN error bounds, and a real
vLLM engine on CPU loading the AWQ-format folder and computing with exactly the dequantized weights."""
from __future__ import annotations

import json

import pytest
import torch

from relay.models.quantize import dequantize, pack_int4, quantize_awq_rtn, rtn_quantize, unpack_int4


def test_pack_and_unpack_round_trip():
    g = torch.Generator().manual_seed(0)
    values = torch.randint(0, 16, (5, 24), generator=g, dtype=torch.int32)
    packed = pack_int4(values)
    assert packed.shape == (5, 3) and packed.dtype == torch.int32
    assert torch.equal(unpack_int4(packed), values)
    # AutoAWQ's order: column 1 of a group of eight sits in the fifth nibble
    one = torch.zeros(1, 8, dtype=torch.int32)
    one[0, 1] = 1
    assert int(pack_int4(one)[0, 0]) == 1 << 16


def test_rtn_error_is_within_half_a_step():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 128, generator=g)
    q, zeros, scales = rtn_quantize(w, 64)
    assert int(q.min()) >= 0 and int(q.max()) <= 15 and scales.shape == (16, 2)
    err = (dequantize(q, zeros, scales, 64) - w).abs()
    step = scales.repeat_interleave(64, dim=1)
    assert bool((err <= step * 0.5 + 1e-6).all())
    with pytest.raises(ValueError, match="multiple of group_size"):
        rtn_quantize(torch.randn(4, 100), 64)


@pytest.mark.ray
@pytest.mark.slow
def test_vllm_loads_the_int4_folder_on_cpu(ray_session, tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from relay.actors.generator import GeneratorConfig, start_generator
    from relay.actors.sampling import SamplingConfig

    from relay.launch.models_cmd import main as models_main

    assert models_main(["quantize", str(tiny_llama_dir), "--out", str(tmp_path / "int4")]) == 0  # group size 64
    out = tmp_path / "int4"
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "awq" and (out / "tokenizer.json").exists()
    with pytest.raises(ValueError, match="already quantized"):
        quantize_awq_rtn(out, tmp_path / "again")

    from relay.cpu import cpu_capabilities, vllm_int4_support

    ok, why = vllm_int4_support()
    if not ok and not cpu_capabilities().avx512:  # AVX2-only CPU (or RELAY_CPU_CAPABILITY=avx2): no int4 kernel
        pytest.skip(why)
    assert ok, why  # AVX-512 CPUs and GPUs have the kernel: a failed check here is a bug, not a skip

    # The reference: the original model with every quantized projection replaced by its dequantized weights.
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    changed = 0
    for name, module in model.named_modules():
        if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")):
            module.weight.data = dequantize(*rtn_quantize(module.weight.data, 64), 64)
            changed += 1
    assert changed == 7 * model.config.num_hidden_layers

    gen = start_generator(GeneratorConfig(model=str(out), dtype="bfloat16", max_model_len=256,
                                          run_dir=str(tmp_path / "vllm")), name="test-int4-gen", timeout_s=240)
    try:
        results = gen.generate([[5, 17, 99, 240, 7], [300, 12, 8]], SamplingConfig(temperature=0.0, max_tokens=8))
    finally:
        gen.kill()
    diffs = []
    for r in results:
        seq = r.prompt_token_ids + r.token_ids
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([seq])).logits[0].float(), -1)
        p = len(r.prompt_token_ids)
        ref = logp[p - 1 : len(seq) - 1].gather(-1, torch.tensor(r.token_ids)[:, None])[:, 0]
        diffs.append((ref - torch.tensor(r.logprobs)).abs().mean().item())
    # bf16 activations in vLLM against an fp32 reference; a packing or zero-point error moves logprobs by ~1+.
    assert max(diffs) < 0.05, diffs
