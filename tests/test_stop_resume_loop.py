"""The `relay sft|rm|dpo` driver loop stops at a safe point on SIGTERM, writes a checkpoint, keeps the last N, and
`checkpoint_path=auto` (`--resume auto`) finishes the run with every step trained exactly once.

The learner group is a stand-in that counts its optimizer steps in its checkpoint (no Ray, no ColossalAI), so
this runs the real driver code in seconds; tests/test_train_stages.py covers the real group.
"""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from relay.config import load_config
from relay.launch import safe_points
from relay.launch.prepare_cmd import PrepareOptions, prepare
from relay.launch.train import train
from relay.learners.checkpoint_store import complete_checkpoints


class CountingGroup:
    """A learner group whose whole state is the number of optimizer steps it took."""

    def __init__(self, model_dir: Path, kill_at: int | None = None):
        self.model_dir, self.kill_at = model_dir, kill_at
        self.steps = 0
        self.batches: list[list[list[int]]] = []

    def rebuild(self, **_: object) -> None:
        self.steps = 0

    def set_lr(self, lr: float) -> None:
        pass

    def train_step(self, batch: dict, *_: object, **__: object) -> dict[str, float]:
        import torch

        self.steps += 1
        self.batches.append(batch["input_ids"].tolist())
        if self.steps == self.kill_at:
            os.kill(os.getpid(), signal.SIGTERM)  # `ray job stop` / preemption, mid-step
        return {"loss": 1.0 / self.steps, "step": float(self.steps), "grad_norm": float(torch.tensor(1.0))}

    def save_checkpoint(self, path: Path) -> dict:
        import torch

        (path / "model").mkdir(parents=True)
        (path / "model" / "config.json").write_text((self.model_dir / "config.json").read_text())
        save_file({"steps": torch.tensor([self.steps])}, str(path / "model" / "model.safetensors"))
        (path / "optimizer").mkdir()
        (path / "optimizer" / "state.bin").write_bytes(b"o" * 64)
        return {"path": str(path), "step": self.steps}

    def load_checkpoint(self, path: Path) -> dict:
        self.steps = int(load_file(str(Path(path) / "model" / "model.safetensors"))["steps"][0])
        return {"path": str(path), "step": self.steps}


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory, tiny_llama_dir) -> str:
    root = tmp_path_factory.mktemp("stop-data")
    raw = root / "sft.jsonl"
    rows = [{"messages": [{"from": "human", "content": f"question {i}"},
                          {"from": "assistant", "content": f"answer number {i}"}]} for i in range(16)]
    raw.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepare(PrepareOptions("sft", [str(raw)], str(root / "sft"), tokenizer=str(tiny_llama_dir), max_length=64,
                           progress=False))
    return str(root / "sft")


def run(model: Path, data: str, save_dir: Path, group: CountingGroup, *sets: str):
    cfg = load_config("sft", None, [f"model.pretrain={model}", "learner.num_ranks=1", f"dataset={data}",
                                    f"save_dir={save_dir}", "batch_size=2", "max_steps=8", "logging.log_interval=0",
                                    "logging.use_tensorboard=false", *sets])
    return train(cfg, "sft", group=group)


def test_sigterm_checkpoints_at_the_next_step_and_resume_auto_finishes(tiny_llama_dir, sft_data, tmp_path, capsys):
    straight = CountingGroup(tiny_llama_dir)
    run(tiny_llama_dir, sft_data, tmp_path / "straight", straight, "save_interval=2")
    assert straight.steps == 8

    out = tmp_path / "stopped"
    first = CountingGroup(tiny_llama_dir, kill_at=5)
    with safe_points.stop_on_signals(grace_s=60) as stop:
        result = run(tiny_llama_dir, sft_data, out, first, "save_interval=2", "keep_checkpoints=2")
    assert result.stopped and first.steps == 5  # stopped after the step the signal arrived in
    assert stop.outcome == f"stopped by SIGTERM after step 5 of 8; checkpoint {out / 'checkpoints' / 'step-00000005'}"
    assert [p.name for p in complete_checkpoints(out)] == ["step-00000004", "step-00000005"]  # last 2 kept
    assert not (out / "model").exists()  # not finished: no final model
    text = capsys.readouterr().out
    assert f"checkpoint {out / 'checkpoints' / 'step-00000005'}: " in text and " s; removed step-00000002" in text

    leftover = out / "checkpoints" / ".step-00000006.tmp-999999"  # what a SIGKILL mid-save would leave
    (leftover / "model").mkdir(parents=True)
    second = CountingGroup(tiny_llama_dir)
    result = run(tiny_llama_dir, sft_data, out, second, "save_interval=2", "checkpoint_path=auto")
    text = capsys.readouterr().out
    assert not result.stopped and second.steps == 8  # 5 restored + 3 trained: none lost, none twice
    assert first.batches[:5] + second.batches == straight.batches  # the data order continued exactly
    assert not leftover.exists() and "removed 1 unfinished temp folder(s)" in text
    assert f"resume auto: resuming from {out / 'checkpoints' / 'step-00000005'}" in text
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert int(load_file(str(out / "model" / "model.safetensors"))["steps"][0]) == 8


def test_resume_auto_without_checkpoints_starts_fresh(tiny_llama_dir, sft_data, tmp_path, capsys):
    group = CountingGroup(tiny_llama_dir)
    run(tiny_llama_dir, sft_data, tmp_path / "fresh", group, "checkpoint_path=auto", "max_steps=2")
    assert group.steps == 2
    assert f"resume auto: no complete checkpoint in {tmp_path / 'fresh' / 'checkpoints'}: starting fresh" in \
        capsys.readouterr().out


def test_a_signal_before_the_first_step_writes_no_checkpoint(tiny_llama_dir, sft_data, tmp_path):
    group = CountingGroup(tiny_llama_dir)
    with safe_points.stop_on_signals(grace_s=60) as stop:
        stop.request(signal.SIGTERM)  # e.g. while the learners were starting
        result = run(tiny_llama_dir, sft_data, tmp_path / "early", group)
    assert result.stopped and group.steps == 0 and result.checkpoint is None
    assert not complete_checkpoints(tmp_path / "early")
    assert stop.outcome == "stopped by SIGTERM after step 0 of 8; no checkpoint yet (nothing trained)"
