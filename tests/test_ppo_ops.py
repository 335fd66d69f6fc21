"""PPO operations on a running system, real everything (vLLM generators, ColossalAI learners, Ray actors):

- scaling the generator pool mid-run the way a user does it (`relay scale RUN --generators 2` from another
  process, then `request_generators(1, ...)` back down),
- a generator process SIGKILLed by PID while it holds an episode's prompts,
- then GRPO learning the rule reward over the preset's 30 episodes (placement separate).

All share one tiny GRPO system (1 ddp actor rank, rule reward, no critic): vLLM and learner start-up are most
of the cost on a 2-core machine (`relay ppo` submitted with `ray job submit` is in tests/test_jobs.py). Thin call-through wrappers ("spies") on the pool's submit/collect and
the buffer's take_all record what each episode received; nothing is replaced.

Bookkeeping checked throughout: every generator's weight version equals the number of optimizer steps after
each update; samples produced at the current version agree with the learner (logprob_diff < 1e-3, which only
holds if the generator really loaded the weights); each prompt id is collected exactly once and the prompts
follow the data order (`BatchOrder`); each episode trains on exactly the seed's buffer size of unique sample
ids; the buffer's counters stay balanced (put == taken, no duplicates, nothing dropped).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RUN = "ops"  # save_dir name -> run name -> control actor relay/control-ops
TIMEOUT = 300


@pytest.fixture(scope="module")
def prompt_data(tiny_demo_data):
    return tiny_demo_data / "prompt"


def _cfg(prompt_data, save_dir, **overrides):
    from relay.config import load_config, validate

    sets = [f"prompt_dataset={prompt_data}", f"save_dir={save_dir}", "logging.use_tensorboard=false",
            f"cluster.timeout_s={TIMEOUT}"]
    sets += [f"{k}={v}" for k, v in overrides.items()]
    cfg = load_config("ppo", REPO / "configs/ppo_tiny_grpo.yaml", sets)
    validate(cfg, "cpu")
    return cfg


class Spy:
    """Records, per episode, the PromptResults the driver collected and the sample ids it took from the
    buffer; optionally SIGKILLs the busy generator right after an episode's prompts were dispatched."""

    def __init__(self, system):
        self.system = system
        self.results: list = []  # PromptResult, in collection order
        self.taken: dict[int, list[str]] = {}  # 0-based episode -> sample ids trained on
        self.kill_episode: int | None = None
        self.killed: dict | None = None
        self._armed = False
        pool, buf = system.pool, system.buffer
        real_submit, real_collect, real_take_all = pool.submit, pool.collect, buf.take_all

        def submit(prompts, sampling=None, ids=None):
            out = real_submit(prompts, sampling, ids)
            if self.kill_episode is not None and ids and str(ids[0]).startswith(f"e{self.kill_episode}-"):
                self._armed = True
            return out

        def collect(timeout_s=0.0, ids=None):
            out = real_collect(timeout_s=timeout_s, ids=ids)
            self.results += out
            if self._armed:  # the driver's dispatching collect right after submit: the chunk is in flight
                self._armed = False
                self._kill_busy()
            return out

        def take_all(*args, **kwargs):
            batches = real_take_all(*args, **kwargs)
            ids = [str(s) for b in batches for s in b.sample_ids]
            self.taken.setdefault(self.system.state.episode, []).extend(ids)
            return batches

        pool.submit, pool.collect, buf.take_all = submit, collect, take_all

    def _kill_busy(self) -> None:
        members = self.system.pool.status()["members"]
        busy = {name: m for name, m in members.items() if m["busy"]}
        assert busy, f"no generator holds the episode's prompts: {members}"
        name, m = sorted(busy.items())[0]
        os.kill(m["pid"], signal.SIGKILL)
        self.killed = {"name": name, "pid": m["pid"], "episode": self.kill_episode, "members": members}

    def by_episode(self) -> dict[int, list]:
        out: dict[int, list] = {}
        for r in self.results:
            ep = int(str(r.prompt_id).split("-")[0][1:])
            out.setdefault(ep, []).append(r)
        return out


@pytest.fixture(scope="class")
def ops_system(ray_session, prompt_data, tmp_path_factory):
    from relay.launch.ppo import PPOSystem

    save_dir = tmp_path_factory.mktemp("ppo_ops") / RUN
    cfg = _cfg(prompt_data, save_dir, placement="separate",  # a core per generator; the last test runs async
               **{"algo.num_episodes": 8, "generation.num_generators": 1})
    system = PPOSystem(cfg).start()
    spy = Spy(system)
    try:
        yield system, spy
    finally:
        system.close()


def _check_bookkeeping(system, spy, records, first_episode: int) -> None:
    """The invariants every episode must keep, whatever happened to the generators."""
    from relay.config import ppo_buffer_size
    from relay.data.batches import BatchOrder

    cfg, a = system.cfg, system.cfg.algo
    size = ppo_buffer_size(cfg)
    n = cfg.generation.n_samples_per_prompt
    per_episode = a.num_collect_steps * a.experience_batch_size
    order = BatchOrder(len(system.prompts), per_episode, cfg.seed)
    expected_prompts = [order.next_batch() for _ in range(system.state.episode)]
    maxlen = cfg.generation.max_prompt_length
    results = spy.by_episode()
    for i, rec in enumerate(records):
        ep = first_episode + i  # 0-based
        updates = (ep + 1) * a.num_update_steps
        assert rec["weight_version"] == updates == rec["gen_version_min"] == rec["gen_version_max"], rec
        assert rec["buffer_size"] == rec["samples"] == size, rec
        if rec["staleness_max"] == 0:
            assert rec["logprob_diff"] < 1e-3, (ep, rec["logprob_diff"])
        assert rec["approx_kl_first"] < 1e-6
        assert rec["kl"] == 0.0  # kl_coef 0: no reference actor, no KL
        # exactly once: each prompt id of the episode collected once, in the data order
        got = results[ep]
        assert sorted(str(r.prompt_id) for r in got) == sorted(f"e{ep}-{k}" for k in range(per_episode))
        for r in got:
            k = int(str(r.prompt_id).split("-")[1])
            want = list(system.prompts[expected_prompts[ep][k]]["input_ids"])[-maxlen:]
            assert all(list(s.prompt_token_ids) == want for s in r.samples)
            assert len(r.samples) == n
        # the experiences trained on: the seed's buffer size, unique, exactly the episode's samples
        taken = spy.taken[ep]
        assert len(taken) == len(set(taken)) == size
        assert set(taken) == {sid for r in got for sid in r.sample_ids()}
    all_ids = [str(r.prompt_id) for r in spy.results]
    assert len(all_ids) == len(set(all_ids)), Counter(all_ids).most_common(3)
    stats = system.buffer.stats()
    total = system.state.episode * size
    assert stats["balanced"] and stats["size"] == 0, stats
    assert stats["put"] == stats["taken"] == total and stats["duplicates"] == 0 and stats["dropped"] == 0, stats


def _gcs_address() -> str:
    import ray

    return ray.get_runtime_context().gcs_address


class TestOneSystem:
    """Both tests run on one PPO system (class-scoped), in this order."""

    def test_scale_generators_mid_run(self, ops_system):
        import ray

        from relay.actors.control import control_status, request_generators
        from relay.cluster.options import NAMESPACE

        with pytest.raises(ValueError):  # kl_coef 0 (the GRPO preset): the reference is never started
            ray.get_actor(f"relay/ref@{RUN}", namespace=NAMESPACE)

        system, spy = ops_system
        nus = system.cfg.algo.num_update_steps
        recs = system.run_episodes(until=1)
        assert recs[0]["num_generators"] == 1

        # a user asks for a second generator from another process, attached to the same cluster
        env = dict(os.environ, PATH=f"{BIN}:{os.environ.get('PATH', '')}")
        out = subprocess.run([str(BIN / "relay"), "scale", RUN, "--generators", "2", "--address", _gcs_address()],
                             env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and "requested 2 generators" in out.stdout, out.stdout + out.stderr[-2000:]

        # the run goes on: the driver picks the request up before the next episode and the pool starts
        # generator-1 in the background; this episode's weight push reaches only the active generator
        recs += system.run_episodes(until=2)
        status = system.pool.status()
        assert status["target"] == 2 and len(status["members"]) == 2, status
        new = [name for name in status["members"] if name != f"generator-0@{RUN}"]
        assert len(new) == 1
        new = new[0]
        # once it is active it holds the current version (loaded before it is given any prompt)
        system.pool.wait_ready(TIMEOUT)
        assert system.pool.versions() == {f"generator-0@{RUN}": 2 * nus, new: 2 * nus}
        assert control_status(f"control-{RUN}")["desired"] == 2

        recs += system.run_episodes(until=4)
        by_ep = spy.by_episode()
        for ep in (2, 3):  # both generators produced, each at the episode's starting version
            assert {r.generator for r in by_ep[ep]} == {f"generator-0@{RUN}", new}, [r.generator for r in by_ep[ep]]
            assert all(r.weight_version == ep * nus for r in by_ep[ep])
            assert recs[ep]["num_generators"] == 2
        first_new = min(ep for ep, rs in by_ep.items() for r in rs if r.generator == new)
        assert all(r.weight_version == first_new * nus for r in by_ep[first_new] if r.generator == new)

        # and back to one generator, through the control actor directly
        request_generators(1, f"control-{RUN}", timeout_s=30)
        recs += system.run_episodes(until=5)
        assert recs[4]["num_generators"] == 1
        # the driver applies pending requests before each episode: both generators were idle, the newest went
        assert {r.generator for r in spy.by_episode()[4]} == {f"generator-0@{RUN}"}
        assert list(system.pool.status()["members"]) == [f"generator-0@{RUN}"]
        status = system.pool.status()
        assert status["target"] == 1 and status["active"] == 1 and status["removed"] == 1 and status["failed"] == 0
        assert status["reassigned"] == 0 and status["submitted"] == status["completed"] == 5 * 4, status
        assert len(system.pool.versions()) == 1
        _check_bookkeeping(system, spy, recs, first_episode=0)

    def test_killed_generator_is_replaced(self, ops_system):
        """Async mode (episodes 0-based): episode 6's prompts are submitted during episode 5, before its
        update, and the generator holding them is SIGKILLed right after dispatch. Episode 5 still trains and
        pushes its weights (the pool finds the dead generator there and replaces it), the replacement loads
        them before it takes the re-queued prompts, episode 6 is produced once, and the buffer (its own actor)
        keeps every experience: its counters run on from the first episode."""
        system, spy = ops_system
        if system.state.episode != 5 or system.pool.target != 1:
            pytest.skip("needs the state test_scale_generators_mid_run leaves (5 episodes, 1 generator)")
        nus = system.cfg.algo.num_update_steps
        failed_before = system.pool.status()["failed"]
        system.cfg.algo.mode = "async"
        with pytest.raises(ValueError, match="max_staleness"):  # versions count optimizer steps (2 per episode)
            system.run_episodes(until=8)
        system.cfg.algo.max_staleness = nus
        spy.kill_episode = 6
        recs = system.run_episodes(until=8)
        assert spy.killed is not None, "the kill did not happen"
        victim = spy.killed
        with pytest.raises(ProcessLookupError):
            os.kill(victim["pid"], 0)
        status = system.pool.status()
        assert status["failed"] == failed_before + 1 and status["active"] == 1, status
        assert status["reassigned"] >= 1, status  # the chunk it held went back to the queue
        replacement = [name for name in status["members"] if name != victim["name"]]
        assert len(replacement) == 1 and victim["name"] not in status["members"]
        by_ep = spy.by_episode()
        assert {r.generator for r in by_ep[6]} == set(replacement)
        assert all(r.attempts == 2 for r in by_ep[6])
        # the replacement started after episode 5's push: it produced episode 6 at version 6 x nus (fresh)
        assert all(r.weight_version == 6 * nus for r in by_ep[6])
        assert recs[1]["staleness_max"] == 0 and recs[1]["logprob_diff"] < 1e-3
        assert system.pool.versions() == {replacement[0]: 8 * nus}
        _check_bookkeeping(system, spy, system.history, first_episode=0)

    def test_grpo_learns_rule_reward(self, ops_system):
        """GRPO without a critic (placement separate: the generator on a core of its own) learns the rule reward
        (share of response tokens with id < 512) over the preset's 30 episodes, counted from the run's first:
        the same system runs on in sync mode after the tests above (a GRPO run of its own cost a system start)."""
        from relay.metrics import read_metrics

        system, _ = ops_system  # 8 episodes in after the tests above (none when run alone)
        system.cfg.algo.mode = "sync"
        system.cfg.algo.num_episodes = 30  # the preset's
        system.run_episodes()
        rows = read_metrics(system.save_dir)
        assert [r["step"] for r in rows] == list(range(1, 31))
        rewards = [r["reward_mean"] for r in rows]
        first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
        assert last > first + 0.15, rewards
        assert system.critic is None and not any(system.save_dir.glob("critic"))  # no critic group for grpo
