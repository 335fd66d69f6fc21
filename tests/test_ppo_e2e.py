"""The PPO system end to end on tiny models, real everything (vLLM generators, ColossalAI learner groups, Ray
actors): sync then async on one set of actors, resume from its checkpoint, and GRPO learning with generation and
update time-shared.

One PPOSystem serves sync and async (switching `cfg.algo.mode` between `run_episodes` calls) because actor
start-up (two vLLM engines, a tp=2 group, a critic) is most of the cost on a 2-core machine."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prompt_data(tiny_demo_data):
    return tiny_demo_data / "prompt"


def _cfg(prompt_data, save_dir, preset="configs/ppo_tiny.yaml", **overrides):
    from relay.config import load_config, validate

    sets = [f"prompt_dataset={prompt_data}", f"save_dir={save_dir}", "logging.use_tensorboard=false",
            "cluster.timeout_s=300", "generation.max_new_tokens=12"]
    if "grpo" in preset:
        sets.remove("generation.max_new_tokens=12")  # the preset tunes its own length
    sets += [f"{k}={v}" for k, v in overrides.items()]
    cfg = load_config("ppo", REPO / preset, sets)
    validate(cfg, "cpu")
    return cfg


@pytest.fixture(scope="module")
def e2e_run(ray_session, prompt_data, tmp_path_factory):
    """2 generators, ref, rule reward, tp=2 actor group (3d), critic group, buffer: 2 sync + 2 async episodes."""
    import ray

    from relay.launch.ppo import PPOSystem

    save_dir = tmp_path_factory.mktemp("ppo_e2e") / "e2e"
    # 3 rows per reference forward: 8-row batches score in uneven micro-batches (3 + 3 + 2)
    cfg = _cfg(prompt_data, save_dir, placement="separate",  # separate: the same actors run async next
               **{"algo.num_episodes": 4, "reference.micro_batch_size": 3})
    system = PPOSystem(cfg).start()
    ref_info = system.ref.info()
    try:
        names = _named_actors()
        sync = system.run_episodes(until=2)
        versions_after_sync = system.pool.versions()
        system.cfg.algo.mode = "async"
        asyn = system.run_episodes(until=4)
        # Between async episodes the next prompts are already drawn and generating: a checkpoint taken then
        # must rewind the data position to before them (else a resumed run would skip them).
        order_before = system.prompt_order.state_dict()
        system.pending = system._submit(system.state.episode)
        ckpt = system.save_checkpoint()
        system.pending = None
        final_versions = system.pool.versions()
        push = {"report": system.last_sync, "actor_pids": system.actor.pids(), "driver_pid": os.getpid(),
                "gen_nodes": sorted({m.node_id for m in system.pool._members.values()}),
                "actor_node": ray.get(system.actor.workers[0].node_id.remote(), timeout=60)}
    finally:
        system.close()  # before the other tests: they start actors with the same names
    return {"cfg": cfg, "sync": sync, "async": asyn, "names": names, "ckpt": ckpt, "order_before": order_before,
            "versions": versions_after_sync, "final_versions": final_versions, "save_dir": save_dir,
            "push": push, "ref_info": ref_info}


EXPECTED_ACTORS = ("relay/generator-0@e2e", "relay/generator-1@e2e", "relay/ref@e2e", "relay/reward@e2e",
                   "relay/actor-rank0@e2e", "relay/actor-rank1@e2e", "relay/critic-rank0@e2e", "relay/buffer@e2e",
                   "relay/control-e2e")


def _named_actors() -> set[str]:
    import ray

    from relay.cluster.options import NAMESPACE

    found = set()
    for name in EXPECTED_ACTORS:
        try:
            ray.get_actor(name, namespace=NAMESPACE)
            found.add(name)
        except ValueError:
            pass
    return found


def test_named_actors(e2e_run):
    assert set(EXPECTED_ACTORS) == e2e_run["names"]


def test_reference_scores_where_configured(e2e_run):
    """reference.dtype auto on a CPU actor (no num_gpus) is float32; the micro-batch size reaches the actor."""
    info = e2e_run["ref_info"]
    assert (info["device"], info["dtype"], info["micro_batch_size"]) == ("cpu", "float32", 3)
    assert all(rec["kl"] != 0.0 for rec in e2e_run["sync"][1:])  # it scored: the policy moved away from it


def test_weights_go_from_the_learner_to_the_generators_and_leave_nothing_behind(e2e_run):
    """The last push was sent by the actor group's rank 0 (not the driver), through shared memory to both
    generators on its node, chosen by node id; its transfer folder is gone, and the driver made none."""
    import tempfile

    from relay.scratch import shm_root

    push = e2e_run["push"]
    report = push["report"]
    assert report["sender_pid"] == push["actor_pids"][0] != push["driver_pid"]
    assert report["sender_node"] == push["actor_node"] and push["gen_nodes"] == [push["actor_node"]]
    assert report["strategies"] == ["shm", "shm"] and report["failures"] == {} and report["late"] == []
    assert "blobs" not in report  # the pool keeps the refs; callers get none
    for root in {shm_root(), Path(tempfile.gettempdir())}:
        for pid in (*push["actor_pids"], push["driver_pid"]):
            assert not list(root.glob(f"relay-weights-{pid}-*")), (root, pid)


def test_sync_mode_invariants(e2e_run):
    from relay.config import ppo_buffer_size

    cfg = e2e_run["cfg"]
    for i, rec in enumerate(e2e_run["sync"]):
        updates = (i + 1) * cfg.algo.num_update_steps
        assert rec["weight_version"] == updates
        assert rec["gen_version_min"] == rec["gen_version_max"] == updates and rec["num_generators"] == 2
        assert rec["logprob_diff"] < 1e-3, rec["logprob_diff"]
        assert rec["approx_kl_first"] < 1e-6
        assert rec["buffer_size"] == ppo_buffer_size(cfg) == 8 == rec["samples"]
        assert rec["staleness_mean"] == 0.0
        assert cfg.algo.overlap_critic and rec["update_overlap_s"] > 0  # critic steps ran beside the actor's
        for key in ("reward_mean", "kl", "actor_loss", "critic_loss", "ptx_loss", "approx_kl", "clip_frac", "entropy",
                    "sync_s", "rollout_tokens_per_s", "samples_per_s"):
            assert key in rec
        # the object-store copy is made while the generators load: write and load overlap inside the push
        assert 0 < max(rec["sync_write_s"], rec["sync_load_s"]) <= rec["sync_push_s"] <= rec["sync_s"]
        parts = [rec[f"sync_{k}_s"] for k in ("serialize", "file", "put")]  # generators here: files and kept refs
        assert all(p > 0 for p in parts) and sum(parts) <= rec["sync_write_s"]
        assert (rec["sync_overwritten"] > 0) == (i > 0)  # the sender reuses its transfer files from its 2nd push
    assert set(e2e_run["versions"].values()) == {2}


def test_async_mode_staleness_and_is_correction(e2e_run):
    a = e2e_run["cfg"].algo
    recs = e2e_run["async"]
    for i, rec in enumerate(recs):
        updates = (3 + i) * a.num_update_steps
        assert rec["weight_version"] == updates == rec["gen_version_min"] == rec["gen_version_max"]
        assert rec["approx_kl_first"] < 1e-6  # old logprobs are recomputed by the actor group
        assert rec["staleness_max"] <= a.max_staleness
        assert 0 < rec["is_weight_mean"] <= a.tis_cap
    # the second async episode was generated while the first trained: one version old, and it shows
    assert recs[-1]["staleness_mean"] == 1.0
    assert recs[-1]["logprob_diff"] > 1e-4
    assert set(e2e_run["final_versions"].values()) == {4}


def test_metrics_file_and_checkpoint(e2e_run):
    from relay.metrics import read_metrics

    rows = read_metrics(e2e_run["save_dir"])
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    ckpt = e2e_run["ckpt"]
    assert (ckpt / "COMPLETE").exists() and (ckpt / "actor" / "model").is_dir() and (ckpt / "critic" / "optimizer").exists()
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["prompt_order"] == e2e_run["order_before"] and state["episode"] == 4


def test_resume_from_checkpoint(e2e_run, prompt_data, tmp_path):
    from relay.launch.ppo import run_ppo
    from relay.metrics import read_metrics

    cfg = _cfg(prompt_data, tmp_path / "resumed", **{"algo.num_episodes": 5, "generation.num_generators": 1,
                                                     "checkpoint_path": str(e2e_run["save_dir"])})
    assert run_ppo(cfg) == 0
    rows = read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in rows] == [5]
    assert rows[0]["weight_version"] == 5 == rows[0]["gen_version_min"]
    assert rows[0]["approx_kl_first"] < 1e-6 and rows[0]["logprob_diff"] < 1e-3  # generators got the checkpoint's weights
    assert (tmp_path / "resumed" / "actor" / "config.json").exists()


# GRPO learning with placement separate: tests/test_ppo_ops.py (TestOneSystem, on its system after the ops).


def test_grpo_learns_with_generation_and_update_time_shared(ray_session, prompt_data, tmp_path):
    """placement auto on CPU in sync mode is timeshare: the generator lives in the actor rank's bundle and
    reserves no CPU, its engine has every core while it generates; the update takes every core of the node and
    hands them back afterwards; GRPO still learns the rule reward."""
    import ray

    from relay.cpu import usable_cores
    from relay.launch.ppo import PPOSystem
    from relay.launch.role_memory import peak_memory_by_role
    from relay.metrics import read_metrics

    cfg = _cfg(prompt_data, tmp_path / "timeshare", preset="configs/ppo_tiny_grpo.yaml")
    assert cfg.placement == "auto"
    system = PPOSystem(cfg).start()
    try:
        assert cfg.placement == "timeshare"  # what auto became on this cluster
        assert system.pool.config.cpu_threads == usable_cores()  # the engine's threads: every core
        rows = system.run_episodes()
        rank0 = system.actor.workers[0]
        threads_after = ray.get(rank0.set_num_threads.remote(1), timeout=60)
        gen_group = next(iter(system.pool.clients().values())).health()["placement_group"]
        actor_group = system.placement.groups["actor_learner"].id.hex()
        memory = peak_memory_by_role(system)
    finally:
        system.close()
    assert threads_after == cfg.actor_learner.num_threads == 1  # handed back after each update
    assert gen_group == actor_group  # the generator sits in the actor rank's placement group
    assert {r["update_threads"] for r in rows} == {float(usable_cores())}
    # every role's process answers; an engine, a model and its optimizer take far more than the buffer
    assert set(memory) == {"generator", "actor_learner", "reward", "buffer"}, memory
    assert memory["generator"] > memory["buffer"] and memory["actor_learner"] > memory["buffer"] > 50, memory
    rewards = [r["reward_mean"] for r in read_metrics(tmp_path / "timeshare")]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.15, rewards
