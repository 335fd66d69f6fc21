"""The thin Ray layer of a placement plan: check it against the cluster's nodes, create its placement groups
before any actor starts, and give each role's actors their options (`Placement.options`).

Learner ranks are numbered by node (`relay.cluster.placement.rank_bundles`). Generators past the planned count
(`relay scale`, replacements) get options too: plain actors as planned, and tensor-parallel GPU engines a free
planned group, else a new one (removed with the rest by `release`).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from relay.cluster.fit import Fit, Missing, check_fit, nodes_from_ray, table
from relay.cluster.fit import fit as _fit
from relay.cluster.options import NAMESPACE
from relay.cluster.placement import Bundle, GroupPlan, Member, Plan, PlacementError, rank_bundles

logger = logging.getLogger("relay.cluster.placement")


def actor_resources(ask: Bundle) -> dict[str, Any]:
    """num_cpus / num_gpus / resources / label_selector of one actor (a resource pin is in `resources`)."""
    opts: dict[str, Any] = {"num_cpus": ask.cpus, "num_gpus": ask.gpus}
    custom = {k: v for k, v in ask.demand().items() if k not in ("CPU", "GPU")}
    if custom:
        opts["resources"] = custom
    if ask.labels():
        opts["label_selector"] = ask.labels()
    return opts


def _ray_bundle(b: Bundle) -> dict[str, float]:
    # Ray refuses an empty bundle; a zero-CPU actor group (CPU 0 asked) still reserves a sliver.
    return b.demand() or {"CPU": 0.001}


class Placement:
    """A plan's placement groups, created and ready; `options(role, i)` places role's actor i in them."""

    def __init__(self, plan: Plan, run: str | None = None, fit: Fit | None = None):
        self.plan, self.run, self.fit = plan, run, fit
        self.groups: dict[str, PlacementGroup] = {}
        self.bundle_nodes: dict[str, dict[int, str]] = {}
        self.rank_order: dict[str, list[int]] = {}
        self._slots: dict[str, str | None] = {}  # tensor-parallel engine group -> the generator holding it
        self._extra = 0

    # ---------------------------------------------------------------------------------------------- creation
    @classmethod
    def reserve(cls, plan: Plan, run: str | None = None, timeout_s: float = 300.0) -> Placement:
        """Check the plan against the cluster's nodes (PlacementError with a table when it cannot fit), then
        create every placement group and wait until all are ready (PlacementError naming the groups still
        waiting, e.g. on resources other jobs hold; the groups made are removed)."""
        nodes = nodes_from_ray(ray.nodes())
        fit = check_fit(plan, nodes)
        self = cls(plan, run, fit)
        reserved = [g for g in plan.groups if g.placement_group]
        # Ray puts PACK learner groups where it likes, not where the fit simulated them; engines aimed at the
        # fit's nodes could then find theirs full and pile onto one node. So: learners first, then the engines'
        # targets redone around where the learners really are.
        targeted = [g for g in reserved if _targeted(g)]
        try:
            self._reserve([g for g in reserved if g not in targeted], fit, timeout_s)
            if targeted:
                self.fit = _fit(plan, nodes, held={name: self._nodes_of(name) for name in self.groups})
                self._reserve(targeted, self.fit, timeout_s)
        except BaseException:
            self.release()
            raise
        for name, pg in self.groups.items():
            self.bundle_nodes[name] = dict(placement_group_table(pg)["bundles_to_node_id"])
            self.rank_order[name] = rank_bundles(self.bundle_nodes[name])
        self._slots = {g.name: None for g in plan.groups if g.role == "generator" and g.placement_group}
        return self

    def _reserve(self, groups: list[GroupPlan], fit: Fit, timeout_s: float) -> None:
        for group in groups:
            self.groups[group.name] = self._create(group, fit.placed.get(group.name))
        self._wait([g.name for g in groups], timeout_s)

    def _nodes_of(self, name: str) -> list[str]:
        """The node id of each bundle of a ready group, in bundle order."""
        where = placement_group_table(self.groups[name])["bundles_to_node_id"]
        return [where[i] for i in range(len(where))]

    def _create(self, group: GroupPlan, nodes: list[str] | None) -> PlacementGroup:
        kwargs: dict[str, Any] = {}
        labels = [b.labels() for b in group.bundles]
        if any(labels):
            kwargs["bundle_label_selector"] = labels
        if _targeted(group) and nodes:
            kwargs["_soft_target_node_id"] = nodes[0]  # the node the fit chose to spread the role's groups
        name = f"relay/{group.name}@{self.run}" if self.run else f"relay/{group.name}"
        return placement_group([_ray_bundle(b) for b in group.bundles], strategy=group.strategy, name=name, **kwargs)

    def _wait(self, names: list[str], timeout_s: float) -> None:
        refs = {self.groups[n].ready(): n for n in names}
        _, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s) if refs else ([], [])
        if pending:
            free = ray.available_resources()
            rows = [("role", "needed", "available now")]
            for ref in pending:
                group = self.plan.group(refs[ref])
                keys = sorted({k for b in group.bundles for k in b.demand()})
                rows.append((group.name, group.text(), "{" + ", ".join(f"{k} {free.get(k, 0.0):g}" for k in keys) + "}"))
            raise PlacementError(
                f"placement groups not ready after {timeout_s:.0f} s (the layout fits the cluster's nodes, but "
                f"their resources are held, e.g. by another job); nothing was started:\n{table(rows)}")

    def refresh(self, names: list[str], timeout_s: float) -> list[str]:
        """After a node died: wait until `names`' groups are whole again (Ray moves a dead node's bundles to
        nodes with room) and re-read where their bundles are, so new ranks are numbered by node again. Returns
        the groups whose bundles moved; PlacementError naming the groups still waiting after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        present = waiting = [n for n in names if n in self.groups]
        while waiting:
            alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
            waiting = [n for n in waiting if not _whole(placement_group_table(self.groups[n]), alive)]
            if waiting and time.monotonic() > deadline:
                raise PlacementError(f"placement groups {', '.join(waiting)} not whole again after {timeout_s:.0f} s "
                                     "(a node holding their bundles is gone and no other node has room)")
            if waiting:
                time.sleep(0.2)
        moved = []
        for name in present:
            nodes = dict(placement_group_table(self.groups[name])["bundles_to_node_id"])
            if nodes != self.bundle_nodes.get(name):
                moved.append(name)
            self.bundle_nodes[name], self.rank_order[name] = nodes, rank_bundles(nodes)
        return moved

    # ---------------------------------------------------------------------------------------------- actors
    def options(self, role: str, index: int, name: str | None = None) -> dict[str, Any]:
        """Ray options (resources and scheduling strategy) for `role`'s actor `index` (a learner rank, a
        generator's index). Generators past the plan use the first one's shape. Create the named actor right
        away: a tensor-parallel engine's group counts as free again once its holder's name is gone."""
        members = self.plan.roles[role]
        member = members[index] if index < len(members) else dataclasses.replace(members[0])
        if role == "generator":
            return self._generator(member, name or f"generator-{index}")
        return self._member(member)

    def _member(self, member: Member) -> dict[str, Any]:
        opts = actor_resources(member.ask)
        if member.bundle is None:
            group = self.plan.group(member.group)
            if group.spread:
                opts["scheduling_strategy"] = "SPREAD"
            return opts
        # Rank i (and a guest beside it) uses the i-th bundle in node order, so consecutive ranks share a node.
        bundle = self.rank_order[member.group][member.bundle]
        opts.pop("label_selector", None)  # the bundle carries the pin
        opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            self.groups[member.group], placement_group_bundle_index=bundle,
            placement_group_capture_child_tasks=member.capture_children or None)
        return opts

    def _generator(self, member: Member, name: str) -> dict[str, Any]:
        if member.bundle is None or self.plan.group(member.group).role != "generator":
            return self._member(member)  # a plain actor, or a guest in another role's bundle (timeshare)
        slot = next((g for g, holder in self._slots.items() if holder is None or not _alive(holder)), None)
        if slot is None:  # every engine group is held: a new one, like the planned ones (no target node)
            self._extra += 1
            slot = f"generator-extra-{self._extra}"
            shape = dataclasses.replace(self.plan.group(member.group), name=slot, spread=False)
            self.plan.groups.append(shape)
            self.groups[slot] = self._create(shape, None)
            self.rank_order[slot] = [0]
            logger.info("placement: new engine group %s for %s", slot, name)
        self._slots[slot] = name
        return self._member(dataclasses.replace(member, group=slot))

    # ---------------------------------------------------------------------------------------------- queries
    def node_of(self, group: str, bundle: int) -> str | None:
        return self.bundle_nodes.get(group, {}).get(bundle)

    def describe(self) -> str:
        """One line per group: what it reserves and on which nodes (short ids)."""
        lines = []
        for g in self.plan.groups:
            nodes = self.bundle_nodes.get(g.name) or (self.fit.placed.get(g.name) if self.fit else None) or []
            where = ", ".join(sorted({n[:8] for n in (nodes.values() if isinstance(nodes, dict) else nodes)}))
            lines.append(f"{g.name}: {g.text()}" + (f" on {where}" if g.placement_group and where else ""))
        return "; ".join(lines)

    def release(self) -> None:
        """Remove every placement group (their actors end with them)."""
        for name, pg in list(self.groups.items()):
            try:
                remove_placement_group(pg)
            except Exception as err:  # noqa: BLE001 - the cluster may be gone already
                logger.warning("placement: removing %s: %s", name, err)
        self.groups.clear()


def _whole(table: dict[str, Any], alive: set[str]) -> bool:
    """A placement group created with every bundle on a live node."""
    return table["state"] == "CREATED" and all(n in alive for n in table["bundles_to_node_id"].values())


def _targeted(group: GroupPlan) -> bool:
    """A spread engine group, aimed at a node of its own (Ray spreads plain actors, not separate groups)."""
    return group.spread and group.strategy == "STRICT_PACK"


def _alive(name: str) -> bool:
    try:
        ray.get_actor(f"relay/{name}" if not name.startswith("relay/") else name, namespace=NAMESPACE)
        return True
    except ValueError:
        return False


__all__ = ["Missing", "Placement", "PlacementError", "actor_resources"]
