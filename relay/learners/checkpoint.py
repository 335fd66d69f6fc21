"""Trainer state inside a checkpoint: step, data position and RNG as JSON plus a safetensors file for torch RNG
bytes, so nothing is unpickled on resume.

Layout of SAVE_DIR/checkpoints/step-00000012/ (folders written by `relay.learners.checkpoint_store`):
    model/ (HF folder, safetensors), optimizer/ (ColossalAI), trainer_state.json, rng.safetensors, COMPLETE
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from relay.learners.checkpoint_resume import CheckpointError


def capture_rng() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Python/NumPy RNG as JSON-able data and torch RNG as tensors (for safetensors)."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    meta = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_name, np_pos, np_has_gauss, np_gauss],
    }
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_keys.astype(np.int64))}
    return meta, tensors


def restore_rng(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])


def save_trainer_state(folder: str | Path, state: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    meta, tensors = capture_rng()
    (Path(folder) / "trainer_state.json").write_text(json.dumps({**state, "rng": meta}, indent=1))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(Path(folder) / "rng.safetensors"))


def load_trainer_state(folder: str | Path, restore: bool = True) -> dict[str, Any]:
    from safetensors.torch import load_file

    folder = Path(folder)
    path = folder / "trainer_state.json"
    if not path.exists():
        raise CheckpointError(f"{path}: missing; {folder} is not a Relay checkpoint")
    try:
        state = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: bad JSON ({err})") from None
    if restore:
        rng = folder / "rng.safetensors"
        try:
            tensors = load_file(str(rng))
        except Exception as err:  # missing or corrupt: safetensors raises its own error type
            raise CheckpointError(f"{rng}: unreadable safetensors ({err})") from None
        restore_rng(state["rng"], tensors)
    return state
