"""The placement plan as pure functions (no Ray): roles -> bundles -> groups, modes, the fit against node
descriptions (plain dicts as `ray.nodes()` gives them) with its missing-resources table, rank ordering, and the
config fields that feed it."""
from __future__ import annotations

import typing
from pathlib import Path

import pytest

from relay.cluster.fit import check_fit, fit, nodes_from_ray
from relay.cluster.placement import (
    ACTOR, MODES, PIN_SHARE, PlacementError, learner_plan, plan_ppo, rank_bundles, split_tp_groups,
)
from relay.config import ConfigError, load_config
from relay.config.fields import PlacementMode

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def ppo(preset: str = "ppo_tiny.yaml", *overrides: str):
    return load_config("ppo", CONFIGS / preset, list(overrides))


def gpu_nodes(n: int, gpus: int = 8, cpus: int = 48, labels: list[dict] | None = None) -> list:
    """`ray.nodes()`-shaped records, one dead node among them (never used)."""
    records = [{"NodeID": f"node{i}", "Alive": True, "Resources": {"CPU": cpus, "GPU": gpus, "node:10.0.0.%d" % i: 1},
                "Labels": (labels or [{}] * n)[i]} for i in range(n)]
    return nodes_from_ray(records + [{"NodeID": "dead", "Alive": False, "Resources": {"CPU": 999, "GPU": 99}}])


def test_modes_registry_matches_the_config_choices():
    assert set(MODES) | {"auto"} == set(typing.get_args(PlacementMode))
    assert ppo().placement == "auto"  # the default
    assert plan_ppo(ppo("ppo_7b_tp4.yaml"), gpus_present=True).mode == "separate"  # auto on a GPU cluster


@pytest.mark.parametrize("overrides, expected, why", [
    ((), "timeshare", "CPU, sync mode"),
    (("algo.mode=async", "algo.max_staleness=2"), "separate", "algo.mode async"),
    (("generation.node_pin=tier=rollout",), "separate", "generation.node_pin"),
    (("generation.resources_per_generator={vllm: 1}",), "separate", "resources_per_generator"),
    (("actor_learner.num_gpus_per_rank=1",), "separate", "GPUs"),
    (("generation.tensor_parallel_size=2",), "separate", "tensor_parallel_size"),
])
def test_auto_is_timeshare_for_sync_cpu_runs_without_rollout_resources(overrides, expected, why):
    from relay.cluster.placement import auto_mode

    cfg = ppo("ppo_tiny_grpo.yaml", *overrides)
    mode, reason = auto_mode(cfg)
    assert (mode, why in reason) == (expected, True)
    plan = plan_ppo(cfg)
    assert plan.mode == expected
    assert any(g.role == "generator" for g in plan.groups) == (expected == "separate")
    # a cluster with GPUs: the engines would have to sleep, so separate whatever the config asks
    assert auto_mode(cfg, gpus_present=True)[0] == "separate"


def test_a_timeshare_system_switched_to_async_is_refused_before_an_episode():
    """Tests and benchmarks switch `cfg.algo.mode` between `run_episodes` calls; a system whose placement (auto)
    became timeshare hands the cores to one phase at a time and must not run both at once."""
    from relay.launch.ppo import PPOSystem

    system = PPOSystem(ppo("ppo_tiny_grpo.yaml", "placement=timeshare"))
    system.cfg.algo.mode, system.cfg.algo.max_staleness = "async", 2
    with pytest.raises(ValueError, match="async with placement timeshare"):
        system._check_async()
    system.cfg.placement = "separate"
    system._check_async()  # separate resources overlap the phases


def test_tiny_preset_plan_fits_the_suite_machine():
    plan = plan_ppo(ppo("ppo_tiny.yaml", "placement=separate"))
    names = [g.name for g in plan.groups]
    assert names[:2] == ["actor_learner", "critic_learner"]  # placement groups first, in creation order
    assert plan.group("actor_learner").strategy == "PACK" and plan.group("buffer").strategy == ACTOR
    assert plan.group("generator-0").spread  # SPREAD by default
    cfg = ppo("ppo_tiny.yaml", "placement=separate")
    cpus = (cfg.actor_learner.num_ranks * cfg.actor_learner.num_cpus_per_rank
            + cfg.critic_learner.num_ranks * cfg.critic_learner.num_cpus_per_rank
            + cfg.generation.num_generators * cfg.generation.num_cpus_per_generator
            + cfg.reference.num_cpus + cfg.reward.num_cpus + cfg.buffer.num_cpus)
    assert plan.totals() == {"CPU": cpus}
    one_node = nodes_from_ray([{"NodeID": "local", "Resources": {"CPU": 16}}])  # the test suite's cluster
    assert check_fit(plan, one_node).ok


CPU_PPO_PRESETS = sorted(p.name for p in CONFIGS.glob("*.yaml")
                         if p.name.startswith(("ppo_", "demo_ppo", "demo_grpo")) and "7b" not in p.name and "gpu" not in p.name)


@pytest.mark.parametrize("preset", CPU_PPO_PRESETS)
def test_every_cpu_preset_fits_sixteen_logical_cpus(preset):
    cfg = ppo(preset)
    assert check_fit(plan_ppo(cfg), nodes_from_ray([{"NodeID": "local", "Resources": {"CPU": 16}}])).ok


def test_7b_layout_bundles_and_where_the_fit_puts_them():
    plan = plan_ppo(ppo("ppo_7b_tp4.yaml"), gpus_present=True)
    actor = plan.group("actor_learner")
    assert actor.text() == "8 x {CPU 4, GPU 1} PACK"
    assert plan.group("generator-1").text() == "{CPU 1, GPU 2} STRICT_PACK (one node) spread"
    assert plan.group("reference").text() == "{CPU 0.5, GPU 1}" and plan.group("reward").text() == "{CPU 1, GPU 1}"
    assert plan.totals()["GPU"] == 8 + 4 + 2 * 2 + 2  # learners, engines, and a GPU each for the two scorers
    result = check_fit(plan, gpu_nodes(3))
    placed = result.placed
    assert len(set(placed["actor_learner"])) == 1 and len(set(placed["critic_learner"])) == 1
    assert placed["actor_learner"][0] != placed["critic_learner"][0]
    assert placed["generator-0"] != placed["generator-1"]  # spread over the nodes with room
    assert len(placed["reference"]) == len(placed["reward"]) == 1
    assert "dead" not in {n for where in placed.values() for n in where}


def test_engines_are_aimed_around_where_ray_really_put_the_learners():
    """Ray may place the PACK learner groups on other nodes than the simulation did; the engines' targets are
    then redone around them (`held`), so the two engines still get a node each and no GPU is counted twice."""
    plan = plan_ppo(ppo("ppo_7b_tp4.yaml"), gpus_present=True)
    nodes = gpu_nodes(3)
    simulated = check_fit(plan, nodes).placed
    assert [simulated[g][0] for g in ("actor_learner", "critic_learner", "generator-0")] == ["node0", "node1", "node2"]
    # Ray's choice: the actor group on node2, where the simulation meant to put an engine
    learners = {"actor_learner": ["node2"] * 8, "critic_learner": ["node1"] * 4}
    held = fit(plan, nodes, held=learners)
    assert held.ok and held.placed["actor_learner"] == learners["actor_learner"]
    engines = [held.placed[f"generator-{i}"][0] for i in range(2)]
    assert engines[0] != engines[1]
    assert "node2" not in engines  # its 8 GPUs are taken
    assert sorted(engines) == ["node0", "node1"]  # node1 has 4 GPUs left beside the critic


def test_unsatisfiable_layout_lists_what_is_missing_per_role():
    plan = plan_ppo(ppo("ppo_7b_tp4.yaml", "generation.num_generators=3"), gpus_present=True)
    with pytest.raises(PlacementError) as err:
        check_fit(plan, gpu_nodes(2))
    text = str(err.value)
    assert "(2 node(s), CPU 96, GPU 16 in all)" in text
    rows = {line.split()[0]: line for line in text.splitlines()[2:] if line.startswith("  ") and "needed" not in line}
    # actor (8 GPUs, 32 CPUs) fills one node; critic (4) and two engines (2 + 2) the other; the third engine and
    # the two scorers (a GPU each) find none
    assert [r.split()[1] for r in text.splitlines() if r.startswith("  generator")] == ["(generator-2)"]
    assert sorted(rows) == ["generator", "reference", "reward"]
    assert "{CPU 0.5, GPU 1}" in rows["reference"] and "{CPU 1, GPU 1}" in rows["reward"]
    assert rows["generator"].split("  ")[2:] == ["{CPU 1, GPU 2} STRICT_PACK (one node) spread",
                                                 "{CPU 46, GPU 0} free on 2 node(s), at most {CPU 30, GPU 0} on one"]


def test_strict_pack_needs_one_node_even_when_the_totals_fit():
    cpu_scorers = ("reference.num_gpus=0", "reward.num_gpus=0")  # 16 + 4 + 2 x 2 = 24: the totals just fit
    plan = plan_ppo(ppo("ppo_7b_tp4.yaml", "actor_learner.placement_strategy=STRICT_PACK",
                        "actor_learner.num_ranks=16", "algo.train_batch_size=8", *cpu_scorers), gpus_present=True)
    assert plan.totals()["GPU"] == 3 * 8
    missing = fit(plan, gpu_nodes(3)).missing
    assert [m.group for m in missing] == ["actor_learner"] and "STRICT_PACK (one node)" in missing[0].needed
    # PACK may use two nodes: ranks by node, tp groups of 4 stay whole on 8-GPU nodes
    plan = plan_ppo(ppo("ppo_7b_tp4.yaml", "actor_learner.num_ranks=16", "algo.train_batch_size=8", *cpu_scorers),
                    gpus_present=True)
    where = check_fit(plan, gpu_nodes(3)).placed["actor_learner"]
    order = rank_bundles(dict(enumerate(where)))
    assert split_tp_groups([where[b] for b in order], 4) == []


def test_label_and_resource_pins():
    nodes = gpu_nodes(3, labels=[{}, {"pool": "gen"}, {"pool": "gen"}])
    plan = plan_ppo(ppo("ppo_7b_tp4.yaml", "generation.node_pin=pool=gen"), gpus_present=True)
    placed = check_fit(plan, nodes).placed
    assert {placed["generator-0"][0], placed["generator-1"][0]} <= {"node1", "node2"}
    plan = plan_ppo(ppo("ppo_7b_tp4.yaml", "generation.node_pin=pool=none"), gpus_present=True)
    missing = fit(plan, nodes).missing
    assert {m.role for m in missing} == {"generator"} and "no node has label pool=none" in missing[0].available
    plan = plan_ppo(ppo("ppo_tiny.yaml", "buffer.node_pin=node:10.0.0.2", "reward.resources={ssd: 1}"))
    assert plan.group("buffer").bundles[0].demand() == {"CPU": 0.5, "node:10.0.0.2": PIN_SHARE}
    placed = fit(plan, gpu_nodes(3)).placed
    assert placed["buffer"] == ["node2"] and "reward" not in placed  # no node has an `ssd` resource


def test_colocate_moves_scorers_into_learner_bundles():
    cfg = ppo("ppo_7b_tp4.yaml", "placement=colocate", "reference.num_gpus=0.25", "reward.num_gpus=0.25")
    plan = plan_ppo(cfg, gpus_present=True)
    assert "reference" not in [g.name for g in plan.groups] and "reward" not in [g.name for g in plan.groups]
    ref, rew = plan.roles["reference"][0], plan.roles["reward"][0]
    assert (ref.group, ref.bundle, ref.ask.gpus) == ("actor_learner", 0, 0.25)
    assert (rew.group, rew.bundle, rew.ask.gpus) == ("critic_learner", 0, 0.25)
    assert plan.roles["actor_learner"][0].ask.gpus == 0.75 and plan.roles["actor_learner"][1].ask.gpus == 1.0
    assert plan.group("actor_learner").bundles[0].demand() == {"CPU": 4.5, "GPU": 1.0}  # + the reference's CPUs
    assert plan.totals()["GPU"] == 16  # no GPUs of their own
    # without a critic the reward model joins another actor rank; a rule reward stays on its own
    grpo = ppo("ppo_7b_tp4.yaml", "placement=colocate", "reference.num_gpus=0.25", "reward.num_gpus=0.25",
               "algo.advantage_estimator=grpo", "generation.n_samples_per_prompt=2", "algo.train_batch_size=32")
    plan = plan_ppo(grpo, gpus_present=True)
    assert [(m.group, m.bundle) for m in plan.roles["reward"]] == [("actor_learner", 1)]
    rule = ppo("ppo_tiny.yaml", "placement=colocate", "reward.kind=rule", "reward.rule=arithmetic")
    assert plan_ppo(rule).group("reward").strategy == ACTOR


def test_colocated_share_must_leave_the_rank_some_gpu():
    with pytest.raises(ConfigError, match=r"reference.num_gpus: with placement colocate"):
        ppo("ppo_7b_tp4.yaml", "placement=colocate", "reference.num_gpus=1")
    with pytest.raises(ConfigError, match=r"reward.num_gpus: placement colocate shares critic_learner's GPUs"):
        ppo("ppo_tiny.yaml", "placement=colocate", "reward.kind=model", "reward.model=/models/rm", "reward.num_gpus=0.5")
    cfg = ppo("ppo_7b_tp4.yaml", "placement=colocate", "reference.num_gpus=0.5", "reward.num_gpus=0.25",
              "algo.advantage_estimator=grpo", "generation.n_samples_per_prompt=2", "algo.train_batch_size=32")
    cfg.actor_learner.num_ranks = 1  # built in code past the rules: the plan still refuses an over-shared GPU
    cfg.reward.num_gpus = 0.5
    with pytest.raises(PlacementError, match="reward: its num_gpus 0.5 .* below what the rank has left"):
        plan_ppo(cfg, gpus_present=True)


def test_timeshare_puts_generators_in_actor_bundles_without_cpus_of_their_own():
    separate = plan_ppo(ppo("ppo_tiny_grpo.yaml", "generation.num_generators=3", "actor_learner.num_ranks=2",
                            "algo.train_batch_size=8", "generation.resources_per_generator={vllm: 1}"))
    plan = plan_ppo(ppo("ppo_tiny_grpo.yaml", "generation.num_generators=3", "actor_learner.num_ranks=2",
                        "algo.train_batch_size=8", "generation.resources_per_generator={vllm: 1}", "placement=timeshare"))
    assert [(m.group, m.bundle) for m in plan.roles["generator"]] == [("actor_learner", 0), ("actor_learner", 1),
                                                                      ("actor_learner", 0)]  # round robin
    assert all(m.ask.cpus == 0 and m.ask.resources == {"vllm": 1.0} for m in plan.roles["generator"])
    assert not any(g.role == "generator" for g in plan.groups)
    # the generators' CPUs are gone from the total; their custom resources moved into the learner bundles
    assert separate.totals()["CPU"] - plan.totals()["CPU"] == 3 * 1.0
    assert [b.demand() for b in plan.group("actor_learner").bundles] == [{"CPU": 1.0, "vllm": 2.0}, {"CPU": 1.0, "vllm": 1.0}]
    small = gpu_nodes(1, gpus=0, cpus=3)
    assert fit(plan_ppo(ppo("ppo_tiny_grpo.yaml", "placement=timeshare")), small).ok  # 1 + reward 1 + buffer 0.5
    assert not fit(plan_ppo(ppo("ppo_tiny_grpo.yaml", "placement=separate")), small).ok  # + the generator's core


def test_timeshare_needs_sync_mode_and_cpus():
    with pytest.raises(ConfigError, match="placement: timeshare hands the cores .* needs algo.mode sync"):
        ppo("ppo_tiny_grpo.yaml", "placement=timeshare", "algo.mode=async", "algo.max_staleness=2")
    with pytest.raises(ConfigError, match="placement: timeshare is built for CPU"):
        ppo("ppo_7b_tp4.yaml", "placement=timeshare")


def test_generator_gpus_follow_the_cluster_when_unset():
    cfg = ppo("ppo_tiny.yaml", "generation.tensor_parallel_size=2")
    assert plan_ppo(cfg).group("generator-0").strategy == ACTOR  # CPU engine: vLLM's own processes
    gpu = plan_ppo(cfg, gpus_present=True).group("generator-0")
    assert gpu.strategy == "STRICT_PACK" and gpu.bundles[0].gpus == 2.0
    with pytest.raises(ConfigError, match="generation.num_gpus_per_generator: 1 with tensor_parallel_size 2"):
        ppo("ppo_tiny.yaml", "generation.tensor_parallel_size=2", "generation.num_gpus_per_generator=1")


@pytest.mark.parametrize("override, field", [
    ("generation.node_pin==gen", "generation.node_pin"),
    ("reward.node_pin=zone=", "reward.node_pin"),
    ("buffer.node_pin=GPU", "buffer.node_pin"),
    ("actor_learner.resources_per_rank={CPU: 1}", "actor_learner.resources_per_rank"),
    ("reference.resources={a100: -1}", "reference.resources.a100"),
    ("placement=hybrid", "placement"),
])
def test_bad_placement_fields_are_named(override, field):
    with pytest.raises(ConfigError, match=rf"{field}: "):
        ppo("ppo_tiny.yaml", override)


def test_ranks_are_numbered_by_node():
    # Ray put bundles 0 and 2 on node b, 1 and 3 on node a: ranks 0,1 -> b, ranks 2,3 -> a
    order = rank_bundles({0: "b", 1: "a", 2: "b", 3: "a"})
    assert order == [0, 2, 1, 3]
    nodes = {0: "b", 1: "a", 2: "b", 3: "a"}
    assert split_tp_groups([nodes[b] for b in order], 2) == []
    assert split_tp_groups([nodes[b] for b in range(4)], 2) == [0, 1]  # bundle order would split both pairs


def test_a_learner_group_on_its_own():
    plan = learner_plan("sft-learner", 2, num_cpus=1.0, resources={"ssd": 1}, node_pin="zone=a",
                        strategy="STRICT_PACK")
    group = plan.group("sft-learner")
    assert group.strategy == "STRICT_PACK" and len(group.bundles) == 2
    assert group.bundles[0].demand() == {"CPU": 1.0, "ssd": 1.0} and group.bundles[0].labels() == {"zone": "a"}
    assert plan.roles["sft-learner"][1].ask.pin is None  # the bundle carries the pin, not the rank


def test_gpu_smoke_config_puts_every_role_on_one_gpu():
    """configs/ppo_gpu_smoke.yaml (scripts/gpu_smoke.sh): valid for CUDA, every role with a GPU share, all on
    one node with one GPU."""
    from relay.config import validate

    cfg = ppo("ppo_gpu_smoke.yaml")
    validate(cfg, "cuda")
    plan = plan_ppo(cfg, gpus_present=True)
    roles = {g.role for g in plan.groups if any(b.gpus for b in g.bundles)}
    assert roles == {"actor_learner", "critic_learner", "generator", "reference", "reward"}
    assert plan.totals()["GPU"] <= 1.0
    assert fit(plan, gpu_nodes(1, gpus=1, cpus=16)).ok


def test_engine_threads_follow_the_placement():
    from relay.launch.ppo import engine_threads

    assert engine_threads(ppo("ppo_tiny_grpo.yaml"), cores=8) == 1
    assert engine_threads(ppo("ppo_tiny_grpo.yaml", "placement=timeshare", "generation.num_generators=2"), cores=8) == 4
    assert engine_threads(ppo("ppo_tiny_grpo.yaml", "placement=timeshare", "generation.num_generators=3"), cores=2) == 1
    assert engine_threads(ppo("ppo_tiny_grpo.yaml", "placement=timeshare", "generation.cpu_threads=3"), cores=8) == 3


def test_cores_shared_over_the_ranks_that_train_at_once():
    from relay.learners.group import share_node_cores

    # one actor rank and one critic rank on a 2-core node: a core each (serially each would take both)
    assert share_node_cores([[("a", 2)], [("a", 2)]]) == [[1], [1]]
    assert share_node_cores([[("a", 2)]]) == [[2]]
    # actor ranks on two nodes, the critic on the first only: node a's 8 cores go to 2 ranks, b's 6 to 1
    assert share_node_cores([[("a", 8), ("b", 6)], [("a", 8)]]) == [[4, 6], [4]]
    # more ranks than cores: every rank still gets a thread
    assert share_node_cores([[("a", 1), ("a", 1)], [("a", 1)]]) == [[1, 1], [1]]
