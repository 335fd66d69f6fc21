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

A sender that writes the same sizes again and again (a learner pushing weights every episode) keeps its folder
between uses (`reused_dir`): overwriting a file's existing pages costs a fifth of filling fresh ones (0.2 s
against 0.5-1.9 s for 650 MB on a quiet machine, more in a busy one). A kept folder goes when its process ends
(`release_reused_dirs`, at exit, or swept by the next process of the same pid namespace that keeps one).
"""
from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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


# ---------------------------------------------------------------------------------------------------------
# Folders kept between uses by one process.

OWNER_FILE = ".relay-owner"  # "<pid namespace> <pid>" of the process keeping the folder
_reused: dict[str, Path] = {}
_reused_busy: set[str] = set()
_reused_lock = threading.Lock()


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return "-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_orphans(root: str | Path, stem: str) -> list[Path]:
    """Remove the kept folders `<root>/<stem>*` whose process is gone (SIGKILL skips the exit hook). Only
    folders this user owns and whose owner file names this pid namespace: a pid means nothing in another
    container that shares /dev/shm. Returns the removed folders."""
    removed = []
    for folder in Path(root).glob(f"{stem}*"):
        try:
            if folder.is_symlink() or folder.stat().st_uid != os.getuid():
                continue
            namespace, pid = (folder / OWNER_FILE).read_text().split()
        except (OSError, ValueError):
            continue  # not a kept folder (a throwaway one is removed by its user), or not ours
        if namespace == _pid_namespace() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    if removed:
        logger.info("removed %d scratch folder(s) of ended processes: %s", len(removed), [p.name for p in removed])
    return removed


@dataclass
class ReusedDir:
    """A folder lent by `reused_dir`; `discard()` when its files must not be overwritten later (a reader may
    still map them)."""

    path: Path
    reused: bool
    """False: a throwaway folder (the kept one was in use by another thread); removed after the `with`."""
    kept: bool = True

    def discard(self) -> None:
        self.kept = False


@contextmanager
def reused_dir(key: str, stem: str, needed_bytes: int = 0, what: str = "scratch files") -> Iterator[ReusedDir]:
    """This process's kept private folder for `key` (made on first use as `private_dir(f"{stem}{pid}-")`),
    lent for the `with` block. The folder is removed instead of kept when the block raises or calls
    `discard()`; a second thread asking while it is lent gets a throwaway folder."""
    with _reused_lock:
        busy = key in _reused_busy
        folder = None if busy else _reused.get(key)
        if not busy:
            _reused_busy.add(key)
    try:
        if folder is not None and not folder.is_dir():
            folder = None
        if folder is None:
            folder = private_dir(f"{stem}{os.getpid()}-", needed_bytes, what=what)
            if not busy:
                sweep_orphans(folder.parent, stem)
                write_private(folder / OWNER_FILE, f"{_pid_namespace()} {os.getpid()}".encode())
                with _reused_lock:
                    _reused[key] = folder
        lease = ReusedDir(folder, reused=not busy)
        try:
            yield lease
        except BaseException:
            lease.discard()
            raise
        finally:
            if not (lease.kept and lease.reused):
                shutil.rmtree(folder, ignore_errors=True)
                if lease.reused:
                    with _reused_lock:
                        _reused.pop(key, None)
    finally:
        if not busy:
            with _reused_lock:
                _reused_busy.discard(key)


def release_reused_dirs() -> None:
    """Remove every folder this process keeps (it is about to end, or no longer sends)."""
    with _reused_lock:
        folders = [f for k, f in _reused.items() if k not in _reused_busy]
        for k in [k for k in _reused if k not in _reused_busy]:
            del _reused[k]
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


atexit.register(release_reused_dirs)
