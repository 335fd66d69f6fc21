"""Private scratch folders for files that processes on one node hand to each other (the actor's weight export,
weight-transfer buckets).

Every folder is made by `tempfile.mkdtemp`: mode 0700 and an unpredictable name, so no other user can read the
weights, guess the path or plant a symlink where a file will be written. It lives in shared memory (/dev/shm)
when that has room for the expected size, else on disk (the system temp folder): Docker gives containers a
64 MB /dev/shm, which a model export would fill mid-run (ENOSPC). The fallback is said in one log line (once
per purpose and root). Files written into a folder go through `write_private` (O_EXCL | O_NOFOLLOW: never
through a link) or `private_temp_file` (mkstemp).

$RELAY_SHM_DIR replaces /dev/shm as the shared-memory root (tests point it at a small or full folder); it
reaches every Relay actor (`relay.cluster.options.actor_env`).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

SHM_ROOT = "/dev/shm"
ENV_ROOT = "RELAY_SHM_DIR"
LEGACY_ENV_ROOT = "RELAY_WEIGHT_DIR"  # the weight-transfer-only name this variable had before
HEADROOM = 1.1  # keep 10% spare: tmpfs full is ENOSPC for every process on the node, not only ours
_said: set[tuple[str, str]] = set()  # (what, root) already logged: one line, not one per weight push


def free_bytes(path: str | Path) -> int:
    """Bytes free to unprivileged writers on the file system holding `path`."""
    return shutil.disk_usage(path).free


def shm_root() -> Path:
    """The configured shared-memory root: $RELAY_SHM_DIR, else /dev/shm."""
    return Path(os.environ.get(ENV_ROOT) or os.environ.get(LEGACY_ENV_ROOT) or SHM_ROOT)


def scratch_root(needed_bytes: int = 0, preferred: str | Path | None = None, what: str = "scratch files",
                 free: Callable[[str | Path], int] | None = None) -> Path:
    """`preferred` (default `shm_root()`) when it is a writable folder with room for `needed_bytes` (+10%),
    else the system temp folder (logged once per `what` and root). `free` (default `free_bytes`, looked up at
    call time so tests can patch it) measures the room."""
    base = Path(preferred) if preferred is not None else shm_root()
    free = free or free_bytes
    try:
        if not base.is_dir():
            reason = f"{base} is missing"
        elif not os.access(base, os.W_OK | os.X_OK):
            reason = f"{base} is not writable"
        elif (room := free(base)) <= needed_bytes * HEADROOM:
            reason = f"{base} has {room / 2**20:.0f} MiB free"
        else:
            return base
    except OSError as err:
        reason = f"{base}: {err}"
    fallback = Path(tempfile.gettempdir())
    if (what, str(base)) not in _said:
        _said.add((what, str(base)))
        logger.warning("%s: %s (need %.0f MiB): using %s on disk instead (slower; a larger /dev/shm, e.g. "
                       "docker --shm-size, keeps them in memory)", what, reason, needed_bytes / 2**20, fallback)
    return fallback


def private_dir(prefix: str, needed_bytes: int = 0, preferred: str | Path | None = None,
                what: str = "scratch files", free: Callable[[str | Path], int] | None = None) -> Path:
    """A new folder (mode 0700, random name starting with `prefix`) under `scratch_root(...)`; the caller
    removes it (`shutil.rmtree`)."""
    root = scratch_root(needed_bytes, preferred, what, free)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=root))


def write_private(path: str | Path, data: bytes) -> Path:
    """Write `data` to a new file `path` (mode 0600). Refuses (FileExistsError / OSError ELOOP) when anything,
    a symlink included, already sits at `path`, instead of writing through it."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return Path(path)


def private_temp_file(folder: str | Path, name: str) -> Path:
    """A new, empty file in `folder` named `<name>.<random>.tmp` (mkstemp: created exclusively, mode 0600),
    for writers that open a path themselves (safetensors' save_file) and rename the result into place."""
    fd, path = tempfile.mkstemp(prefix=f"{name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    return Path(path)
