"""Schedule, resumable batch order, collation and crash-safe checkpoint folders. No Ray."""
from __future__ import annotations

import random

import pytest
import torch

from relay.data.batches import BatchOrder, collate_preference, collate_prompts, collate_sft
from relay.learners.checkpoint import load_trainer_state, save_trainer_state
from relay.learners.checkpoint_resume import resolve_resume
from relay.learners.checkpoint_store import atomic_dir, checkpoint_dir, latest_checkpoint
from relay.learners.schedule import lr_at


def test_schedule_warms_up_then_decays_to_floor():
    lrs = [lr_at(s, 1.0, total_steps=10, warmup_steps=2, min_lr_ratio=0.1) for s in range(12)]
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    assert lrs[10] == pytest.approx(0.1) and lrs[11] == pytest.approx(0.1)


def test_batch_order_resumes_exactly():
    full = BatchOrder(10, 3, seed=7)
    straight = [full.next_batch() for _ in range(7)]  # crosses an epoch boundary (3 batches / epoch)
    first = BatchOrder(10, 3, seed=7)
    head = [first.next_batch() for _ in range(4)]
    resumed = BatchOrder(10, 3, seed=7)
    resumed.load_state_dict(first.state_dict())
    assert head + [resumed.next_batch() for _ in range(3)] == straight
    assert len(set(sum(straight[:3], []))) == 9  # no repeats within an epoch
    with pytest.raises(ValueError, match="same data"):
        BatchOrder(11, 3).load_state_dict(first.state_dict())
    with pytest.raises(ValueError, match="fewer than one global batch"):
        BatchOrder(2, 3)


def test_collate_shapes_and_padding():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    b = collate_sft(rows, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    pref = collate_preference([{"chosen_input_ids": [1, 2], "chosen_labels": [-100, 2],
                                "rejected_input_ids": [1, 3, 4], "rejected_labels": [-100, 3, 4]}], pad_id=0)
    assert pref["input_ids"].shape == (2, 3) and int(pref["num_pairs"]) == 1
    p = collate_prompts([{"input_ids": [1, 2, 3]}, {"input_ids": [4]}], pad_id=0)
    assert p["input_ids"].tolist() == [[1, 2, 3], [0, 0, 4]]


def test_atomic_dir_keeps_last_complete_checkpoint(tmp_path):
    with atomic_dir(checkpoint_dir(tmp_path, 2)) as d:
        (d / "x").write_text("2")
    with pytest.raises(RuntimeError):
        with atomic_dir(checkpoint_dir(tmp_path, 4)) as d:
            (d / "x").write_text("partial")
            raise RuntimeError("killed mid-save")
    assert latest_checkpoint(tmp_path).name == "step-00000002"
    assert resolve_resume(str(tmp_path)) == checkpoint_dir(tmp_path, 2)
    assert not checkpoint_dir(tmp_path, 4).exists()
    with pytest.raises(FileNotFoundError):
        resolve_resume(str(tmp_path / "nothing"))


def test_trainer_state_restores_rng(tmp_path):
    random.seed(1)
    torch.manual_seed(1)
    save_trainer_state(tmp_path, {"step": 3})
    expected = (random.random(), torch.rand(3))
    random.seed(99)
    torch.manual_seed(99)
    state = load_trainer_state(tmp_path)
    assert state["step"] == 3
    assert random.random() == expected[0] and torch.equal(torch.rand(3), expected[1])
