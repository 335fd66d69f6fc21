"""Checkpoint folders on disk: crash-safe, durable writes, finding the newest complete one, keeping the last N.

A checkpoint is written into a private temporary sibling (`.step-00000012.tmp-PID`); then every file and folder
in it is fsynced, a COMPLETE marker listing each file's size is written and fsynced last, the folder is renamed
into place and its parent fsynced. After a crash at any moment the newest folder holding COMPLETE is whole and
on disk; the temp folder a killed run leaves behind is removed by `clean_stale` at the next start.

Checking a checkpoint's contents before loading it lives in `relay.learners.checkpoint_verify`. This module
imports nothing heavy.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

STEP_DIR = re.compile(r"^step-(\d{8})$")
MARKER = "COMPLETE"
# Temp folders of `atomic_dir` for what Relay writes: checkpoints, the final model / adapter, PPO's actor/critic.
STALE = re.compile(r"^\.(step-\d{8}|model|adapter|actor|critic)\.(tmp|old)-\d+$")


def checkpoint_dir(save_dir: str | Path, step: int) -> Path:
    return Path(save_dir) / "checkpoints" / f"step-{step:08d}"


def step_of(path: str | Path) -> int | None:
    """12 for .../step-00000012, None for anything else."""
    m = STEP_DIR.match(Path(path).name)
    return int(m.group(1)) if m else None


def fsync_path(path: str | Path) -> None:
    """Flush a file's data, or a folder's entries (the names created or renamed in it), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise  # a real write error; some file systems (FUSE mounts) merely cannot sync a folder
    finally:
        os.close(fd)


def sync_tree(root: str | Path) -> dict[str, int]:
    """fsync every file and folder under `root` (children before parents); return {relative path: size}."""
    root = Path(root)
    sizes: dict[str, int] = {}
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_symlink():  # not ours to flush; the manifest lists regular files only
                continue
            fsync_path(path)
            sizes[path.relative_to(root).as_posix()] = path.stat().st_size
        fsync_path(dirpath)
    return sizes


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary folder; on success it is made durable and replaces `final` in one rename, on failure it
    is removed. `final/COMPLETE` lists the size of every file (see `checkpoint_verify`)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.is_symlink():
        tmp.unlink()  # never write through a link someone left at our temp name
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        sizes = sync_tree(tmp)
        marker = tmp / MARKER
        marker.write_text(json.dumps({"files": sizes}, indent=0, sort_keys=True) + "\n")
        fsync_path(marker)
        fsync_path(tmp)
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_path(final.parent)  # the rename itself survives a power loss
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_complete(path: str | Path) -> bool:
    return (Path(path) / MARKER).exists()


def complete_checkpoints(save_dir: str | Path) -> list[Path]:
    """Complete checkpoints under SAVE_DIR/checkpoints, oldest first (half-written ones are ignored)."""
    root = Path(save_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if step_of(p) is not None and is_complete(p)]
    return sorted(done, key=lambda p: step_of(p) or 0)


def belongs_to(path: str | Path, save_dir: str | Path) -> bool:
    """Whether checkpoint `path` lies in SAVE_DIR/checkpoints (a run resumed from elsewhere has none there yet)."""
    return Path(path).resolve().parent == (Path(save_dir) / "checkpoints").resolve()


def latest_checkpoint(save_dir: str | Path) -> Path | None:
    """Newest complete checkpoint under SAVE_DIR/checkpoints."""
    done = complete_checkpoints(save_dir)
    return done[-1] if done else None


def clean_stale(save_dir: str | Path) -> list[Path]:
    """Remove the temp folders a killed run left behind (`atomic_dir`'s .NAME.tmp-PID / .NAME.old-PID) and return
    them; complete checkpoints and the final model are never touched."""
    removed = []
    for root in (Path(save_dir) / "checkpoints", Path(save_dir)):
        if not root.is_dir():
            continue
        for p in sorted(root.iterdir()):
            if STALE.match(p.name) and p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def stale_line(removed: list[Path]) -> str:
    return f"removed {len(removed)} unfinished temp folder(s) a stopped run left: " + ", ".join(p.name for p in removed)


def prune(save_dir: str | Path, current: str | Path, keep: int) -> list[Path]:
    """After saving `current`, delete complete checkpoints beyond the `keep` newest up to it (keep <= 0: none),
    and any numbered after it: those belong to an earlier run in a reused SAVE_DIR, and `--resume auto` must
    not pick them. Returns what was deleted."""
    cur = step_of(current)
    if cur is None:
        return []
    done = complete_checkpoints(save_dir)
    older = [p for p in done if (step_of(p) or 0) <= cur]
    drop = [p for p in done if (step_of(p) or 0) > cur]
    if keep > 0:
        drop += older[:-keep]
    for p in drop:
        # Unmark first: a kill during the rmtree leaves an incomplete folder that is never resumed from.
        (p / MARKER).unlink(missing_ok=True)
        shutil.rmtree(p, ignore_errors=True)
    return sorted(drop, key=lambda p: step_of(p) or 0)


def folder_bytes(path: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file() and not p.is_symlink())


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


@dataclass
class SaveReport:
    """What one checkpoint cost and what retention removed, for the log."""

    path: Path
    bytes: int
    seconds: float
    removed: list[Path] = field(default_factory=list)

    def line(self) -> str:
        text = f"checkpoint {self.path}: {human_bytes(self.bytes)} in {self.seconds:.1f} s"
        if self.removed:
            text += "; removed " + ", ".join(p.name for p in self.removed)
        return text


def save_with_retention(final: Path, write: Callable[[Path], None], keep: int) -> SaveReport:
    """`write(tmp)` fills the checkpoint; it is published atomically, then older ones beyond `keep` go."""
    t0 = time.monotonic()
    with atomic_dir(final) as tmp:
        write(tmp)
    seconds = time.monotonic() - t0
    removed = prune(final.parent.parent, final, keep)
    return SaveReport(final, folder_bytes(final), seconds, removed)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # no second copy of the weights on disk
    except OSError:
        shutil.copy2(src, dst)


def publish_folder(src: Path, target: Path, extra_files: Iterable[Path] = ()) -> Path:
    """Make `target` a plain folder (an HF model folder, no COMPLETE) holding `src`'s files, hard-linked where
    the file system allows, plus `extra_files`; atomically and durably, like a checkpoint."""
    with atomic_dir(target) as tmp:
        shutil.rmtree(tmp)
        shutil.copytree(src, tmp, copy_function=_link_or_copy)
        for f in extra_files:
            shutil.copy2(f, tmp / f.name)
    (target / MARKER).unlink(missing_ok=True)  # an HF folder; the rename already made it whole
    return target

