"""Checkpoint folders that survive a crash: each is written to a temporary sibling and renamed into place, so
the newest complete checkpoint is always intact. Trainer state (step, data position, RNG) is JSON plus a
safetensors file for torch RNG bytes: nothing is unpickled on resume.

Layout of SAVE_DIR/checkpoints/step-00000012/:
    model/ (HF folder, safetensors), optimizer/ (ColossalAI), trainer_state.json, rng.safetensors
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

STEP_DIR = re.compile(r"^step-(\d{8})$")


def checkpoint_dir(save_dir: str | Path, step: int) -> Path:
    return Path(save_dir) / "checkpoints" / f"step-{step:08d}"


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `final` in one rename, on failure it is removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        (tmp / "COMPLETE").write_text("ok\n")
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_complete(path: str | Path) -> bool:
    return (Path(path) / "COMPLETE").exists()


def latest_checkpoint(save_dir: str | Path) -> Path | None:
    """Newest complete checkpoint under SAVE_DIR/checkpoints (half-written ones are ignored)."""
    root = Path(save_dir) / "checkpoints"
    if not root.exists():
        return None
    done = [p for p in root.iterdir() if STEP_DIR.match(p.name) and is_complete(p)]
    return max(done, key=lambda p: int(STEP_DIR.match(p.name).group(1)), default=None)


def resolve_resume(checkpoint_path: str | None) -> Path | None:
    """`checkpoint_path` may name a checkpoint or a run folder (then its newest complete checkpoint)."""
    if not checkpoint_path:
        return None
    path = Path(checkpoint_path)
    if is_complete(path):
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"checkpoint_path {path}: neither a complete checkpoint nor a run folder holding one")
    return latest


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
        raise FileNotFoundError(f"{path}: missing; {folder} is not a Relay checkpoint")
    state = json.loads(path.read_text())
    if restore:
        restore_rng(state["rng"], load_file(str(folder / "rng.safetensors")))
    return state
