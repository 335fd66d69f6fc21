"""Placement on a simulated multi-node cluster: configs/ppo_7b_tp4.yaml on 3 nodes x 8 fake GPUs with stand-in
actors (no models), asserted role by role from what Ray reports (each actor's node, resources and GPU ids; the
placement groups' bundle nodes); a layout that cannot fit, refused before anything is created; and a weight push
from a learner stand-in across two of its nodes (the transport chosen by node id, nothing through the driver).
The cluster runs in a child process (tests/placement_sim.py): the suite's own Ray session may be up here."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from relay.cluster.placement import split_tp_groups

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sim():
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "placement_sim.py")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ranks(actors: dict, role: str) -> list[dict]:
    return [actors[f"{role}-{i}@sim"] for i in range(sum(1 for n in actors if n.startswith(f"{role}-")))]


def test_each_learner_group_sits_on_one_node_with_a_gpu_per_rank(sim):
    actors = sim["layout"]["actors"]
    actor, critic = ranks(actors, "actor_learner"), ranks(actors, "critic_learner")
    assert len(actor) == 8 and len(critic) == 4
    for group in (actor, critic):
        nodes = [r["node"] for r in group]
        assert split_tp_groups(nodes, 4) == []  # tensor-parallel peers (tp 4) share a node
        assert len(set(nodes)) == 1  # the 7B layout fits each group on one node: PACK keeps it there
        assert all(r["resources"] == {"CPU": 4.0, "GPU": 1.0} for r in group)
        assert len({g for r in group for g in r["gpu_ids"]}) == len(group)  # a GPU each, none shared
        assert len({r["pg"] for r in group}) == 1
    assert actor[0]["node"] != critic[0]["node"]  # 8 + 4 GPUs cannot share an 8-GPU node
    groups = sim["layout"]["groups"]
    assert groups["actor_learner"]["strategy"] == "PACK" and groups["actor_learner"]["id"] == actor[0]["pg"]


def test_engines_spread_over_nodes_each_holding_its_gpus_on_one(sim):
    layout = sim["layout"]
    gens = [layout["actors"][f"generator-{i}@sim"] for i in range(2)]
    assert gens[0]["node"] != gens[1]["node"]  # SPREAD: a node's loss costs one engine, not both
    for i, g in enumerate(gens):
        group = layout["groups"][f"generator-{i}"]
        assert group["strategy"] == "STRICT_PACK" and g["pg"] == group["id"]
        assert g["resources"] == {"CPU": 1.0, "GPU": 2.0} and len(g["gpu_ids"]) == 2  # tensor_parallel_size 2
        assert set(group["nodes"].values()) == {g["node"]}


def test_scorers_get_a_gpu_each_and_the_buffer_none_on_their_pinned_nodes(sim):
    actors = sim["layout"]["actors"]
    for role, ask in (("reference", {"CPU": 0.5, "GPU": 1.0}), ("reward", {"CPU": 1.0, "GPU": 1.0, "scorers": 0.001}),
                      ("buffer", {"CPU": 0.5})):
        a = actors[f"{role}-0@sim"]
        assert a["pg"] is None and a["resources"] == ask, role  # plain actors, not in a placement group
        assert len(a["gpu_ids"]) == ask.get("GPU", 0), role
    assert actors["buffer-0@sim"]["node"] == sim["head"]  # node_pin pool=head: a node label
    # node_pin scorers: a custom resource the head lacks
    assert actors["reward-0@sim"]["node"] in sim["scorers_nodes"] and sim["head"] not in sim["scorers_nodes"]


def test_no_gpu_is_given_twice(sim):
    """Learners, engines and scorers hold 8 + 4 + 2 x 2 + 2 = 18 of the 24 GPUs, each (node, GPU id) once: the
    scorers' GPUs are their own, not a learner's or an engine's."""
    held = [(a["node"], g) for a in sim["layout"]["actors"].values() for g in a["gpu_ids"]]
    assert len(held) == 18 and len(set(held)) == 18


def test_fake_gpu_ids_do_not_make_a_cuda_device(sim):
    rank0 = sim["layout"]["actors"]["actor_learner-0@sim"]
    assert rank0["gpu_ids"] and sim["layout"]["device"] == "cpu"


def test_generators_past_the_plan_and_replacements_find_an_engine_group(sim):
    layout = sim["layout"]
    extra = layout["extra"]
    # both planned groups held: generator-2 gets a new one; generator-3 replaces the killed generator-0 in its group
    assert extra["generator-2@sim"]["pg"] == layout["extra_groups"]["generator-extra-1"]
    assert extra["generator-3@sim"]["pg"] == layout["groups"]["generator-0"]["id"]
    assert len(extra["generator-2@sim"]["gpu_ids"]) == 2


def test_colocated_scorers_share_a_learner_rank_gpu(sim):
    co = sim["colocate"]
    a = co["actors"]
    for guest, host in (("reference-0@sim2", "actor_learner-0@sim2"), ("reward-0@sim2", "critic_learner-0@sim2")):
        assert a[guest]["node"] == a[host]["node"] and a[guest]["pg"] == a[host]["pg"]
        assert a[guest]["gpu_ids"] == a[host]["gpu_ids"]  # the same device
        assert a[guest]["resources"]["GPU"] == 0.25 and a[host]["resources"]["GPU"] == 0.75
    assert set(co["groups"]) == {"actor_learner", "critic_learner", "generator-0", "generator-1"}


def test_a_layout_that_cannot_fit_fails_up_front_with_a_table(sim):
    big = sim["too_big"]
    lines = big["error"].splitlines()
    assert "does not fit this cluster (3 node(s), CPU 120, GPU 24 in all)" in lines[0]
    header = next(line for line in lines if line.split()[:3] == ["role", "needed", "available"])
    rows = lines[lines.index(header) + 1:-1]
    # The engine groups are reserved before the plain actors: 8 + 4 + 6 x 2 = 24 GPUs are taken, so the last two
    # engines and both scorers (a GPU each) find none.
    assert [r[:header.index("needed")].strip() for r in rows] == [
        "generator (generator-6)", "generator (generator-7)", "reference", "reward"]
    needed = ["{CPU 1, GPU 2} STRICT_PACK", "{CPU 1, GPU 2} STRICT_PACK", "{CPU 0.5, GPU 1}", "{CPU 1, GPU 1}"]
    assert all(n in r and "GPU 0}" in r.split(n)[1] for n, r in zip(needed, rows, strict=True))
    assert big["new_groups"] == [] and big["actors"] == []  # nothing was created


def test_weight_push_crosses_nodes_by_node_id_and_never_through_the_driver(sim):
    """A learner rank stand-in on a node other than the driver's pushes to a generator on its node through
    shared-memory files and to one on the driver's node through the object store (the simulated nodes share
    one /dev/shm, so only node ids can tell them apart); a late joiner loads the kept buckets by ref; once the
    sender is gone those refs are lost, so the bytes lived with the sender, not with the driver."""
    w = sim["weights"]
    report, expected = w["report"], w["expected"]
    assert w["sender_node"] != w["driver_node"] and report["sender_node"] == w["sender_node"]
    assert report["strategies"] == ["shm", "object_store"]
    assert report["failures"] == {} and report["late"] == [] and report["buckets"] == w["blob_refs"] == 3
    near, far = report["per_generator"]
    assert near["how"] == "paths" and near["node"] == w["sender_node"]
    assert all(f"relay-weights-{w['sender_pid']}-" in p for p in near["paths"])  # the sender's own folder
    assert far["how"] == "blobs" and far["node"] == w["driver_node"] and far["arg_types"] == ["ndarray"]  # Ray resolved the refs: the buckets themselves
    for got in (near, far, w["joined"]):
        assert got["sums"] == expected and got["version"] == 1
        assert got["dtypes"]["model.norm.weight"] == "torch.bfloat16"
    assert w["joined"]["how"] == "blobs" and w["joined"]["node"] == w["driver_node"]
    assert w["after_sender_died"] in ("OwnerDiedError", "ObjectLostError")
    assert not any(os.path.exists(p) for p in near["paths"])  # the transfer folder was removed
    print(f"\n[weights] cross-node push scenario on the simulated cluster: {w['took_s']:.1f} s")
