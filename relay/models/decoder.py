"""Token ids back to text, for processes that only decode (the reward actor).

A tokenizer folder that transformers would read with its generic `TokenizersBackend` class (Relay's converted
models and most fast tokenizers saved by transformers 5) decodes exactly as its `tokenizer.json` does in the
`tokenizers` library, unless the folder asks for transformers' clean-up of spaces. Such folders are read with
`tokenizers` alone: loading them through transformers' AutoTokenizer imports torch and transformers, 6-7 CPU-s
per process on a 2-core machine. Every other folder goes through AutoTokenizer.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

GENERIC_CLASSES = ("TokenizersBackend",)  # transformers 5's class that adds nothing to tokenizer.json's decode


class TokenizerJsonDecoder:
    """The decode half of a transformers fast tokenizer: `batch_decode` and `eos_token_id`, same results."""

    def __init__(self, tokenizer_json: Path, eos_token: str | None):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(tokenizer_json))
        self.eos_token_id = self._tok.token_to_id(eos_token) if eos_token else None

    def batch_decode(self, sequences: Sequence[Sequence[int]], skip_special_tokens: bool = False) -> list[str]:
        return self._tok.decode_batch([list(map(int, s)) for s in sequences], skip_special_tokens=skip_special_tokens)


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict with 'content'."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _generic_config(folder: Path) -> dict | None:
    """The folder's tokenizer_config.json when its tokenizer decodes through tokenizer.json alone, else None."""
    config = _read_json(folder / "tokenizer_config.json")
    if (config and (folder / "tokenizer.json").is_file() and config.get("tokenizer_class") in GENERIC_CLASSES
            and not config.get("clean_up_tokenization_spaces")):
        return config
    return None


def can_decode_without_transformers(folder: str | Path) -> bool:
    """True when `folder`'s tokenizer decodes through tokenizer.json alone (see the module's docstring)."""
    return _generic_config(Path(folder)) is not None


def load_decoder(folder: str | Path) -> Any:
    """An object with transformers' `batch_decode(ids, skip_special_tokens=...)` and `eos_token_id` for the
    tokenizer in `folder`: a `TokenizerJsonDecoder` where that decodes the same, else transformers' tokenizer."""
    folder = Path(folder)
    config = _generic_config(folder)
    if config is not None:
        eos = _token_text(config.get("eos_token"))
        if eos is None:  # older folders keep the special tokens in their own file
            eos = _token_text((_read_json(folder / "special_tokens_map.json") or {}).get("eos_token"))
        return TokenizerJsonDecoder(folder / "tokenizer.json", eos)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)
