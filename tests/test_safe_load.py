"""torch.load safety: ColossalAI's optimizer (and .bin model) shards are read with weights_only=True whatever
the environment says, so a crafted checkpoint file cannot run code on resume. No Ray, no ColossalAI."""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from relay.learners.safe_load import weights_only_loads


class _Evil:
    """Pickles to a call of Path.touch(marker): plain unpickling creates the marker file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def _evil_shard(folder: Path) -> tuple[Path, Path]:
    marker = folder / "pwned"
    shard = folder / "pytorch_optim-00001.bin"
    torch.save({"state": {0: _Evil(str(marker))}, "param_groups": []}, shard)
    return shard, marker


def test_weights_only_context_refuses_pickled_code(tmp_path, monkeypatch):
    """Inside `weights_only_loads` torch refuses the crafted shard, even where TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1
    turned the weights-only default off; the environment is restored afterwards."""
    shard, marker = _evil_shard(tmp_path)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    monkeypatch.delenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", raising=False)
    with weights_only_loads():
        with pytest.raises(pickle.UnpicklingError):
            torch.load(shard, map_location="cpu")  # what ColossalAI's load_shard_state_dict does
    assert not marker.exists()
    assert os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1"
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ
    good = tmp_path / "good.bin"  # optimizer-shaped state still loads
    torch.save({"state": {0: {"exp_avg": torch.zeros(2), "step": torch.tensor(3.0)}},
                "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.95), "params": [0]}]}, good)
    with weights_only_loads():
        assert torch.load(good, map_location="cpu")["param_groups"][0]["betas"] == (0.9, 0.95)


def test_learner_checkpoint_load_refuses_a_pickled_optimizer_shard(tmp_path, monkeypatch):
    """`WeightsAndCheckpoints.load_checkpoint` (a learner rank resuming) with a booster whose load_optimizer
    torch.loads the folder's shard, as ColossalAI's does: the shard's code never runs."""
    import torch.distributed as dist

    from relay.learners.worker_state import WeightsAndCheckpoints

    root = tmp_path / "ckpt"
    (root / "optimizer").mkdir(parents=True)
    shard, marker = _evil_shard(root / "optimizer")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: None)
    booster = SimpleNamespace(load_optimizer=lambda _opt, path: torch.load(Path(path) / shard.name, map_location="cpu"))
    rank = SimpleNamespace(spec=SimpleNamespace(lora_rank=0, plugin="ddp"), booster=booster, optimizer=None,
                           model=None, step=0, _booster_model_io=lambda: False, _load_full_folder=lambda _f: None)
    with pytest.raises(pickle.UnpicklingError):
        WeightsAndCheckpoints.load_checkpoint(rank, str(root))
    assert not marker.exists()
