"""Which checkpoint a run resumes from, checked before anything loads it.

`checkpoint_path` names a checkpoint, a run folder (its newest complete checkpoint) or `auto` (the newest
complete checkpoint in the run's own SAVE_DIR, else a fresh start). `verify_checkpoint` reads only headers and
small JSON files, so that a truncated or corrupt checkpoint is reported as "this file: this problem" instead
of an exception from deep inside a learner. Imports nothing heavy (safetensors only to read headers).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable

from relay.learners.checkpoint_store import MARKER, complete_checkpoints, is_complete, latest_checkpoint

AUTO = "auto"

# What every learner-group checkpoint folder holds (relay.learners.worker_state.save_checkpoint).
LEARNER_FILES = ("model/config.json", "optimizer")
# Trainer state beside the learner folders (relay.learners.checkpoint.save_trainer_state).
STATE_FILES = ("trainer_state.json", "rng.safetensors")


class CheckpointError(ValueError):
    """A checkpoint is incomplete or corrupt; the message names the file and what is wrong."""


def _manifest(marker: Path) -> dict[str, int]:
    """{relative path: size} recorded by `atomic_dir`; {} for markers written before sizes were recorded."""
    text = marker.read_text(errors="replace")
    if text.strip() == "ok":
        return {}
    try:
        files = json.loads(text)["files"]
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{marker}: bad JSON in the completion marker ({err})") from None
    return {str(k): int(v) for k, v in files.items()}


def _check_json(path: Path) -> None:
    try:
        json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: bad JSON ({err})") from None


def _check_safetensors(path: Path) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np"):  # parses the header and checks the file covers every tensor
            pass
    except Exception as err:  # safetensors raises its own error type for every format problem
        raise CheckpointError(f"{path}: unreadable safetensors ({err})") from None


def verify_checkpoint(path: str | Path, required: Iterable[str] = ()) -> None:
    """Raise CheckpointError naming the file when `path` is not a whole checkpoint: a missing folder, marker or
    `required` entry, a file whose size differs from what was written, bad JSON, an unreadable safetensors
    file or a shard its index names but the folder lacks."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: missing (no such checkpoint folder)")
    marker = path / MARKER
    if not marker.exists():
        raise CheckpointError(f"{marker}: missing: the checkpoint was not completely written")
    for rel in required:
        if not (path / rel).exists():
            raise CheckpointError(f"{path / rel}: missing")
    sizes = _manifest(marker)
    for rel in sorted(sizes):
        if not (path / rel).exists():
            raise CheckpointError(f"{path / rel}: missing (listed in {marker.name})")
    # Formats before sizes: "unreadable safetensors (why)" says more than a size for the files we can parse.
    for file in sorted(path.rglob("*.json")):
        _check_json(file)
        if file.name.endswith(".index.json"):  # sharded weights: every shard the index names must be there
            shards = set(json.loads(file.read_text()).get("weight_map", {}).values())
            for shard in sorted(shards):
                if not (file.parent / shard).exists():
                    raise CheckpointError(f"{file.parent / shard}: missing (named in {file.name})")
    for file in sorted(path.rglob("*.safetensors")):
        _check_safetensors(file)
    for rel, size in sorted(sizes.items()):  # the rest (optimizer shards): truncated or overwritten
        if (path / rel).stat().st_size != size:
            actual = (path / rel).stat().st_size
            raise CheckpointError(f"{path / rel}: {actual} bytes, but {size} were written (truncated or changed)")


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


def find_resume(checkpoint_path: str | None, save_dir: str | Path, required: Iterable[str],
                note: Callable[[str], None]) -> Path | None:
    """The verified checkpoint to resume from, or None for a fresh start.

    `auto` takes SAVE_DIR's newest complete checkpoint; one that fails verification is skipped with a line (the
    previous one is why several are kept); none at all is a fresh start, said in one line. An explicitly named
    checkpoint that fails verification is an error."""
    required = tuple(required)
    if checkpoint_path != AUTO:
        path = resolve_resume(checkpoint_path)
        if path is not None:
            verify_checkpoint(path, required)
        return path
    done = complete_checkpoints(save_dir)
    if not done:
        note(f"resume auto: no complete checkpoint in {Path(save_dir) / 'checkpoints'}: starting fresh")
        return None
    problems = []
    for path in reversed(done):
        try:
            verify_checkpoint(path, required)
        except CheckpointError as err:
            note(f"resume auto: skipping {path.name}: {err}")
            problems.append(str(err))
            continue
        note(f"resume auto: resuming from {path}")
        return path
    # Starting fresh would prune these after the first save: leave the decision to the user.
    raise CheckpointError(f"resume auto: no usable checkpoint in {Path(save_dir) / 'checkpoints'}: {problems[0]}")
