"""Checkpoint folders on disk: durable atomic writes, stale temp folders, keeping the last N, naming what is wrong
with a corrupt checkpoint, `resume auto`, and a torn metrics.jsonl line. No Ray."""
from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from relay.learners import checkpoint_store as store
from relay.learners.checkpoint import load_trainer_state, save_trainer_state
from relay.learners.checkpoint_resume import (
    LEARNER_FILES,
    STATE_FILES,
    CheckpointError,
    find_resume,
    verify_checkpoint,
)
from relay.metrics import MetricsLogger, read_metrics

REQUIRED = LEARNER_FILES + STATE_FILES


def write_checkpoint(save_dir: Path, step: int, payload: int = 64) -> Path:
    """A checkpoint shaped like the learners' (model/, optimizer/, trainer state), through `atomic_dir`."""
    with store.atomic_dir(store.checkpoint_dir(save_dir, step)) as tmp:
        (tmp / "model").mkdir()
        (tmp / "model" / "config.json").write_text(json.dumps({"model_type": "llama"}))
        save_file({"w": torch.arange(payload, dtype=torch.float32)}, str(tmp / "model" / "model.safetensors"))
        (tmp / "optimizer").mkdir()
        (tmp / "optimizer" / "pytorch_optim.bin").write_bytes(b"x" * 100)
        save_trainer_state(tmp, {"step": step})
    return store.checkpoint_dir(save_dir, step)


# ------------------------------------------------------------------------------------------ durable writes
def test_every_file_and_folder_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(b))), real_replace(a, b))[1])
    final = store.checkpoint_dir(tmp_path, 3)
    with store.atomic_dir(final) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.bin").write_bytes(b"a" * 10)
        (tmp / "b.json").write_text("{}")
    renamed = events.index(("replace", str(final)))
    synced_before = {p for kind, p in events[:renamed] if kind == "fsync"}
    wanted = {str(tmp / "sub" / "a.bin"), str(tmp / "b.json"), str(tmp / "COMPLETE"), str(tmp / "sub"), str(tmp)}
    assert wanted <= synced_before, wanted - synced_before
    # after the rename, the parent folder: the new name itself must reach the disk
    assert ("fsync", str(final.parent)) in events[renamed:]
    manifest = json.loads((final / "COMPLETE").read_text())["files"]
    assert manifest == {"sub/a.bin": 10, "b.json": 2}


def test_stale_temp_folders_are_removed_and_listed(tmp_path):
    keep = write_checkpoint(tmp_path, 2)
    (tmp_path / "model").mkdir()
    stale = [tmp_path / "checkpoints" / ".step-00000004.tmp-999999", tmp_path / ".model.tmp-4242",
             tmp_path / ".actor.old-17"]
    for p in stale:
        (p / "x").mkdir(parents=True)
    mine = tmp_path / ".my-notes.tmp-1"  # not a name Relay writes: left alone
    mine.mkdir()
    removed = store.clean_stale(tmp_path)
    assert sorted(removed) == sorted(stale) and not any(p.exists() for p in stale)
    assert keep.exists() and (tmp_path / "model").exists() and mine.exists()
    line = store.stale_line(removed)
    assert "\n" not in line and "3 unfinished temp folder" in line and ".step-00000004.tmp-999999" in line


def test_ppo_start_removes_stale_temp_folders(tmp_path):
    """PPO used to leave a killed save's .tmp folder behind forever."""
    from relay.launch.ppo_checkpoint import PPOCheckpoints

    stale = tmp_path / "checkpoints" / ".step-00000003.tmp-123"
    stale.mkdir(parents=True)
    stub = SimpleNamespace(save_dir=tmp_path, cfg=SimpleNamespace(
        checkpoint_path=None, algo=SimpleNamespace(advantage_estimator="grpo")))
    stub._required_files = lambda: PPOCheckpoints._required_files(stub)
    assert PPOCheckpoints._maybe_resume(stub) is False
    assert not stale.exists()


# ---------------------------------------------------------------------------------------- keep the last N
def test_keep_last_n_and_drop_a_reused_folders_later_ones(tmp_path):
    for step in (2, 4, 6, 30):  # 30: an earlier, longer run in the same SAVE_DIR
        write_checkpoint(tmp_path, step)
    removed = store.prune(tmp_path, store.checkpoint_dir(tmp_path, 6), keep=2)
    assert [p.name for p in removed] == ["step-00000002", "step-00000030"]
    assert [p.name for p in store.complete_checkpoints(tmp_path)] == ["step-00000004", "step-00000006"]
    assert store.prune(tmp_path, store.checkpoint_dir(tmp_path, 6), keep=0) == []  # 0 keeps all


def test_save_with_retention_reports_size_and_seconds(tmp_path):
    for step in (1, 2):
        write_checkpoint(tmp_path, step)

    def write(tmp: Path) -> None:
        (tmp / "blob").write_bytes(b"z" * 5000)

    report = store.save_with_retention(store.checkpoint_dir(tmp_path, 3), write, keep=2)
    on_disk = sum(p.stat().st_size for p in report.path.rglob("*") if p.is_file())
    assert report.bytes == on_disk and 5000 < on_disk < 6000
    assert [p.name for p in report.removed] == ["step-00000001"]
    line = report.line()
    assert line.startswith(f"checkpoint {report.path}: ") and f"{on_disk / 1000:.1f} KB in " in line and " s; removed step-00000001" in line


# ------------------------------------------------------------------------------------- corrupt checkpoints
def corrupt(path: Path, how: str) -> Path:
    """Damage one file of checkpoint `path` the way a crash or a bad disk would; return that file."""
    if how == "truncated safetensors":
        f = path / "model" / "model.safetensors"
        f.write_bytes(f.read_bytes()[:-16])
    elif how == "garbage safetensors":
        f = path / "rng.safetensors"
        f.write_bytes(b"\x00" * 4 + f.read_bytes()[4:])
    elif how == "bad JSON":
        f = path / "trainer_state.json"
        f.write_text('{"step": 3,')
    elif how == "missing file":
        f = path / "model" / "config.json"
        f.unlink()
    elif how == "missing folder":
        f = path / "optimizer"
        for p in f.iterdir():
            p.unlink()
        f.rmdir()
    elif how == "shorter optimizer shard":
        f = path / "optimizer" / "pytorch_optim.bin"
        f.write_bytes(b"x" * 50)
    return f


@pytest.mark.parametrize("how, says", [
    ("truncated safetensors", "unreadable safetensors"),
    ("garbage safetensors", "unreadable safetensors"),
    ("bad JSON", "bad JSON"),
    ("missing file", "missing"),
    ("missing folder", "missing"),
    ("shorter optimizer shard", "50 bytes, but 100 were written"),
])
def test_a_corrupt_checkpoint_names_the_file_and_the_problem(tmp_path, how, says):
    path = write_checkpoint(tmp_path, 3)
    verify_checkpoint(path, REQUIRED)  # whole: no error
    bad = corrupt(path, how)
    with pytest.raises(CheckpointError) as err:
        verify_checkpoint(path, REQUIRED)
    assert str(err.value).startswith(f"{bad}: ") and says in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


def test_an_unmarked_folder_and_a_missing_index_shard_are_named(tmp_path):
    path = write_checkpoint(tmp_path, 3)
    (path / "COMPLETE").unlink()
    with pytest.raises(CheckpointError, match=r"COMPLETE: missing: the checkpoint was not completely written"):
        verify_checkpoint(path, REQUIRED)
    path = write_checkpoint(tmp_path, 4)
    index = {"weight_map": {"w": "model-00001-of-00002.safetensors", "v": "model-00002-of-00002.safetensors"}}
    (path / "model" / "model.safetensors.index.json").write_text(json.dumps(index))
    (path / "COMPLETE").write_text("ok\n")  # a marker from before sizes were recorded: still checked for format
    with pytest.raises(CheckpointError) as err:
        verify_checkpoint(path, REQUIRED)
    assert str(err.value).startswith(str(path / "model" / "model-00001-of-00002.safetensors") + ": missing")


def test_load_trainer_state_names_a_bad_file(tmp_path):
    save_trainer_state(tmp_path, {"step": 1})
    (tmp_path / "rng.safetensors").write_bytes(b"nope")
    with pytest.raises(CheckpointError, match=r"rng.safetensors: unreadable safetensors"):
        load_trainer_state(tmp_path)
    (tmp_path / "trainer_state.json").write_text("{")
    with pytest.raises(CheckpointError, match=r"trainer_state.json: bad JSON"):
        load_trainer_state(tmp_path, restore=False)


# ----------------------------------------------------------------------------------------- resume auto
def test_resume_auto_takes_the_newest_complete_checkpoint(tmp_path):
    lines: list[str] = []
    assert find_resume("auto", tmp_path, REQUIRED, lines.append) is None
    assert lines == [f"resume auto: no complete checkpoint in {tmp_path / 'checkpoints'}: starting fresh"]
    write_checkpoint(tmp_path, 2)
    write_checkpoint(tmp_path, 4)
    (tmp_path / "checkpoints" / "step-00000009").mkdir()  # half-written (no COMPLETE): never chosen
    lines.clear()
    assert find_resume("auto", tmp_path, REQUIRED, lines.append) == store.checkpoint_dir(tmp_path, 4)
    assert lines == [f"resume auto: resuming from {store.checkpoint_dir(tmp_path, 4)}"]
    assert find_resume(None, tmp_path, REQUIRED, lines.append) is None  # no resume asked for


def test_resume_auto_skips_a_corrupt_newest_but_a_named_one_is_an_error(tmp_path):
    write_checkpoint(tmp_path, 2)
    newest = write_checkpoint(tmp_path, 4)
    bad = corrupt(newest, "truncated safetensors")
    lines: list[str] = []
    assert find_resume("auto", tmp_path, REQUIRED, lines.append) == store.checkpoint_dir(tmp_path, 2)
    assert lines[0].startswith(f"resume auto: skipping step-00000004: {bad}: unreadable safetensors")
    with pytest.raises(CheckpointError, match="unreadable safetensors"):
        find_resume(str(newest), tmp_path, REQUIRED, lines.append)
    corrupt(store.checkpoint_dir(tmp_path, 2), "bad JSON")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        find_resume("auto", tmp_path, REQUIRED, lines.append)


# ------------------------------------------------------------------------------------------- metrics.jsonl
def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path):
    logger = MetricsLogger(tmp_path, use_tensorboard=False)
    for step in (1, 2, 3):
        logger.log(step, {"loss": float(step)})
    logger.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "time": 1.2, "lo')  # killed mid-write
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]  # `relay plot` of a killed run works
    notes: list[str] = []
    resumed = MetricsLogger(tmp_path, use_tensorboard=False, resume_step=4, note=notes.append)
    resumed.log(4, {"loss": 4.0})
    resumed.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines] == [1, 2, 3, 4]
    assert len(notes) == 1 and "dropped a torn last line" in notes[0] and str(tmp_path / "metrics.jsonl") in notes[0]


def test_a_bad_metrics_line_in_the_middle_is_an_error_naming_the_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 is not JSON"):
        MetricsLogger(tmp_path, use_tensorboard=False, resume_step=3)


def test_a_folder_fsync_the_file_system_cannot_do_is_skipped_but_a_write_error_is_not(tmp_path, monkeypatch):
    import errno
    import stat

    real_fsync = os.fsync

    def fsync(fd: int, failure: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(failure, os.strerror(failure))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", lambda fd: fsync(fd, errno.EINVAL))  # e.g. a FUSE mount
    write_checkpoint(tmp_path, 1)
    assert store.is_complete(store.checkpoint_dir(tmp_path, 1))
    monkeypatch.setattr(os, "fsync", lambda fd: fsync(fd, errno.EIO))
    with pytest.raises(OSError):
        write_checkpoint(tmp_path, 2)
    assert not store.checkpoint_dir(tmp_path, 2).exists()
    assert not list((tmp_path / "checkpoints").glob(".step-*"))  # the temp folder went with the failure


def test_bf16_weights_pass_the_header_check(tmp_path):
    save_file({"w": torch.ones(4, dtype=torch.bfloat16)}, str(tmp_path / "w.safetensors"))
    (tmp_path / "COMPLETE").write_text(json.dumps({"files": {"w.safetensors": (tmp_path / "w.safetensors").stat().st_size}}))
    verify_checkpoint(tmp_path)
