"""Private scratch folders (relay/scratch.py) and their users: mode 0700 and unpredictable names, a disk
fallback when shared memory is missing, small or full (said in one log line), and no write through a symlink
planted where a file will go. No Ray."""
from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import pytest

from relay import scratch
from relay.actors.weight_sync import (
    new_transfer_folder,
    read_buckets,
    serialize_buckets,
    write_blobs,
    write_buckets,
)


@pytest.fixture
def scratch_log(log_lines):
    scratch._said.clear()  # the one-line notice is per process: start each test without it
    return log_lines("relay.scratch")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_private_dir_in_shared_memory_root(tmp_path, scratch_log):
    a = scratch.private_dir("relay-x-", 1000, preferred=tmp_path)
    b = scratch.private_dir("relay-x-", 1000, preferred=tmp_path)
    assert a.parent == tmp_path and b.parent == tmp_path and a != b
    assert a.name.startswith("relay-x-") and len(a.name) > len("relay-x-") + 4  # random suffix
    assert _mode(a) == 0o700 and _mode(b) == 0o700
    assert scratch_log == []  # room enough: nothing to say


@pytest.mark.parametrize("case", ["missing", "too_small", "full"])
def test_falls_back_to_disk_with_one_line(tmp_path, scratch_log, case):
    shm = tmp_path / "shm"
    if case != "missing":
        shm.mkdir()
    room = {"too_small": 10 * 2**20, "full": 0}.get(case, 0)
    for _ in range(3):  # one line, not one per folder (a run makes one per weight push)
        folder = scratch.private_dir("relay-w-", 64 * 2**20, preferred=shm, what="weight transfer",
                                     free=lambda _p: room)
        assert folder.parent == Path(tempfile.gettempdir())
        assert _mode(folder) == 0o700
        folder.rmdir()
    assert len(scratch_log) == 1
    line = scratch_log[0]
    assert line.startswith("weight transfer: ") and str(shm) in line and "on disk" in line and "\n" not in line
    assert ("missing" in line) if case == "missing" else ("MiB free" in line)


def test_env_root_and_patched_free_space_reach_weight_transfers(tmp_path, monkeypatch, scratch_log):
    """$RELAY_SHM_DIR names the shared-memory root (the fault tests point it at a tiny or full folder)."""
    monkeypatch.setenv(scratch.ENV_ROOT, str(tmp_path))
    folder = new_transfer_folder(1000)
    assert folder.parent == tmp_path and _mode(folder) == 0o700
    assert folder.name.startswith(f"relay-weights-{os.getpid()}-")
    monkeypatch.setattr(scratch, "free_bytes", lambda _p: 100)  # a full tmpfs
    folder = new_transfer_folder(1000)
    assert folder.parent == Path(tempfile.gettempdir()) and _mode(folder) == 0o700
    folder.rmdir()
    assert len(scratch_log) == 1 and str(tmp_path) in scratch_log[0]


def test_write_private_refuses_a_planted_symlink(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    link = tmp_path / "weights-00000-of-00001.safetensors"
    link.symlink_to(victim)
    with pytest.raises(OSError):
        scratch.write_private(link, b"evil")
    assert victim.read_text() == "keep me"
    fresh = scratch.write_private(tmp_path / "new.bin", b"data")
    assert fresh.read_bytes() == b"data" and _mode(fresh) == 0o600
    with pytest.raises(FileExistsError):  # nor over a plain file
        scratch.write_private(fresh, b"again")


def test_write_blobs_never_follows_a_symlink(tmp_path):
    import torch

    blobs = serialize_buckets({"w": torch.ones(2, 2)})
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    out = tmp_path / "out"
    out.mkdir()
    (out / "weights-00000-of-00001.safetensors").symlink_to(victim)
    with pytest.raises(OSError):
        write_blobs(blobs, out)
    assert victim.read_bytes() == b"keep"
    paths = write_blobs(blobs, tmp_path / "clean")
    assert torch.equal(read_buckets(paths)["w"], torch.ones(2, 2))


def test_write_buckets_replaces_a_planted_symlink_instead_of_following_it(tmp_path):
    import torch

    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    out = tmp_path / "out"
    out.mkdir()
    link = out / "weights-00000-of-00001.safetensors"
    link.symlink_to(victim)
    [path] = write_buckets({"w": torch.ones(2, 2)}, out)
    assert victim.read_bytes() == b"keep" and not path.is_symlink()
    assert torch.equal(read_buckets([path])["w"], torch.ones(2, 2))
    assert sorted(p.name for p in out.iterdir()) == [link.name]  # no temp file left


def test_private_temp_file_is_exclusive(tmp_path):
    a = scratch.private_temp_file(tmp_path, "actor.safetensors")
    b = scratch.private_temp_file(tmp_path, "actor.safetensors")
    assert a != b and a.parent == tmp_path and a.name.startswith("actor.safetensors.") and a.suffix == ".tmp"
    assert a.stat().st_size == 0 and _mode(a) == 0o600


def test_no_predictable_shared_paths_in_relay():
    """No module builds a /dev/shm path by hand any more (the PPO run folder was /dev/shm/relay-<run>-<pid>)."""
    root = Path(__file__).resolve().parents[1] / "relay"
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if p.name != "scratch.py" and '"/dev/shm"' in p.read_text()]
    assert offenders == []


def _kept(tmp_path, monkeypatch, key="k"):
    monkeypatch.setenv(scratch.ENV_ROOT, str(tmp_path))
    return scratch.reused_dir(key, "relay-t-", 1000)


def test_reused_dir_is_kept_between_uses_and_removed_on_release(tmp_path, monkeypatch):
    with _kept(tmp_path, monkeypatch) as first:
        (first.path / "f").write_bytes(b"x")
    with _kept(tmp_path, monkeypatch) as second:
        assert second.path == first.path and second.reused and (second.path / "f").read_bytes() == b"x"
        assert first.path.name.startswith(f"relay-t-{os.getpid()}-") and _mode(first.path) == 0o700
        with _kept(tmp_path, monkeypatch) as nested:  # lent already (another thread's push): a throwaway one
            assert nested.path != first.path and not nested.reused
        assert not nested.path.exists() and first.path.exists()
    scratch.release_reused_dirs()
    assert not first.path.exists()
    with _kept(tmp_path, monkeypatch) as fresh:
        assert fresh.path != first.path
    scratch.release_reused_dirs()


def test_reused_dir_is_removed_when_discarded_or_failed(tmp_path, monkeypatch):
    with _kept(tmp_path, monkeypatch) as lease:
        lease.discard()  # a reader may still map its files
    assert not lease.path.exists()
    with pytest.raises(RuntimeError), _kept(tmp_path, monkeypatch) as broken:
        raise RuntimeError("half written")
    assert not broken.path.exists()
    with _kept(tmp_path, monkeypatch) as again:
        assert again.path not in (lease.path, broken.path)
    scratch.release_reused_dirs()


def test_sweep_removes_only_ended_processes_folders_of_this_namespace(tmp_path):
    import subprocess
    import sys

    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                           text=True, check=True)
    dead_pid = int(ended.stdout)
    ns = scratch._pid_namespace()
    folders = {}
    for name, owner in {"dead": f"{ns} {dead_pid}", "alive": f"{ns} {os.getppid()}",
                        "other-namespace": f"pid:[1] {dead_pid}", "no-owner": None}.items():
        folders[name] = tmp_path / f"relay-t-{name}"
        folders[name].mkdir()
        if owner is not None:
            (folders[name] / scratch.OWNER_FILE).write_text(owner)
    removed = scratch.sweep_orphans(tmp_path, "relay-t-")
    assert removed == [folders["dead"]] and not folders["dead"].exists()
    assert all(folders[n].exists() for n in ("alive", "other-namespace", "no-owner"))
