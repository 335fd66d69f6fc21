"""A real PPO run (GRPO, tiny Llama, vLLM generator, ColossalAI tp=2 x dp=2 actor group) on a simulated
multi-node cluster (`ray.cluster_utils.Cluster`: separate raylets with their own resources and node labels), with
one node removed mid-run for each of two roles. Prints what it saw as one JSON line; tests/test_multinode_ppo.py
asserts on it. Run in its own process: the suite's shared local cluster may be up in the test process.

Nodes (labels `tier`): the head (driver, reward, buffer), three learner nodes of 2 CPUs (the actor group's 4 ranks
fill two of them: tensor-parallel pairs on one node, the two data-parallel replicas on different nodes; the
third is spare room), two rollout nodes of 1 CPU (the generator on one, room for a replacement on the other).

Episodes (0-based index e, a checkpoint every 2 episodes):
- e0, e1: as usual; weights go from the actor's rank 0 to the generator on another node (object store).
- e2: right after the prompts went out, the generator's node is removed (its raylet killed, as a lost machine):
  the pool re-queues the prompts, a replacement starts on the other rollout node and loads the current weights.
- e4: just before the update goes out, the node of actor ranks 2-3 is removed: the driver rebuilds the group
  from the e3 checkpoint once Ray has moved the lost bundles to the spare learner node, and runs e4 again.

Usage: python tests/multinode_ppo_sim.py PROMPT_DATA SAVE_DIR
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EPISODES = 5
GEN_LOSS, LEARNER_LOSS = 2, 4  # 0-based episodes in which a node is removed
OBJECT_STORE = 128 * 1024**2
# Node deaths are noticed after a few missed health checks (Ray's default is about 15 s).
FAST_HEALTH = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500, "health_check_failure_threshold": 4}


def main(prompt_data: str, save_dir: str) -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        os.environ["RAY_AUTH_TOKEN_PATH"] = os.path.join(tempfile.mkdtemp(prefix="relay-auth-"), "auth_token")
    from relay.launch import ray_auth

    ray_auth.ensure_token()
    import ray
    from ray.cluster_utils import Cluster

    from relay.launch.cluster import init_ray

    t0 = time.monotonic()
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=3, labels={"tier": "head"}, include_dashboard=False, object_store_memory=OBJECT_STORE,
        _system_config=FAST_HEALTH))
    for tier, cpus, count in (("learner", 2, 3), ("rollout", 1, 2)):
        for _ in range(count):
            cluster.add_node(num_cpus=cpus, labels={"tier": tier}, object_store_memory=OBJECT_STORE)
    cluster.wait_for_nodes()
    init_ray(address=cluster.address)
    out: dict = {"start_s": time.monotonic() - t0, "driver_node": ray.get_runtime_context().get_node_id(),
                 "tiers": {n["NodeID"]: n.get("Labels", {}).get("tier") for n in ray.nodes() if n["Alive"]}}
    try:
        out.update(run(cluster, prompt_data, save_dir))
    finally:
        ray.shutdown()
        cluster.shutdown()
    out["total_s"] = time.monotonic() - t0
    print(json.dumps(out))


def config(prompt_data: str, save_dir: str):
    from relay.config import load_config, validate

    sets = [f"prompt_dataset={prompt_data}", f"save_dir={save_dir}", "logging.use_tensorboard=false",
            "cluster.timeout_s=300", "cluster.placement_timeout_s=120", "cluster.max_restarts=2",
            f"algo.num_episodes={EPISODES}", "algo.num_update_steps=1", "algo.train_batch_size=8",
            "save_interval=2", "save_every_minutes=0", "generation.max_new_tokens=48",
            "actor_learner.plugin=3d", "actor_learner.tp=2", "actor_learner.num_ranks=4",
            "actor_learner.node_pin=tier=learner", "generation.node_pin=tier=rollout",
            "reward.node_pin=tier=head", "buffer.node_pin=tier=head"]
    cfg = load_config("ppo", ROOT / "configs/ppo_tiny_grpo.yaml", sets)
    validate(cfg, "cpu")
    return cfg


def lose_node(cluster, node_id: str) -> dict:
    """Take a node away as a lost machine would go: its raylet and every process it started (the actors'
    workers) SIGKILLed at once. `Cluster.remove_node` alone kills the raylet's own processes but leaves the
    workers running until they notice, and a worker can still hand a finished result to its caller meanwhile."""
    import psutil
    from ray._private import ray_constants

    node = next(n for n in cluster.list_all_nodes() if n.node_id == node_id)
    raylet = psutil.Process(node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid)
    workers = raylet.children(recursive=True)
    t0 = time.monotonic()
    cluster.remove_node(node, allow_graceful=False)
    for proc in workers:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    return {"node": node_id, "pids": sorted(p.pid for p in workers), "remove_s": time.monotonic() - t0}


def run(cluster, prompt_data: str, save_dir: str) -> dict:
    from relay.launch.ppo import PPOSystem
    from relay.metrics import read_metrics

    system = PPOSystem(config(prompt_data, save_dir)).start()
    seen: dict = {"taken": {}, "syncs": []}
    try:
        seen["ranks_before"] = system.actor.nodes()
        seen["gens_before"] = {n: m["node"] for n, m in system.pool.status()["members"].items()}
        spy(system, cluster, seen)
        t0 = time.monotonic()
        records = system.run_episodes()
        seen["run_s"] = time.monotonic() - t0
        seen["episodes"] = [r["episode"] for r in records]
        seen["ranks_after"] = system.actor.nodes()
        members = system.pool.status()["members"]
        seen["gens_after"] = {n: m["node"] for n, m in members.items() if m["state"] == "active"}
        seen["versions_after"] = system.pool.versions()
        seen["pool"] = {k: v for k, v in system.pool.status().items() if k != "members"}
        seen["learner_version"] = system.state.version
        seen["metrics"] = [{k: r.get(k) for k in ("step", "samples", "weight_version", "logprob_diff",
                                                   "restarts_generators", "restarts_learners", "sync_s")}
                           for r in read_metrics(system.save_dir)]
    finally:
        system.close()
    return seen


def spy(system, cluster, seen: dict) -> None:
    """Call-through wrappers: record each episode's taken sample ids and weight pushes, and remove the nodes."""
    pool, buffer = system.pool, system.buffer
    real_submit, real_take, real_push = pool.submit, buffer.take_all, pool.push_weights

    def submit(prompts, sampling=None, ids=None):
        got = real_submit(prompts, sampling, ids)
        if "gen_lost" not in seen and ids and str(ids[0]).startswith(f"e{GEN_LOSS}-"):
            seen["gen_lost"] = {}
            threading.Thread(target=remove_busy_generator, args=(pool, cluster, seen["gen_lost"]), daemon=True).start()
        return got

    def take_all(*args, **kwargs):
        batches = real_take(*args, **kwargs)
        seen["taken"][str(system.state.episode)] = [str(s) for b in batches for s in b.sample_ids]
        return batches

    def push_weights(send, version, *args, **kwargs):
        report = real_push(send, version, *args, **kwargs)
        seen["syncs"].append({"version": version, "sender_node": report.get("sender_node"),
                              "strategies": report.get("strategies"), "failures": report.get("failures")})
        return report

    pool.submit, buffer.take_all, pool.push_weights = submit, take_all, push_weights
    wrap_update(system, cluster, seen)


def remove_busy_generator(pool, cluster, record: dict, timeout_s: float = 60.0) -> None:
    """Remove the node of the generator that holds the episode's prompts, once it is at work on them."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        busy = [(n, m["node"]) for n, m in pool.status()["members"].items() if m["busy"]]
        if busy:
            (name, node), = busy
            record.update(name=name, after_dispatch_s=time.monotonic() - t0, **lose_node(cluster, node))
            return
        time.sleep(0.005)
    record["error"] = "no generator became busy"


def wrap_update(system, cluster, seen: dict) -> None:
    """Remove the node of actor ranks 2-3 as episode LEARNER_LOSS's update goes out (only the first time)."""
    group = system.actor
    real = group.start_train_step  # what the update loop calls (then finish)

    def start_train_step(*args, **kwargs):
        if "learner_lost" not in seen and system.state.episode == LEARNER_LOSS:
            nodes, pids = group.nodes(), group.pids()
            seen["learner_lost"] = {"ranks_on_it": [i for i, n in enumerate(nodes) if n == nodes[2]],
                                    "rank_pids": pids, **lose_node(cluster, nodes[2])}
        return real(*args, **kwargs)

    group.start_train_step = start_train_step


if __name__ == "__main__":
    main(*sys.argv[1:3])
