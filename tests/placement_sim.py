"""Places configs/ppo_7b_tp4.yaml on a simulated 3-node cluster (`ray.cluster_utils.Cluster`, 8 fake GPUs per
node) with light stand-in actors, and prints what Ray's state says about where each landed, as one JSON line.
Run by tests/test_placement_cluster.py in its own process: a driver holds one Ray connection, and the suite's
shared local cluster may already be up in the test process. Token authentication stays on (RAY_AUTH_TOKEN_PATH
from the suite, or a private token made here).

Scenarios: `layout` (the preset, with the buffer pinned by node label and the reward actor by custom resource:
learners, engines, the reference and reward model with a GPU each, buffer; then a generator past the plan and a
replacement for a dead one), `colocate` (the same preset with placement colocate, the scorers on 0.25 of a
learner rank's GPU), `too_big` (a layout that cannot fit: refused before anything is created), `weights` (a real `WeightPush` from a stand-in learner rank on
one node to stand-in generators on its node and on the driver's node, and to a late joiner).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NODES = 3
NODE = dict(num_cpus=40, num_gpus=8)


def main() -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        os.environ["RAY_AUTH_TOKEN_PATH"] = os.path.join(tempfile.mkdtemp(prefix="relay-auth-"), "auth_token")
    from relay.launch import ray_auth

    ray_auth.ensure_token()
    import ray
    from ray.cluster_utils import Cluster

    t0 = time.monotonic()
    # node pins to check: a label on the head node, a custom resource on the other nodes
    cluster = Cluster(initialize_head=True, head_node_args=dict(include_dashboard=False, labels={"pool": "head"}, **NODE))
    for i in range(NODES - 1):
        # every node but the head: a pinned reward model asking a GPU must find one whatever the learners take
        cluster.add_node(**NODE, resources={"scorers": 4})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="relay", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}})
    nodes = [n for n in ray.nodes() if n["Alive"]]
    out = {"nodes": [n["NodeID"] for n in nodes], "start_s": time.monotonic() - t0,
           "head": next(n["NodeID"] for n in nodes if n.get("Labels", {}).get("pool") == "head"),
           "scorers_nodes": [n["NodeID"] for n in nodes if "scorers" in n["Resources"]]}
    try:
        out["layout"] = layout()
        out["colocate"] = colocate()
        out["too_big"] = too_big()
        out["weights"] = weights()
    finally:
        ray.shutdown()
        cluster.shutdown()
    out["total_s"] = time.monotonic() - t0
    print(json.dumps(out))


def config(*overrides: str):
    from relay.config import load_config

    return load_config("ppo", ROOT / "configs" / "ppo_7b_tp4.yaml", list(overrides))


def stand_in():
    import ray

    @ray.remote
    class StandIn:
        """A role's actor without its model: says where it is and what Ray gave it."""

        def report(self) -> dict:
            ctx = ray.get_runtime_context()
            return {"node": ctx.get_node_id(), "resources": ctx.get_assigned_resources(),
                    "gpu_ids": ctx.get_accelerator_ids().get("GPU", []), "pg": ctx.get_placement_group_id()}

        def device(self) -> str:
            from relay.cluster.devices import torch_device

            return torch_device()

    return StandIn


def start(placement, role: str, index: int, name: str):
    from relay.cluster.options import actor_options

    return stand_in().options(**actor_options(name=name, **placement.options(role, index, name))).remote()


def reports(actors: dict) -> dict:
    import ray

    got = ray.get([a.report.remote() for a in actors.values()], timeout=300)
    return dict(zip(actors, got))


def layout() -> dict:
    import ray
    from ray.util.placement_group import placement_group_table

    from relay.cluster.placement import plan_ppo
    from relay.cluster.placement_groups import Placement

    cfg = config("buffer.node_pin=pool=head", "reward.node_pin=scorers")
    placement = Placement.reserve(plan_ppo(cfg, gpus_present=True), "sim", timeout_s=60)
    actors = {}
    for role, members in placement.plan.roles.items():
        for i in range(len(members)):
            name = f"{role}-{i}@sim"
            actors[name] = start(placement, role, i, name)
    out = {"actors": reports(actors), "device": ray.get(actors["actor_learner-0@sim"].device.remote(), timeout=300),
           "groups": {name: {"id": pg.id.hex(), "nodes": placement_group_table(pg)["bundles_to_node_id"],
                             "strategy": placement_group_table(pg)["strategy"]}
                      for name, pg in placement.groups.items()},
           "rank_order": placement.rank_order}
    # A generator past the plan while both engine groups are held gets a new group; a replacement for a dead
    # generator takes the dead one's group.
    extra = {"generator-2@sim": start(placement, "generator", 2, "generator-2@sim")}
    ray.kill(actors["generator-0@sim"], no_restart=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            ray.get_actor("relay/generator-0@sim", namespace="relay")
            time.sleep(0.1)
        except ValueError:
            break
    extra["generator-3@sim"] = start(placement, "generator", 3, "generator-3@sim")
    out["extra"] = reports(extra)
    out["extra_groups"] = {n: pg.id.hex() for n, pg in placement.groups.items() if n not in out["groups"]}
    for a in [*actors.values(), *extra.values()]:
        ray.kill(a, no_restart=True)
    placement.release()
    return out


def colocate() -> dict:
    from relay.cluster.placement import plan_ppo
    from relay.cluster.placement_groups import Placement

    cfg = config("placement=colocate", "reference.num_gpus=0.25", "reward.num_gpus=0.25")
    placement = Placement.reserve(plan_ppo(cfg, gpus_present=True), "sim2", timeout_s=60)
    actors = {name: start(placement, role, 0, name) for role, name in [
        ("actor_learner", "actor_learner-0@sim2"), ("critic_learner", "critic_learner-0@sim2"),
        ("reference", "reference-0@sim2"), ("reward", "reward-0@sim2")]}
    out = {"actors": reports(actors), "groups": {n: pg.id.hex() for n, pg in placement.groups.items()}}
    for a in actors.values():
        import ray

        ray.kill(a, no_restart=True)
    placement.release()
    return out


def too_big() -> dict:
    import ray
    from ray.util.placement_group import placement_group_table

    from relay.cluster.placement import PlacementError, plan_ppo
    from relay.cluster.placement_groups import Placement

    before = {k for k, v in placement_group_table().items() if v["state"] != "REMOVED"}
    try:
        Placement.reserve(plan_ppo(config("generation.num_generators=8"), gpus_present=True), "sim3", timeout_s=60)
    except PlacementError as err:
        message = str(err)
    else:
        message = None
    after = {k for k, v in placement_group_table().items() if v["state"] != "REMOVED"}
    named = [a for a in ray.util.list_named_actors(all_namespaces=True) if "sim3" in str(a)]
    return {"error": message, "new_groups": sorted(after - before), "actors": named}


def weights() -> dict:
    """Weight sync across nodes. A stand-in learner rank on a node that is not the driver's runs a real
    `WeightPush` (what `LearnerWorker.publish_weights` does with its state dict) to a stand-in generator on its
    own node and one on the driver's node; then the kept buckets load by ref on the driver's node (what
    `GeneratorPool` has a replacement or a generator added by `relay scale` do); then the sender ends, and the same refs
    no longer load: the bytes were the sender's, never the driver's. Stand-in generators record how the
    weights reached them (vLLM on a simulated node would cost minutes)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from relay.actors.weight_push import WeightPush

    @ray.remote
    class Sender:
        """A learner rank holding a tiny state dict (a bf16 tensor too: the wire keeps dtypes)."""

        def __init__(self) -> None:
            import torch

            g = torch.Generator().manual_seed(0)
            self.state = {"model.embed_tokens.weight": torch.randn(64, 16, generator=g),
                          "model.norm.weight": torch.randn(16, generator=g).to(torch.bfloat16),
                          "lm_head.weight": torch.randn(64, 16, generator=g)}

        def publish(self, push) -> dict:
            return push(self.state)

        def sums(self) -> dict:
            return {n: float(t.double().sum()) for n, t in self.state.items()}

        def pid(self) -> int:
            return os.getpid()

    @ray.remote
    class Receiver:
        """A generator's two load methods, recording what arrived."""

        def node_id(self) -> str:
            return ray.get_runtime_context().get_node_id()

        def update_weights(self, paths, version, allow_partial=False, rewind=False) -> dict:
            from relay.actors.weight_sync import read_buckets

            return self._got("paths", version, read_buckets(paths), paths=list(paths))

        def update_weights_from_blobs(self, version, *blobs, allow_partial=False, rewind=False) -> dict:
            from safetensors.torch import load

            state = {}
            for blob in blobs:
                state.update(load(bytes(blob)))  # uint8 arrays of the bucket files, as the real generator gets them
            return self._got("blobs", version, state, arg_types=sorted({type(b).__name__ for b in blobs}))

        def _got(self, how, version, state, **extra) -> dict:
            return {"how": how, "version": version, "node": self.node_id(), "load_s": 0.0,
                    "dtypes": {n: str(t.dtype) for n, t in state.items()},
                    "sums": {n: float(t.double().sum()) for n, t in state.items()}, **extra}

    t0 = time.monotonic()
    driver_node = ray.get_runtime_context().get_node_id()
    away = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != driver_node)

    def on(node: str) -> dict:
        return {"num_cpus": 1, "scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False)}

    sender = Sender.options(**on(away)).remote()
    near, far = Receiver.options(**on(away)).remote(), Receiver.options(**on(driver_node)).remote()
    nodes = ray.get([near.node_id.remote(), far.node_id.remote()], timeout=120)
    push = WeightPush([near, far], 1, nodes=nodes, keep=True, bucket_bytes=4096, timeout_s=120)
    report = ray.get(sender.publish.remote(push), timeout=180)
    blobs = report.pop("blobs")
    late = far  # a late joiner's load is this call with the kept refs (a fresh actor would only cost its start)
    joined = ray.get(late.update_weights_from_blobs.remote(1, *blobs), timeout=120)
    out = {"driver_node": driver_node, "sender_node": away, "report": report, "joined": joined,
           "expected": ray.get(sender.sums.remote(), timeout=60), "sender_pid": ray.get(sender.pid.remote()),
           "blob_refs": len(blobs)}
    ray.kill(sender, no_restart=True)
    try:  # until Ray knows it is gone
        ray.get(sender.pid.remote(), timeout=60)
    except ray.exceptions.RayActorError:
        pass
    out["after_sender_died"] = "loaded"
    for _ in range(40):  # Ray learns of the owner's death a moment after the actor's
        try:
            ray.get(late.update_weights_from_blobs.remote(2, *blobs), timeout=60)
        except ray.exceptions.ObjectLostError as err:  # raised as RayTaskError(OwnerDiedError): name the cause
            out["after_sender_died"] = next(c.__name__ for c in type(err).__mro__ if c.__module__ == "ray.exceptions"
                                            and not c.__name__.startswith("RayTaskError"))
            break
        time.sleep(0.25)
    for a in (near, far):
        ray.kill(a, no_restart=True)
    out["took_s"] = time.monotonic() - t0
    return out


if __name__ == "__main__":
    sys.exit(main())
