"""A tiny fp32 sync PPO run (generator, reference, rule reward, actor with ptx, critic) repeated with the same seed
and config gives the same metrics, timing fields aside. The two drivers are separate `relay ppo` processes with
different PYTHONHASHSEED values (as two real runs are), so an order that depends on string hashing shows up."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TIMING = ("time", "sync_share")


def overrides(data: Path, save_dir: Path, address: str) -> list[str]:
    return [f"prompt_dataset={data / 'prompt'}", f"pretrain_dataset={data / 'ptx'}", f"save_dir={save_dir}",
            f"cluster.address={address}", "logging.use_tensorboard=false", "cluster.timeout_s=300",
            "generation.num_generators=1", "generation.max_new_tokens=8", "actor_learner.plugin=ddp",
            "actor_learner.tp=1", "actor_learner.num_ranks=1", "algo.num_episodes=2", "algo.experience_batch_size=4",
            "algo.train_batch_size=2", "algo.accumulation_steps=2", "algo.num_update_steps=2", "algo.ptx_coef=0.1",
            "algo.entropy_coef=0.01"]


def comparable(rows: list[dict]) -> list[dict]:
    """Metrics without wall-clock fields (*_s seconds, *_per_s rates, time, sync_share)."""
    return [{k: v for k, v in r.items() if k not in TIMING and not k.endswith("_s")} for r in rows]


def test_same_seed_gives_the_same_metrics(ray_session, tiny_demo_data, tmp_path):
    import ray

    from relay.metrics import read_metrics

    address = ray.get_runtime_context().gcs_address
    runs = []
    for name, hash_seed in (("first", "1"), ("second", "2")):
        cmd = [str(BIN / "relay"), "ppo", "--config", str(REPO / "configs/ppo_tiny.yaml")]
        for item in overrides(tiny_demo_data, tmp_path / name, address):
            cmd += ["--set", item]
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
        runs.append(comparable(read_metrics(tmp_path / name)))
    first, second = runs
    # KL to the reference: 0 (or float noise) before the first update, then the actor has moved
    assert len(first) == 2 and first[0]["ptx_loss"] > 0 and first[1]["kl"] != 0
    for a, b in zip(first, second):
        diff = {k: (a[k], b.get(k)) for k in a if a[k] != b.get(k)}
        assert not diff and a.keys() == b.keys(), diff
