"""relay.models.decoder: decoding through tokenizer.json alone gives transformers' text, and folders it cannot
vouch for go through transformers."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import torch

from relay.models.decoder import TokenizerJsonDecoder, can_decode_without_transformers, load_decoder


def _folders(tiny_llama_dir):
    from relay.data.tokenizers import load_smollm2_tokenizer, tiny_tokenizer_dir
    from relay.models.tiny import default_cache_dir

    load_smollm2_tokenizer()  # builds the cached SmolLM2 tokenizer folder on a fresh machine
    return {"tiny llama": tiny_llama_dir, "tiny tokenizer": tiny_tokenizer_dir(),
            "smollm2": default_cache_dir() / "smollm2-tokenizer"}


def test_same_text_and_eos_as_transformers(tiny_llama_dir):
    """Random ids over the whole vocabulary (special tokens included, kept and skipped) decode to transformers'
    text; the EOS id is transformers' too."""
    from transformers import AutoTokenizer

    for name, folder in _folders(tiny_llama_dir).items():
        ref = AutoTokenizer.from_pretrained(folder)
        got = load_decoder(folder)
        assert isinstance(got, TokenizerJsonDecoder), name
        assert got.eos_token_id == ref.eos_token_id is not None, name
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, len(ref), (16, 40), generator=g).tolist()
        specials = sorted(set(ref.all_special_ids))
        ids += [specials + ids[0][:5], ids[1][:3] + specials[::-1]]  # special tokens inside text
        for skip in (False, True):
            assert got.batch_decode(ids, skip_special_tokens=skip) == ref.batch_decode(ids, skip_special_tokens=skip), (
                name, skip)


def test_other_folders_go_through_transformers(tiny_llama_dir, tmp_path):
    """A tokenizer class of its own, or transformers' clean-up of spaces: the decoder is transformers' own."""
    for change in ({"tokenizer_class": "LlamaTokenizer"}, {"clean_up_tokenization_spaces": True}):
        folder = tmp_path / next(iter(change))
        shutil.copytree(tiny_llama_dir, folder)
        config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, **change}))
        assert not can_decode_without_transformers(folder), change
    folder = tmp_path / "clean_up_tokenization_spaces"
    assert not isinstance(load_decoder(folder), TokenizerJsonDecoder)
    assert not can_decode_without_transformers(tmp_path / "missing")


def test_decoding_imports_neither_torch_nor_transformers(tiny_llama_dir):
    """What the reward actor saves at start: no torch, no transformers in the process."""
    script = ("import sys; from relay.models.decoder import load_decoder; "
              f"d = load_decoder({str(tiny_llama_dir)!r}); d.batch_decode([[5, 6, 7]]); "
              "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
