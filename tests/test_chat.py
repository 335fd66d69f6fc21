"""`relay chat` on a tiny model through a real vLLM generator: batch mode matches transformers' greedy output,
interactive mode keeps the history, bad inputs name file and line."""
from __future__ import annotations

import io
import json

import pytest

from relay.launch.chat import main, read_inputs, resolve_chat_model


def _greedy(model_dir, messages, max_new_tokens):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


@pytest.mark.slow
def test_batch_and_interactive_chat(ray_session, tiny_llama_dir, tmp_path, monkeypatch, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "hello there"}\n{"messages": [{"role": "user", "content": "the class"}]}\nplain line\n')
    out = tmp_path / "out.jsonl"
    common = ["--model", str(tiny_llama_dir), "--temperature", "0", "--max-new-tokens", "8", "--dtype", "float32",
              "--run-dir", str(tmp_path / "run")]
    assert main(common + ["--input", str(src), "--output", str(out)]) == 0
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert [r.get("prompt") for r in rows] == ["hello there", None, "plain line"]
    expected = _greedy(tiny_llama_dir, [{"role": "user", "content": "hello there"}], 8)
    assert rows[0]["response"] == expected

    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\n/reset\nhello there\n/exit\nnever read\n"))
    capsys.readouterr()
    assert main(common) == 0
    replies = [l for l in capsys.readouterr().out.splitlines() if l.startswith("assistant> ")]
    assert replies == [f"assistant> {expected}"] * 2  # /reset: the second turn sees no history


def test_inputs_and_models_fail_clearly(tmp_path, tiny_llama_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"nope": 1}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl: line 2: field 'prompt' or 'messages'"):
        read_inputs(str(bad))
    bad.write_text('{"prompt": \n')
    with pytest.raises(ValueError, match="line 1: malformed JSON"):
        read_inputs(str(bad))
    assert resolve_chat_model(str(tiny_llama_dir)) == tiny_llama_dir
    with pytest.raises(FileNotFoundError):
        resolve_chat_model(str(tmp_path / "missing"))
