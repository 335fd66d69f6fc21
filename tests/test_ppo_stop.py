"""The PPO driver's checkpoint and stop logic on stand-in actors (no Ray, vLLM or ColossalAI): a stop request
checkpoints the episodes trained since the last save and skips the final export, checkpoints keep the last N,
and `checkpoint_path=auto` resumes the newest one. tests/test_ppo_e2e.py runs the real actors."""
from __future__ import annotations

import signal
from pathlib import Path
from types import SimpleNamespace

import pytest

from relay.config import load_config
from relay.data.batches import BatchOrder
from relay.launch import ppo as ppo_module
from relay.launch import safe_points
from relay.launch.ppo import PPOSystem, run_ppo
from relay.launch.ppo_checkpoint import PPOState
from relay.learners.checkpoint_store import checkpoint_dir, complete_checkpoints


class FakeLearners:
    """Writes and reads what a LearnerGroup checkpoint holds, with its optimizer-step count as the state."""

    def __init__(self) -> None:
        self.loaded: list[Path] = []

    def save_checkpoint(self, path: Path) -> None:
        (path / "model").mkdir(parents=True)
        (path / "model" / "config.json").write_text("{}")
        (path / "optimizer").mkdir()
        (path / "optimizer" / "state.bin").write_bytes(b"o" * 32)

    def load_checkpoint(self, path: Path) -> None:
        self.loaded.append(Path(path))


class StubSystem(PPOSystem):
    """PPOSystem with its actors replaced; `start` puts it where a run `trained` episodes in would be."""

    trained = 0
    instances: list["StubSystem"] = []

    def start(self) -> "StubSystem":
        self.actor, self.critic = FakeLearners(), FakeLearners()
        self.prompt_order = BatchOrder(10, 2, seed=0)
        self.ptx_order = None
        self.scorers = SimpleNamespace(moments=SimpleNamespace(mean=0.5, var=2.0, count=7))
        self.kl_ctl = SimpleNamespace(value=0.1)
        self.eval_prompts = []
        self.state = PPOState(episode=0, kl_coef=0.1)
        if not self._maybe_resume():
            self.state = PPOState(episode=self.trained, version=self.trained, kl_coef=0.1)
        StubSystem.instances.append(self)
        return self

    def sync_weights(self) -> float:
        return 0.0

    def close(self) -> None:
        self.closed = True


def cfg_for(save_dir: Path, *sets: str):
    return load_config("ppo", None, [f"save_dir={save_dir}", "algo.num_episodes=10", *sets])


@pytest.fixture
def stub(monkeypatch):
    monkeypatch.setattr(ppo_module, "PPOSystem", StubSystem)
    StubSystem.instances = []
    return StubSystem


def test_a_stop_request_checkpoints_and_skips_the_final_export(stub, tmp_path):
    stub.trained = 3  # three episodes trained, none saved yet
    with safe_points.stop_on_signals(grace_s=60) as stop:
        stop.request(signal.SIGTERM)
        assert run_ppo(cfg_for(tmp_path)) == 0
    system = stub.instances[-1]
    ckpt = checkpoint_dir(tmp_path, 3)
    assert system.stopped and system.closed and (ckpt / "COMPLETE").exists()
    assert stop.outcome == f"stopped by SIGTERM after episode 3 of 10; checkpoint {ckpt}"
    assert not (tmp_path / "actor").exists()  # unfinished: no final HF folders


def test_checkpoints_keep_the_last_n_and_resume_auto_takes_the_newest(stub, tmp_path, capsys):
    system = StubSystem(cfg_for(tmp_path, "keep_checkpoints=2"))
    stub.trained = 0
    system.start()
    for episode in (1, 2, 3):
        system.state.episode = system.state.version = episode
        system.save_checkpoint()
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]
    assert f"checkpoint {checkpoint_dir(tmp_path, 3)}: " in capsys.readouterr().err

    resumed = StubSystem(cfg_for(tmp_path, "checkpoint_path=auto")).start()
    assert resumed.state.episode == 3 and resumed.actor.loaded == [checkpoint_dir(tmp_path, 3) / "actor"]
    assert resumed.scorers.moments.count == 7
    with safe_points.stop_on_signals(grace_s=60) as stop:
        stop.request(signal.SIGTERM)
        resumed.run_episodes()
    # nothing trained since the checkpoint it resumed from: no second copy, the stop names that one
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]
    assert stop.outcome == f"stopped by SIGTERM after episode 3 of 10; checkpoint {checkpoint_dir(tmp_path, 3)}"
