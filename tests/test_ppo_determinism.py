"""A tiny fp32 sync PPO run (generator, reference, rule reward, actor with ptx, critic) repeated with the same seed
and config gives the same metrics, timing fields aside. The two drivers are separate `relay ppo` processes with
different PYTHONHASHSEED values (as two real runs are), so an order that depends on string hashing shows up.

The first run is also the console's PPO check (the console as a person sees it, the suite's log settings removed):
one line per episode, none of the dependencies' output, vLLM's engine log in the generator's file. Sharing the run
saves a PPO start (about 90 s on 2 cores). Both runs attach to the suite's cluster: a cluster of their own, started
while the heaviest tests run, once missed the 30 s Ray gives a new raylet to register (the SFT console tests start
clusters of their own)."""
from __future__ import annotations

from pathlib import Path

import pytest

from console_util import REPO, noise_in, relay  # tests/ is on sys.path under pytest

pytestmark = pytest.mark.slow

TIMING = ("time", "sync_share")


def overrides(data: Path, save_dir: Path) -> list[str]:
    return [f"prompt_dataset={data / 'prompt'}", f"pretrain_dataset={data / 'ptx'}", f"save_dir={save_dir}",
            "logging.use_tensorboard=false", "cluster.timeout_s=300",
            "generation.num_generators=1", "generation.max_new_tokens=8", "actor_learner.plugin=ddp",
            "actor_learner.tp=1", "actor_learner.num_ranks=1", "algo.num_episodes=2", "algo.experience_batch_size=4",
            "algo.train_batch_size=2", "algo.accumulation_steps=2", "algo.num_update_steps=2", "algo.ptx_coef=0.1",
            "algo.entropy_coef=0.01"]


def comparable(rows: list[dict]) -> list[dict]:
    """Metrics without wall-clock fields (*_s seconds, *_per_s rates, time, sync_share)."""
    return [{k: v for k, v in r.items() if k not in TIMING and not k.endswith("_s")} for r in rows]


def ppo(*sets: str, hash_seed: str):
    args = ["ppo", "--config", str(REPO / "configs/ppo_tiny.yaml")]
    for item in sets:
        args += ["--set", item]
    out = relay(*args, timeout=900, PYTHONHASHSEED=hash_seed)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out


def check_console(out, run: Path) -> None:
    text = out.stdout + out.stderr
    episodes = [line for line in out.stderr.splitlines() if line.startswith("[relay ppo] episode ")]
    assert [line.split()[3] for line in episodes] == ["1/2", "2/2"], text[-4000:]
    assert all(" reward " in line and " kl " in line and " length " in line and line.endswith(" s")
               for line in episodes)
    assert not noise_in(text), (noise_in(text), text[-4000:])
    gen = (run / "logs" / "generator-0.log").read_text()
    assert "non-default args" in gen  # vLLM's engine log is kept, in the generator's file
    # two weight updates, two reload warnings from vLLM: explained once, the repeat dropped
    assert gen.count("Failed to load weights") == 1 and "expected, not an error" in gen
    assert (run / "logs" / "actor-rank0.log").exists() and (run / "logs" / "reward.log").exists()


def test_same_seed_gives_the_same_metrics_and_a_quiet_console(ray_session, tiny_demo_data, tmp_path):
    from relay.metrics import read_metrics

    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    address = f"cluster.address={ray_session.get_runtime_context().gcs_address}"
    check_console(ppo(*overrides(tiny_demo_data, first_dir), address, hash_seed="1"), first_dir)
    ppo(*overrides(tiny_demo_data, second_dir), address, hash_seed="2")
    first, second = (comparable(read_metrics(d)) for d in (first_dir, second_dir))
    # KL to the reference: 0 (or float noise) before the first update, then the actor has moved
    assert len(first) == len(second) == 2 and first[0]["ptx_loss"] > 0 and first[1]["kl"] != 0
    for a, b in zip(first, second):
        diff = {k: (a[k], b.get(k)) for k in a if a[k] != b.get(k)}
        assert not diff and a.keys() == b.keys(), diff
