"""Does a placement plan fit a cluster? A pure simulation (no Ray) over the nodes' total resources that places
each group the way its strategy asks, in the plan's order, and reports per role what is missing.

It is deliberately simple: first a role's groups as Ray would place them (one node for STRICT_PACK, fewest nodes
for PACK, different nodes for spread roles), best fit otherwise. A layout it cannot place is refused before any
actor starts (Ray would wait forever). Its node choices, redone around where Ray actually put the learner
groups (`held`), serve as soft targets for spread engines.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from relay.cluster.placement import Bundle, GroupPlan, Plan, PlacementError

EPS = 1e-9
KNOWN = ("CPU", "GPU")  # shown first in tables


@dataclass
class Node:
    """One node: its total resources (CPU, GPU, custom ones, Ray's `node:<ip>`) and labels."""

    node_id: str
    resources: dict[str, float]
    labels: dict[str, str] = field(default_factory=dict)


def nodes_from_ray(entries: Iterable[Mapping[str, Any]]) -> list[Node]:
    """Alive nodes from `ray.nodes()` records (NodeID, Resources, Labels, Alive)."""
    return [Node(str(e["NodeID"]), {k: float(v) for k, v in (e.get("Resources") or {}).items()},
                 dict(e.get("Labels") or {}))
            for e in entries if e.get("Alive", True)]


@dataclass
class Missing:
    """One row of the table: a group that found no room."""

    role: str
    group: str
    needed: str
    available: str


@dataclass
class Fit:
    """Where the simulation put each group's bundles (node ids), and what did not fit."""

    placed: dict[str, list[str]] = field(default_factory=dict)
    missing: list[Missing] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.missing


def _fits(free: Mapping[str, float], demand: Mapping[str, float]) -> bool:
    return all(free.get(k, 0.0) + EPS >= v for k, v in demand.items())


def _allowed(node: Node, bundle: Bundle) -> bool:
    return all(node.labels.get(k) == v for k, v in bundle.labels().items())


def _sum(bundles: Iterable[Bundle]) -> dict[str, float]:
    total: Counter[str] = Counter()
    for b in bundles:
        total.update(b.demand())
    return dict(total)


def _text(amounts: Mapping[str, float]) -> str:
    return "{" + ", ".join(f"{k} {max(v, 0.0):g}" for k, v in amounts.items()) + "}"


def _room(free: Mapping[str, float]) -> tuple[float, float]:
    return free.get("GPU", 0.0), free.get("CPU", 0.0)


class _Cluster:
    """Free resources per node while the plan is placed."""

    def __init__(self, nodes: list[Node]):
        self.nodes = nodes
        self.free = {n.node_id: dict(n.resources) for n in nodes}
        self.role_count: Counter[tuple[str, str]] = Counter()  # (role, node) -> groups of that role there

    def take(self, node_id: str, demand: Mapping[str, float]) -> None:
        for k, v in demand.items():
            self.free[node_id][k] = self.free[node_id].get(k, 0.0) - v

    def candidates(self, bundles: list[Bundle], demand: Mapping[str, float]) -> list[Node]:
        return [n for n in self.nodes if all(_allowed(n, b) for b in bundles) and _fits(self.free[n.node_id], demand)]

    def choose(self, nodes: list[Node], group: GroupPlan) -> Node:
        """Spread roles: the node with fewest groups of the role, then most room. Others: best fit (least room
        left), which keeps large holes for the groups that need them."""
        if group.spread:
            return min(nodes, key=lambda n: (self.role_count[group.role, n.node_id],
                                             tuple(-x for x in _room(self.free[n.node_id]))))
        return min(nodes, key=lambda n: _room(self.free[n.node_id]))

    def place(self, group: GroupPlan) -> list[str] | None:
        """Node per bundle, resources taken; None (nothing taken) when the group does not fit."""
        if group.strategy != "SPREAD":
            whole = self.candidates(group.bundles, _sum(group.bundles))
            if whole:
                node = self.choose(whole, group)
                self.take(node.node_id, _sum(group.bundles))
                self.role_count[group.role, node.node_id] += 1
                return [node.node_id] * len(group.bundles)
            if group.strategy != "PACK":
                return None
        return self._bundle_by_bundle(group)

    def _bundle_by_bundle(self, group: GroupPlan) -> list[str] | None:
        """PACK over several nodes (fullest use of the roomiest nodes), or SPREAD (fewest of the group first)."""
        saved = {k: dict(v) for k, v in self.free.items()}
        out: list[str] = []
        for b in group.bundles:
            nodes = self.candidates([b], b.demand())
            if not nodes:
                self.free = saved
                return None
            if group.strategy == "SPREAD":
                node = min(nodes, key=lambda n: (out.count(n.node_id), tuple(-x for x in _room(self.free[n.node_id]))))
            else:
                node = next((n for n in nodes if n.node_id in out), None) or max(
                    nodes, key=lambda n: _room(self.free[n.node_id]))
            self.take(node.node_id, b.demand())
            out.append(node.node_id)
        for node_id in set(out):
            self.role_count[group.role, node_id] += 1
        return out

    def available(self, group: GroupPlan) -> str:
        """What the nodes this group may use have left, in the resources it asks for."""
        keys = sorted(_sum(group.bundles), key=lambda k: (k not in KNOWN, KNOWN.index(k) if k in KNOWN else 0, k))
        nodes = [n for n in self.nodes if all(_allowed(n, b) for b in group.bundles)]
        if not nodes:
            labels = {k: v for b in group.bundles for k, v in b.labels().items()}
            return f"no node has label {', '.join(f'{k}={v}' for k, v in labels.items())}"
        total = {k: sum(self.free[n.node_id].get(k, 0.0) for n in nodes) for k in keys}
        best = max(nodes, key=lambda n: _room(self.free[n.node_id]))
        one = {k: self.free[best.node_id].get(k, 0.0) for k in keys}
        return f"{_text(total)} free on {len(nodes)} node(s), at most {_text(one)} on one"


def fit(plan: Plan, nodes: list[Node], held: Mapping[str, Sequence[str]] | None = None) -> Fit:
    """Place the plan's groups in order; a group that does not fit is reported and takes nothing. `held`: groups
    Ray has placed already (group name -> node id per bundle), taken where they are rather than simulated."""
    cluster, result = _Cluster(nodes), Fit()
    for name, where in (held or {}).items():
        group = plan.group(name)
        for bundle, node_id in zip(group.bundles, where):
            cluster.take(node_id, bundle.demand())
        for node_id in set(where):
            cluster.role_count[group.role, node_id] += 1
        result.placed[name] = list(where)
    for group in plan.groups:
        if group.name in result.placed:
            continue
        where = cluster.place(group)
        if where is None:
            result.missing.append(Missing(group.role, group.name, group.text(), cluster.available(group)))
        else:
            result.placed[group.name] = where
    return result


def table(rows: list[tuple[str, str, str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def check_fit(plan: Plan, nodes: list[Node]) -> Fit:
    """`fit`, raising PlacementError with a table (role, needed, available) when something does not fit."""
    result = fit(plan, nodes)
    if result.ok:
        return result
    totals = _sum(Bundle(resources=n.resources) for n in nodes)
    have = ", ".join(f"{k} {totals.get(k, 0.0):g}" for k in KNOWN)
    rows = [("role", "needed", "available")]
    rows += [(m.group if m.group == m.role else f"{m.role} ({m.group})", m.needed, m.available)
             for m in result.missing]
    raise PlacementError(
        f"the placement plan (mode {plan.mode}) does not fit this cluster ({len(nodes)} node(s), {have} in all); "
        f"nothing was started. What is missing, with what was left after the roles above it:\n{table(rows)}\n"
        "Add nodes, or lower num_cpus/num_gpus, num_ranks or num_generators, or change a node_pin.")
