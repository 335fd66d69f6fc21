"""Fault matrix, the generator's vLLM engine process: the EngineCore process SIGKILLed by PID inside a live
generator actor, mid-episode and while idle; real everything (multi-process vLLM generator, ColossalAI learner,
Ray actors), the tiny GRPO run with its engine in a process of its own (`generation.in_process=false`; on CPU the
engine otherwise lives inside the actor, whose death the pool already handles).

Mid-episode: right after the driver dispatched episode 2's prompts, the busy generator's engine process (pid from
its `health()`) is killed. The generator notices (EngineWatch), its generate call raises GeneratorBroken, and the
pool kills and replaces it as if the actor had died: the prompts go back to the queue and the replacement, which
loads the current weights first, produces them. Checked: the run finishes its episodes; every episode trained
on its 16 sample ids once, and each prompt was collected once (episode 2's on their second attempt, from the
replacement); the pool counts one failure (metrics.jsonl: restarts_generators) and says why. Printed: kill ->
the pool knowing, kill -> the replacement active.

Idle: after the run, the engine of the idle generator is killed and the pool stepped as a driver would: its
health check finds the broken generator; printed: kill -> found.
"""
from __future__ import annotations

import os
import signal
import statistics
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from taken_ids import system_recording_taken_ids  # tests/faults/ is on sys.path under pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 300
EPISODES = 3
KILL_EPISODE = 1  # 0-based: episode 2


@pytest.fixture(scope="module")
def prompt_data(tiny_demo_data):
    return tiny_demo_data / "prompt"


def _cfg(prompt_data, save_dir):
    from relay.config import load_config, validate

    # 48 new tokens (not 8) so that the kill meets a generate call at work, not one already finished
    sets = [f"prompt_dataset={prompt_data}", f"save_dir={save_dir}", "logging.use_tensorboard=false",
            f"cluster.timeout_s={TIMEOUT}", f"algo.num_episodes={EPISODES}", "save_every_minutes=0",
            "generation.in_process=false", "generation.max_new_tokens=48"]
    cfg = load_config("ppo", REPO / "configs/ppo_tiny_grpo.yaml", sets)
    validate(cfg, "cpu")
    return cfg


def _engine_pids(pool, name: str) -> list[int]:
    return list(pool.clients()[name].health(timeout_s=30)["engine_pids"])


class EngineKiller:
    """Spies on the pool's submit/collect (call-through): records what each episode collected, and right after
    the driver's dispatching collect of episode `episode` SIGKILLs the busy generator's engine process (pids
    fetched before the dispatch, so the kill follows it within milliseconds). A side thread times the pool."""

    def __init__(self, system, episode: int):
        self.system, self.pool, self.episode = system, system.pool, episode
        self.results: list = []
        self.killed: dict | None = None
        self.noticed_s: float | None = None
        self.replaced_s: float | None = None
        self._armed: dict | None = None
        self._thread: threading.Thread | None = None
        real_submit, real_collect = self.pool.submit, self.pool.collect

        def submit(prompts, sampling=None, ids=None):
            if self.killed is None and ids and str(ids[0]).startswith(f"e{self.episode}-"):
                (name,) = self.pool.status()["members"]  # one generator: it gets the chunk
                self._armed = {"name": name, "engine_pids": _engine_pids(self.pool, name)}
            return real_submit(prompts, sampling, ids)

        def collect(timeout_s=0.0, ids=None):
            out = real_collect(timeout_s=timeout_s, ids=ids)
            self.results += out
            if self._armed is not None:  # the driver's dispatching collect right after submit
                armed, self._armed = self._armed, None
                self._kill(armed)
            return out

        self.pool.submit, self.pool.collect = submit, collect

    def _kill(self, armed: dict) -> None:
        member = self.pool.status()["members"][armed["name"]]
        (engine_pid,) = armed["engine_pids"]
        failed_before = self.pool.counters["failed"]
        t0 = time.monotonic()
        os.kill(engine_pid, signal.SIGKILL)
        self.killed = {**armed, "engine_pid": engine_pid, "actor_pid": member["pid"], "busy": member["busy"]}

        def measure():
            deadline = t0 + 2 * TIMEOUT
            while time.monotonic() < deadline and self.replaced_s is None:
                if self.noticed_s is None and self.pool.counters["failed"] > failed_before:
                    self.noticed_s = time.monotonic() - t0
                members = self.pool.status()["members"]
                if any(m["state"] == "active" for n, m in members.items() if n != armed["name"]):
                    self.replaced_s = time.monotonic() - t0
                time.sleep(0.05)

        self._thread = threading.Thread(target=measure, daemon=True)
        self._thread.start()

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join(2 * TIMEOUT)


@pytest.fixture(scope="module")
def engine_system(ray_session, prompt_data, tmp_path_factory):
    yield from system_recording_taken_ids(_cfg(prompt_data, tmp_path_factory.mktemp("faults") / "engine"))


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_engine_killed_mid_episode_generator_is_replaced(engine_system, log_lines):
    from relay.config import ppo_buffer_size
    from relay.metrics import read_metrics

    system, taken = engine_system
    pool_log = log_lines("relay.actors.pool")
    (first,) = system.pool.status()["members"]
    assert len(_engine_pids(system.pool, first)) == 1  # multi-process: one EngineCore process to watch
    killer = EngineKiller(system, KILL_EPISODE)
    records = system.run_episodes()
    killer.join()

    victim = killer.killed
    assert victim is not None, "the kill did not happen"
    assert victim["busy"], "the generator did not hold the episode's prompts when its engine was killed"
    assert _gone(victim["engine_pid"]) and _gone(victim["actor_pid"])  # the pool killed the half-alive actor
    status = system.pool.status()
    assert status["failed"] == 1 and status["active"] == 1 and status["start_failures"] == 0, status
    assert status["reassigned"] == 4, status  # the episode's 4 prompts went back to the queue once
    (replacement,) = status["members"]
    assert replacement != victim["name"]
    failures = [line for line in pool_log if "failed (" in line]
    assert len(failures) == 1 and victim["name"] in failures[0], pool_log
    assert "vLLM engine process" in failures[0] and f"pid {victim['engine_pid']}" in failures[0], failures

    # the run and its bookkeeping: every episode once, each trained on its own 16 samples once
    size, nus = ppo_buffer_size(system.cfg), system.cfg.algo.num_update_steps
    assert size == 16 and [r["episode"] for r in records] == list(range(1, EPISODES + 1))
    for ep, rec in enumerate(records):
        assert rec["weight_version"] == (ep + 1) * nus == rec["gen_version_min"], rec
        assert rec["samples"] == rec["buffer_size"] == size, rec
        ids = taken[ep]
        assert len(ids) == len(set(ids)) == size and all(s.startswith(f"e{ep}-") for s in ids), ids
    collected = [str(r.prompt_id) for r in killer.results]
    assert len(collected) == len(set(collected)) == EPISODES * 4, Counter(collected).most_common(3)
    killed_ep = [r for r in killer.results if str(r.prompt_id).startswith(f"e{KILL_EPISODE}-")]
    assert {r.generator for r in killed_ep} == {replacement} and all(r.attempts == 2 for r in killed_ep)
    # the replacement loaded the current weights before it took the re-queued prompts
    assert all(r.weight_version == KILL_EPISODE * nus for r in killed_ep)
    assert {taken_id.rsplit("/", 1)[0] for taken_id in taken[KILL_EPISODE]} == {str(r.prompt_id) for r in killed_ep}
    rows = read_metrics(system.save_dir)
    assert [r["step"] for r in rows] == list(range(1, EPISODES + 1))
    assert [r["restarts_generators"] for r in rows] == [int(r["step"] > KILL_EPISODE) for r in rows], rows

    others = [r["episode_s"] for r in records if r["episode"] != KILL_EPISODE + 1]
    noticed = f"{killer.noticed_s:.1f} s" if killer.noticed_s is not None else "not measured"
    replaced = f"{killer.replaced_s:.1f} s" if killer.replaced_s is not None else "not measured"
    print(f"\n[fault] engine process of {victim['name']} SIGKILLed (pid {victim['engine_pid']}) just after episode "
          f"{KILL_EPISODE + 1}'s dispatch: pool knew after {noticed}, replacement active after {replaced}; that "
          f"episode {records[KILL_EPISODE]['episode_s']:.1f} s vs median {statistics.median(others):.1f} s of the "
          f"others; {size} samples per episode, each once; {len(killed_ep)} prompts re-run once")
    print(f"[fault]   {failures[0][:300]}")


def test_engine_of_an_idle_generator_is_found_by_the_health_check(engine_system, log_lines):
    system, _ = engine_system
    if system.state.episode != EPISODES:
        pytest.skip("needs the run test_engine_killed_mid_episode_generator_is_replaced leaves")
    pool = system.pool
    pool_log = log_lines("relay.actors.pool")
    (name,) = pool.status()["members"]
    (engine_pid,) = _engine_pids(pool, name)
    failed_before = pool.counters["failed"]
    t0 = time.monotonic()
    os.kill(engine_pid, signal.SIGKILL)
    found_s = None
    while time.monotonic() - t0 < 60:  # the driver's loop: step the pool, collect nothing
        pool.collect(timeout_s=0.2, ids=[])
        if pool.counters["failed"] > failed_before:
            found_s = time.monotonic() - t0
            break
    assert found_s is not None, f"a generator with a dead engine went unnoticed for 60 s: {pool.status()}"
    assert name not in pool.status()["members"] and len(pool.status()["members"]) == 1  # its replacement starts
    failures = [line for line in pool_log if "failed (" in line]
    assert len(failures) == 1 and "health:" in failures[0] and "while idle" in failures[0], pool_log
    print(f"\n[fault] engine process of idle {name} SIGKILLed (pid {engine_pid}): found by the pool's health check "
          f"after {found_s:.1f} s (health_interval_s {pool.options.health_interval_s:g})")
    print(f"[fault]   {failures[0][:300]}")
