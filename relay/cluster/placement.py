"""The placement plan: from a PPO config to what every role asks Ray for. Pure (no Ray): `plan_ppo(cfg)` gives
the bundles, placement groups and strategies; `relay.cluster.fit` checks a plan against a cluster's nodes;
`relay.cluster.groups` creates the placement groups and hands out actor options.

Roles and what they reserve (the `separate` mode):
- `actor_learner`, `critic_learner`: one placement group each, one bundle per rank (PACK, or STRICT_PACK). Ranks
  are numbered by node (`rank_bundles`), so tensor-parallel peers (consecutive ranks) share a node.
- `generator`: one actor per engine, spread across nodes (Ray's SPREAD) by default. A GPU engine with tensor
  parallelism > 1 gets its own STRICT_PACK placement group holding the engine's GPUs, reserved with the
  learners' before anything starts (see `generator_groups`).
- `reference`, `reward`, `buffer`: one plain actor each.

Modes rewrite that layout (`MODES`, one function each): `colocate` moves the reference and a reward model into
learner bundles, where they share the rank's GPU; `timeshare` puts the generators into the actor-learner
bundles, where generation and update take turns on the same cores. `auto` (the default) picks timeshare or
separate (`auto_mode`).
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

PG_STRATEGIES = ("PACK", "STRICT_PACK", "SPREAD")
ACTOR = "ACTOR"  # a group of one bundle that is a plain actor (no placement group): Ray places it alone
PIN_SHARE = 0.001  # what a bundle asks of a node-pin resource: any amount pins it, a small one leaves room


class PlacementError(ValueError):
    """The layout cannot be built or does not fit the cluster; the message says what is missing."""


@dataclass
class Bundle:
    """Resources one actor (or one placement-group bundle) asks for, and the nodes it may use."""

    cpus: float = 0.0
    gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    pin: str | None = None  # a node label KEY=VALUE, or a custom resource only the wanted nodes have

    def labels(self) -> dict[str, str]:
        """The node labels this bundle needs (from a KEY=VALUE pin)."""
        if self.pin and "=" in self.pin:
            key, value = self.pin.split("=", 1)
            return {key.strip(): value.strip()}
        return {}

    def demand(self) -> dict[str, float]:
        """Ray's resource dict (CPU, GPU, custom, a resource pin's share), zeros left out."""
        out = {"CPU": self.cpus, "GPU": self.gpus, **self.resources}
        if self.pin and "=" not in self.pin:
            out[self.pin] = out.get(self.pin, 0.0) + PIN_SHARE
        return {k: float(v) for k, v in out.items() if v}

    def plus(self, other: Bundle) -> Bundle:
        res = Counter(self.resources)
        res.update(other.resources)
        return Bundle(self.cpus + other.cpus, self.gpus + other.gpus, dict(res), self.pin)

    def text(self) -> str:
        parts = [f"{k} {v:g}" for k, v in self.demand().items()] + [f"{k}={v}" for k, v in self.labels().items()]
        return "{" + ", ".join(parts or ["nothing"]) + "}"


@dataclass
class GroupPlan:
    """What Ray reserves together: a placement group (`strategy` PACK / STRICT_PACK / SPREAD) or, with strategy
    ACTOR, one plain actor. `spread`: the role's groups prefer nodes that hold fewer of them."""

    name: str
    role: str
    bundles: list[Bundle]
    strategy: str = ACTOR
    spread: bool = False

    @property
    def placement_group(self) -> bool:
        return self.strategy != ACTOR

    def text(self) -> str:
        """'8 x {CPU 4, GPU 1} PACK' (identical bundles counted)."""
        counts = Counter(b.text() for b in self.bundles)
        body = " + ".join(f"{n} x {t}" if n > 1 else t for t, n in counts.items())
        how = {ACTOR: "", "STRICT_PACK": " STRICT_PACK (one node)"}.get(self.strategy, f" {self.strategy}")
        return body + how + (" spread" if self.spread and self.strategy in (ACTOR, "STRICT_PACK") else "")


@dataclass
class Member:
    """One actor of a role: the group (and bundle) it lives in and what it asks for itself."""

    group: str
    bundle: int | None = None  # None: a plain actor (its group is ACTOR)
    ask: Bundle = field(default_factory=Bundle)
    capture_children: bool = False  # tasks and actors it starts are placed in its group too


@dataclass
class Plan:
    """Groups in creation order, and each role's members (index = the role's actor index or rank)."""

    mode: str
    groups: list[GroupPlan]
    roles: dict[str, list[Member]]

    def group(self, name: str) -> GroupPlan:
        return next(g for g in self.groups if g.name == name)

    def totals(self) -> dict[str, float]:
        """Every resource the plan reserves, summed over all bundles."""
        total: Counter[str] = Counter()
        for g in self.groups:
            for b in g.bundles:
                total.update(b.demand())
        return dict(total)

    def describe(self) -> list[tuple[str, str]]:
        """(group, what it reserves) for logs."""
        return [(g.name, g.text()) for g in self.groups]


# --------------------------------------------------------------------------------------------- the layout
def _bundle(cpus: float, gpus: float, resources: Mapping[str, float], pin: str | None) -> Bundle:
    return Bundle(float(cpus), float(gpus), dict(resources), pin)


def learner_group(role: str, lc: Any) -> tuple[GroupPlan, list[Member]]:
    """One bundle per rank; each rank asks for its whole bundle (less any pin, which only places the bundle)."""
    b = _bundle(lc.num_cpus_per_rank, lc.num_gpus_per_rank, lc.resources_per_rank, lc.node_pin)
    group = GroupPlan(role, role, [dataclasses.replace(b) for _ in range(lc.num_ranks)], lc.placement_strategy)
    members = [Member(role, i, dataclasses.replace(b, pin=None)) for i in range(lc.num_ranks)]
    return group, members


def generator_groups(g: Any, gpus_present: bool = False) -> tuple[list[GroupPlan], list[Member]]:
    """Generator i is group `generator-<i>`: a plain actor, or for a GPU engine with tensor parallelism a
    STRICT_PACK placement group of its own holding all the engine's GPUs in one bundle. One bundle, not one per
    vLLM worker: the engine runs its workers as processes of the generator actor (vLLM's multiprocessing
    executor), which must see every GPU of the engine; the group reserves them up front, on one node.
    num_gpus_per_generator 0 means tensor_parallel_size GPUs on a cluster with GPUs (`gpus_present`), else none."""
    spread = g.placement_strategy == "SPREAD"
    gpus = g.num_gpus_per_generator or (float(g.tensor_parallel_size) if gpus_present else 0.0)
    groups, members = [], []
    for i in range(g.num_generators):
        name = f"generator-{i}"
        b = _bundle(g.num_cpus_per_generator, gpus, g.resources_per_generator, g.node_pin)
        if g.tensor_parallel_size > 1 and gpus > 0:
            groups.append(GroupPlan(name, "generator", [b], "STRICT_PACK", spread))
            members.append(Member(name, 0, dataclasses.replace(b, pin=None), capture_children=True))
        else:
            groups.append(GroupPlan(name, "generator", [b], ACTOR, spread))
            members.append(Member(name, None, dataclasses.replace(b)))
    return groups, members


def single(role: str, section: Any) -> tuple[GroupPlan, list[Member]]:
    b = _bundle(section.num_cpus, section.num_gpus, section.resources, section.node_pin)
    return GroupPlan(role, role, [b]), [Member(role, None, dataclasses.replace(b))]


def separate_layout(cfg: Any, gpus_present: bool = False) -> Plan:
    """Every role on resources of its own, groups in the order they are created: placement groups first."""
    groups: list[GroupPlan] = []
    roles: dict[str, list[Member]] = {}
    learners = [("actor_learner", cfg.actor_learner)]
    if cfg.algo.advantage_estimator == "gae":
        learners.append(("critic_learner", cfg.critic_learner))
    for role, lc in learners:
        group, roles[role] = learner_group(role, lc)
        groups.append(group)
    gens, roles["generator"] = generator_groups(cfg.generation, gpus_present)
    groups += gens
    scorers = ([("reference", cfg.reference)] if cfg.algo.kl_coef > 0 else []) + [("reward", cfg.reward)]
    for role, section in [*scorers, ("buffer", cfg.buffer)]:
        group, roles[role] = single(role, section)
        groups.append(group)
    groups.sort(key=lambda grp: not grp.placement_group)  # stable: reserved groups first, then plain actors
    return Plan("separate", groups, roles)


# ------------------------------------------------------------------------------------------------- modes
Mode = Callable[[Plan, Any], None]
MODES: dict[str, Mode] = {}


def mode(name: str) -> Callable[[Mode], Mode]:
    """Register a placement mode: a function that rewrites the `separate` layout in place."""
    def register(fn: Mode) -> Mode:
        MODES[name] = fn
        return fn
    return register


@mode("separate")
def _separate(plan: Plan, cfg: Any) -> None:
    """The layout as built: nothing shared."""


def move_into(plan: Plan, guest: str, host: str) -> None:
    """Put role `guest` (one plain actor) into a bundle of `host`'s placement group: the bundle grows by the
    guest's CPUs and custom resources; its GPUs are shared (the host rank in that bundle asks for less)."""
    grp, member = plan.group(guest), plan.roles[guest][0]
    ask = member.ask
    if ask.pin:
        raise PlacementError(f"{guest}: placement colocate puts it beside {host}; remove its node_pin")
    host_group = plan.group(host)
    taken = Counter(m.bundle for role, ms in plan.roles.items() if role != host for m in ms if m.group == host)
    index = min(range(len(host_group.bundles)), key=lambda i: (taken[i], i))  # the bundle with fewest guests
    rank = plan.roles[host][index]
    if ask.gpus and ask.gpus >= rank.ask.gpus:
        raise PlacementError(f"{guest}: its num_gpus {ask.gpus:g} is its share of a {host} rank's GPU and must be "
                             f"below what the rank has left ({rank.ask.gpus:g}); e.g. 0.25")
    host_group.bundles[index] = host_group.bundles[index].plus(dataclasses.replace(ask, gpus=0.0))
    rank.ask = dataclasses.replace(rank.ask, gpus=rank.ask.gpus - ask.gpus)
    plan.groups.remove(grp)
    plan.roles[guest] = [Member(host, index, ask)]


@mode("colocate")
def _colocate(plan: Plan, cfg: Any) -> None:
    """Reference beside an actor-learner rank; a reward model beside a critic rank (an actor rank without a
    critic); rule and HTTP rewards, generators and the buffer stay on their own."""
    if "reference" in plan.roles:
        move_into(plan, "reference", "actor_learner")
    if cfg.reward.kind == "model":
        move_into(plan, "reward", "critic_learner" if "critic_learner" in plan.roles else "actor_learner")


@mode("timeshare")
def _timeshare(plan: Plan, cfg: Any) -> None:
    """Generators beside actor-learner ranks (round robin over the bundles), asking for no CPUs of their own:
    they take turns with the learners on the same cores (sync mode; the learners' update takes every core,
    `relay.learners.group.LearnerGroup.hand_over_threads`). CPU only (config rules refuse GPUs)."""
    host = plan.group("actor_learner")
    gens = plan.roles["generator"]
    for i, member in enumerate(gens):
        index = i % len(host.bundles)
        ask = member.ask
        if ask.pin:
            raise PlacementError(f"generator-{i}: placement timeshare puts it beside an actor_learner rank; "
                                 "remove generation.node_pin")
        host.bundles[index] = host.bundles[index].plus(dataclasses.replace(ask, cpus=0.0, gpus=0.0))
        plan.groups.remove(plan.group(member.group))
        gens[i] = Member("actor_learner", index, dataclasses.replace(ask, cpus=0.0))


def auto_mode(cfg: Any, gpus_present: bool = False) -> tuple[str, str]:
    """What `placement: auto` becomes, and why: `timeshare` for a sync run on CPUs whose generators have no
    resources of their own to go to (it gave the GRPO benchmark 1.38x the throughput of `separate` on 2 cores),
    else `separate` (async runs overlap the phases; GPUs would need vLLM sleep mode; pinned or custom generator
    resources mean dedicated rollout nodes)."""
    g, a = cfg.generation, cfg.algo
    if a.mode != "sync":
        return "separate", f"algo.mode {a.mode} runs generation and update at the same time"
    learners = [cfg.actor_learner] + ([cfg.critic_learner] if a.advantage_estimator == "gae" else [])
    if gpus_present or g.num_gpus_per_generator or any(lc.num_gpus_per_rank for lc in learners):
        return "separate", "GPUs: engines do not sleep during updates yet"
    if g.tensor_parallel_size > 1:
        return "separate", "generation.tensor_parallel_size > 1: an engine of several processes"
    if g.node_pin or g.resources_per_generator:
        return "separate", "generation.node_pin / resources_per_generator keep the generators on their own nodes"
    return "timeshare", "CPU, sync mode: generation and update take turns, each with every core"


def plan_ppo(cfg: Any, gpus_present: bool = False) -> Plan:
    """The placement plan of a PPO config (`relay.config.PPOConfig`, read by attribute). `gpus_present`: the
    cluster has GPUs (generators asking for 0 then get tensor_parallel_size, as `GeneratorPool` does).
    `placement: auto` is planned as `auto_mode` decides."""
    name = auto_mode(cfg, gpus_present)[0] if cfg.placement == "auto" else cfg.placement
    if name not in MODES:
        raise PlacementError(f"placement {name!r} is unknown; choose auto or one of {', '.join(MODES)}")
    plan = separate_layout(cfg, gpus_present)
    MODES[name](plan, cfg)
    plan.mode = name
    return plan


# ----------------------------------------------------------------------------------------- rank ordering
def rank_bundles(bundle_nodes: Mapping[int, str]) -> list[int]:
    """Bundle index for each rank: bundles grouped by node (nodes in order of their first bundle), so
    consecutive ranks (tensor-parallel peers) share a node wherever a node holds enough bundles."""
    first: dict[str, int] = {}
    for index in sorted(bundle_nodes):
        first.setdefault(bundle_nodes[index], index)
    return sorted(bundle_nodes, key=lambda i: (first[bundle_nodes[i]], i))


def split_tp_groups(rank_nodes: list[str], tp: int) -> list[int]:
    """Tensor-parallel groups (ranks k*tp .. k*tp+tp-1) whose ranks are not all on one node."""
    return [k for k in range(len(rank_nodes) // tp) if len(set(rank_nodes[k * tp:(k + 1) * tp])) > 1]


def learner_plan(role: str, num_ranks: int, num_cpus: float = 1.0, num_gpus: float = 0.0,
                 resources: Mapping[str, float] | None = None, node_pin: str | None = None,
                 strategy: str = "PACK") -> Plan:
    """The plan of one learner group on its own (SFT, RM, DPO, or a group created without a PPO plan)."""
    from types import SimpleNamespace

    lc = SimpleNamespace(num_ranks=num_ranks, num_cpus_per_rank=num_cpus, num_gpus_per_rank=num_gpus,
                         resources_per_rank=dict(resources or {}), node_pin=node_pin, placement_strategy=strategy)
    group, members = learner_group(role, lc)
    return Plan("separate", [group], {role: members})
