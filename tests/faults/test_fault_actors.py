"""Fault matrix, restartable actors: the reference (relay/ref), the reward (relay/reward) and the buffer
(relay/buffer) SIGKILLed by PID in the middle of a PPO run, real everything (vLLM generator, ColossalAI learner,
Ray actors), tiny GRPO with a KL term so the reference is used.

One system for the three tests (vLLM and learner start-up are most of the cost on a 2-core machine), two
episodes each, in order (1-based): the reference dies as episode 2 is scored (just before its call goes out),
the reward as episode 4 is scored, the buffer right after it stored episode 6's experiences; then a NaN is
injected into episode 7's first update (the non-finite guard skips that step; the run goes on). Thin
call-through wrappers ("spies") on the clients do the killing and record the sample ids each episode trained
on; nothing is replaced.

Checked for each: the run finishes the planned episodes; every episode trained on exactly the planned samples
(16 distinct sample ids, all of that episode; `samples` in metrics.jsonl); the killed process is gone and a new
one serves the role; the driver logged the restart and metrics.jsonl counts it (restarts_<role>). Each test
prints how long the restart took (kill -> the role answering from its new process) and the killed episode's
time against the others'.
"""
from __future__ import annotations

import os
import signal
import statistics
import threading
import time
from pathlib import Path

import pytest
from taken_ids import system_recording_taken_ids  # tests/faults/ is on sys.path under pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 300
EPISODES = 8


@pytest.fixture(scope="module")
def prompt_data(tiny_demo_data):
    return tiny_demo_data / "prompt"


def _cfg(prompt_data, save_dir):
    from relay.config import load_config, validate

    sets = [f"prompt_dataset={prompt_data}", f"save_dir={save_dir}", "logging.use_tensorboard=false",
            f"cluster.timeout_s={TIMEOUT}", f"algo.num_episodes={EPISODES}", "algo.kl_coef=0.05",
            "cluster.max_restarts=2", "save_every_minutes=0"]
    cfg = load_config("ppo", REPO / "configs/ppo_tiny_grpo.yaml", sets)
    validate(cfg, "cpu")
    return cfg


class Killer:
    """Wraps one client method: at the chosen episode, SIGKILLs the client's actor process (pid from its info())
    just before the call goes out (`first=True`: the call meets a dead or restarting actor, so the driver waits
    for the restart; a tiny model scores in milliseconds, too fast to kill it mid-call reliably) or just after
    it returned; and times in a side thread how long until the role answers from a new process."""

    def __init__(self, system, client, method: str, episode: int, first: bool):
        self.system, self.client, self.episode = system, client, episode
        self.killed: dict | None = None
        self.restart_s: float | None = None
        self._thread: threading.Thread | None = None
        real = getattr(client, method)

        def spy(*args, **kwargs):
            now = self.killed is None and self.system.state.episode == self.episode
            if now and first:
                self._kill()
            out = real(*args, **kwargs)
            if now and not first:
                self._kill()
            return out

        setattr(client, method, spy)

    def _kill(self) -> None:
        pid = int(self.client.info()["pid"])
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        self.killed = {"pid": pid, "episode": self.episode}

        def measure():
            import ray

            deadline = t0 + 120
            while time.monotonic() < deadline:
                try:  # straight to the actor: the client's spy is not involved
                    info = ray.get(self.client.actor.stats.remote() if hasattr(self.client.actor, "stats")
                                   else self.client.actor.info.remote(), timeout=10)
                    if int(info["pid"]) != pid:
                        self.restart_s = time.monotonic() - t0
                        return
                except Exception:  # unavailable while it restarts
                    pass
                time.sleep(0.1)

        self._thread = threading.Thread(target=measure, daemon=True)
        self._thread.start()

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join(130)


@pytest.fixture(scope="module")
def fault_system(ray_session, prompt_data, tmp_path_factory):
    yield from system_recording_taken_ids(_cfg(prompt_data, tmp_path_factory.mktemp("faults") / "faults"))


def _check(system, taken, killer: Killer, role: str, records, first: int, out: str) -> None:
    """Bookkeeping of the episodes `first`.. (0-based) that `records` holds, the kill in `killer.episode`."""
    from relay.config import ppo_buffer_size
    from relay.metrics import read_metrics

    killer.join()
    assert killer.killed is not None, "the kill did not happen"
    with pytest.raises(ProcessLookupError):
        os.kill(killer.killed["pid"], 0)
    new_pid = int(getattr(system, role).info()["pid"])
    assert new_pid != killer.killed["pid"]
    size, nus = ppo_buffer_size(system.cfg), system.cfg.algo.num_update_steps
    assert size == 16
    for i, rec in enumerate(records):
        ep = first + i
        assert rec["episode"] == ep + 1 and rec["weight_version"] == (ep + 1) * nus, rec
        assert rec["samples"] == rec["buffer_size"] == size, rec
        ids = taken[ep]
        assert len(ids) == len(set(ids)) == size, ids  # each of the episode's samples exactly once
        assert all(s.startswith(f"e{ep}-") for s in ids), ids
    key = f"restarts_{role}"
    rows = read_metrics(system.save_dir)
    assert [r["step"] for r in rows] == list(range(1, first + len(records) + 1))
    assert all(r["samples"] == size for r in rows)
    assert [r[key] for r in rows[first:]] == [int(r["step"] > killer.episode) for r in rows[first:]], rows
    actor_name = f"relay/{role}@{system.run_name}"  # actor names carry the run (SAVE_DIR's last folder)
    assert f"{actor_name} was restarted (pid {killer.killed['pid']} -> {new_pid}" in out, out[-3000:]
    kill_rec = records[killer.episode - first]
    others = [r["episode_s"] for r in rows if r["step"] != killer.episode + 1]
    restart = f"{killer.restart_s:.1f} s" if killer.restart_s is not None else "not measured"
    print(f"\n[fault] {actor_name} SIGKILLed in episode {killer.episode + 1}: restart (kill -> new process "
          f"answering) {restart}; that episode {kill_rec['episode_s']:.1f} s (score {kill_rec['score_s']:.1f} s) "
          f"vs median {statistics.median(others):.1f} s of the others; {size} samples per episode, each once")
    for line in out.splitlines():  # what the driver said about it
        if actor_name in line:
            print(f"[fault]   {line.strip()[:240]}")


def test_killed_reference_restarts(fault_system, capsys):
    system, taken = fault_system
    assert system.ref is not None  # kl_coef > 0: the reference is used
    killer = Killer(system, system.ref, "logprobs_async", episode=1, first=True)  # as episode 2 is scored
    records = system.run_episodes(until=2)
    out = capsys.readouterr().err
    assert all(r["kl"] != 0.0 for r in records[1:])  # the restarted reference really scored
    _check(system, taken, killer, "ref", records, 0, out)


def test_killed_reward_restarts(fault_system, capsys):
    system, taken = fault_system
    if system.state.episode != 2:
        pytest.skip("needs the state test_killed_reference_restarts leaves (2 episodes)")
    killer = Killer(system, system.reward, "score_ids_async", episode=3, first=True)  # as episode 4 is scored
    records = system.run_episodes(until=4)
    out = capsys.readouterr().err
    _check(system, taken, killer, "reward", records, 2, out)


def test_killed_buffer_redoes_the_episode(fault_system, capsys):
    """The buffer dies right after it stored episode 6's experiences: Ray restarts it empty; the driver finds
    them missing, puts the episode again and trains on each sample once."""
    system, taken = fault_system
    if system.state.episode != 4:
        pytest.skip("needs the state test_killed_reward_restarts leaves (4 episodes)")
    killer = Killer(system, system.buffer, "put", episode=5, first=False)
    records = system.run_episodes(until=6)
    out = capsys.readouterr().err
    _check(system, taken, killer, "buffer", records, 4, out)
    assert "relay/buffer" in out and ("redoing its part of the episode" in out), out[-3000:]
    stats = system.buffer.stats()
    assert stats["balanced"] and stats["size"] == 0 and stats["put"] == stats["taken"] == 16, stats


def test_nan_gradient_is_skipped_counted_and_the_run_goes_on(fault_system, capsys):
    """Episode 7's first actor update gets NaN advantages: the learners skip that optimizer step (weights and
    optimizer state untouched), the episode reports the skipped step and its 16 experiences, and the run trains
    episodes 7 (second update) and 8 as usual."""
    import math

    import torch

    system, taken = fault_system
    if system.state.episode != 6:
        pytest.skip("needs the state test_killed_buffer_redoes_the_episode leaves (6 episodes)")
    real = system.actor.start_train_step  # what the update loop calls (then finish)
    poisoned = []

    def spy(batch, *args, **kwargs):
        if not poisoned and system.state.episode == 6:
            batch = {**batch, "advantages": torch.full_like(batch["advantages"], float("nan"))}
            poisoned.append(system.state.version)
        return real(batch, *args, **kwargs)

    system.actor.start_train_step = spy
    records = system.run_episodes(until=EPISODES)
    assert poisoned and [r["episode"] for r in records] == [7, 8]
    nan_ep, after = records
    assert nan_ep["nonfinite_skipped"] == 1.0 and nan_ep["samples_skipped"] == 16, nan_ep
    assert after["nonfinite_skipped"] == 0.0 and after["samples_skipped"] == 0, after
    assert math.isfinite(after["actor_loss"]) and after["weight_version"] == 8 * system.cfg.algo.num_update_steps
    for ep in (6, 7):
        ids = taken[ep]
        assert len(ids) == len(set(ids)) == 16 and all(s.startswith(f"e{ep}-") for s in ids), ids
    print(f"\n[fault] NaN advantages in episode 7's first update: {nan_ep['nonfinite_skipped']:.0f} step skipped, "
          f"{nan_ep['samples_skipped']:.0f} experiences reported untrained in that step; episode 8 loss "
          f"{after['actor_loss']:.4f}, reward {after['reward_mean']:.3f}")
