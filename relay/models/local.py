"""Models and tokenizers come from local folders only: Relay never downloads from a hub (README, "Security
defaults"), and runs with HF_HUB_OFFLINE=1 in every actor.

`local_folder` is the one check every setting that names a model or tokenizer goes through before
transformers sees it: given a hub id ('HuggingFaceTB/SmolLM2-135M-Instruct') or a mistyped path, transformers
would try the network, or fail offline with a long traceback about cached files. Here it is one line that names
the setting and says what to give instead.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

MODEL_NAMES = ("smollm2", "tiny-llama", "tiny-qwen2")
TOKENIZER_NAMES = ("smollm2", "tiny", "gpt2")


class NotLocalError(FileNotFoundError):
    """A model or tokenizer setting that is not a local folder (e.g. a hub id)."""


def local_folder(value: str | Path, what: str, names: Sequence[str] = MODEL_NAMES) -> str:
    """`value` when it is an existing folder; else NotLocalError naming `what` (the setting or argument, e.g.
    'actor.pretrain' or '--tokenizer') and the bundled `names` that would work instead."""
    if Path(value).is_dir():
        return str(value)
    text = str(value)
    looks_hub = "/" in text and not text.startswith((".", "/", "~")) and text.count("/") == 1
    kind = "looks like a hub id, but " if looks_hub else ""
    raise NotLocalError(
        f"{what}: {text!r} {kind}is not a local folder; models and tokenizers are read from local folders only, "
        f"never downloaded from a hub. Give a folder (`relay models prepare smollm2` prints the converted "
        f"SmolLM2 folder) or a bundled name: {', '.join(names)}")
