"""Weights-only `torch.load` around the ColossalAI calls that read pickled files Relay does not open itself.

Relay writes weights and trainer state as safetensors and JSON; ColossalAI's `booster.load_optimizer` (and
`load_model` for 3d/gemini folders holding `.bin` shards) call `torch.load` without `weights_only`. From torch
2.6 (our floor) the default is weights-only, which refuses arbitrary objects; but the environment variable
TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 turns that default off for the whole process. Inside `weights_only_loads()`
torch is forced to weights-only whatever the environment says, so a crafted optimizer shard in a checkpoint
folder cannot run code when a run resumes: it fails with `pickle.UnpicklingError` instead.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

FORCE_ON = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
FORCE_OFF = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


@contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every `torch.load` in this process runs with weights_only=True until the block ends (torch reads these
    variables at each call); the previous values are restored afterwards."""
    saved = {key: os.environ.get(key) for key in (FORCE_ON, FORCE_OFF)}
    os.environ[FORCE_ON] = "1"
    os.environ.pop(FORCE_OFF, None)  # torch raises when both are set
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
