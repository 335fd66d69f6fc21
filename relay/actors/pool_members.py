"""Generator membership for `GeneratorPool`: start generators under fresh names, bring each to the current
weights before it takes work, health-check and replace dead or hung ones, recover from a failed weight push,
and apply scale requests from the control actor."""
from __future__ import annotations

import logging
import time
from dataclasses import asdict
from typing import Any

import ray

from relay.actors import weight_sync
from relay.actors.generator import Generator
from relay.actors.pool_types import (
    ACTIVE,
    DRAINING,
    LOADING,
    STARTING,
    PoolError,
    _Member,
    _short,
    _Weights,
    is_generator_failure,
)
from relay.cluster.calls import RemoteCallTimeout, get
from relay.cluster.options import NAMESPACE, actor_options, scoped

# One logger name for every pool line, as before the pool was split into modules.
logger = logging.getLogger("relay.actors.pool")


class MembershipMixin:
    """Member lifecycle of `GeneratorPool` (its state is set up in `GeneratorPool.__init__`)."""

    def _ask(self, method: str, timeout_s: float) -> dict[str, Any]:
        with self._lock:
            members = [m for m in self._members.values() if m.state == ACTIVE]
        refs = [getattr(m.actor, method).remote() for m in members]
        out: dict[str, Any] = {}
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        with self._lock:
            for m, ref in zip(members, refs):
                try:
                    out[m.name] = ray.get(ref, timeout=0)
                except Exception as err:  # noqa: BLE001 - dead ones are replaced, others reported
                    if is_generator_failure(err) and m.name in self._members:
                        self._remove(m, failed=True, reason=_short(err))
                        self._reconcile()
                    elif isinstance(err, ray.exceptions.GetTimeoutError):
                        raise RemoteCallTimeout(f"{m.name}.{method} did not answer in {timeout_s:.0f} s") from err
                    elif not is_generator_failure(err):
                        raise
        return out

    def _free_name(self) -> tuple[int, str]:
        while True:
            index, self._next_index = self._next_index, self._next_index + 1
            name = scoped(f"{self.options.name_prefix}-{index}", self.options.run)
            try:  # a leftover actor from an earlier pool may hold the name: skip the index
                ray.get_actor(f"relay/{name}", namespace=NAMESPACE)
            except ValueError:
                return index, name

    def _reconcile(self) -> None:
        """Start generators until `target` are live (not draining)."""
        live = sum(1 for m in self._members.values() if m.state != DRAINING)
        for _ in range(self._target - live):
            index, name = self._free_name()
            cfg = self.config
            num_cpus = self.options.num_cpus
            if num_cpus is None:
                num_cpus = float(cfg.cpu_threads + (1 if cfg.in_process is False else 0))
            num_gpus = self.options.num_gpus
            if num_gpus is None:
                num_gpus = float(cfg.tensor_parallel_size) if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
            place = self.options.placement(index, name) if self.options.placement else {}
            opts = actor_options(name=name, **{"num_cpus": num_cpus, "num_gpus": num_gpus, **place},
                                 env={"OMP_NUM_THREADS": str(cfg.cpu_threads)})
            actor = Generator.options(**opts).remote(asdict(cfg))
            self._members[name] = _Member(index, name, actor)
            self._refs[actor.ready.remote()] = ("ready", name)
            self.counters["started"] += 1
            logger.info("generator pool: starting %s (target %d)", name, self._target)

    def _remove(self, m: _Member, failed: bool, reason: str = "") -> None:
        """Take a member out: its live chunk is re-queued, its pending replies forgotten, the actor stopped."""
        self._members.pop(m.name, None)
        self._ledger.release_worker(m.name)
        for ref in [r for r, (_, name) in self._refs.items() if name == m.name]:
            del self._refs[ref]
        if failed:
            ray.kill(m.actor, no_restart=True)  # a half-alive generator must not answer later
            self.counters["failed"] += 1
            logger.warning("generator pool: %s (pid %s) failed (%s); replacing it", m.name, m.pid, reason)
            if self.counters["failed"] > self.options.max_failures:
                raise PoolError(f"generators failed {self.counters['failed']} times (last: {m.name}: {reason})")
        else:
            self.counters["removed"] += 1
            if m.state in (ACTIVE, DRAINING) and m.chunk_id is None:
                # Idle: let it free its engine and temp folder, then end it (see `_stopping`).
                self._stopping[m.actor.shutdown.remote()] = (m.actor, time.monotonic() + 30)
            else:
                ray.kill(m.actor, no_restart=True)

    def _bring_up_to_date(self, m: _Member) -> None:
        """Load the current weights into a new member (again, if a push came meanwhile), then activate it."""
        if self._weights is not None and m.version < self._weights.version:
            m.state, m.since = LOADING, time.monotonic()
            # Only refs pass through here: Ray moves the sender's buckets to the generator's node.
            ref = m.actor.update_weights_from_blobs.remote(self._weights.version, *self._weights.blobs)
            self._refs[ref] = ("load", m.name)
        elif self._weights is not None and m.version > self._weights.version:
            self._remove(m, failed=True, reason=f"version {m.version} is ahead of the pool's {self.version}")
            self._reconcile()
        else:
            m.state, m.last_health = ACTIVE, time.monotonic()
            self._progress_at = m.last_health
            logger.info("generator pool: %s active (pid %s, version %d)", m.name, m.pid, m.version)

    def _catch_up_waiting(self) -> None:
        """After a push: members left loading with no load in flight (their kept weights were lost with a dead
        sender, see `_handle`) load the new ones."""
        loading = {n for k, n in self._refs.values() if k in ("ready", "load")}
        for m in list(self._members.values()):
            if m.state == LOADING and m.name not in loading:
                self._bring_up_to_date(m)

    def _check_deadlines(self) -> None:
        now, o = time.monotonic(), self.options
        for m in list(self._members.values()):
            late = None
            if m.state == STARTING and now - m.since > o.start_timeout_s:
                late = f"not started within {o.start_timeout_s:.0f} s"
            elif m.state == LOADING and now - m.since > o.weight_timeout_s:
                late = f"weights not loaded within {o.weight_timeout_s:.0f} s"
            elif m.chunk_id is not None and now - m.chunk_sent > o.generate_timeout_s:
                late = f"chunk not done within {o.generate_timeout_s:.0f} s"
            if late:
                self.counters["start_failures"] += m.state in (STARTING, LOADING)
                self._remove(m, failed=True, reason=late)
                self._reconcile()
            elif m.state in (ACTIVE, DRAINING) and now - m.last_health > o.health_interval_s:
                # Busy ones too: a generator whose engine process died reports itself broken while its
                # generate call may still be waiting (health runs in the actor's control thread).
                m.last_health = now
                if not any(k == "health" and n == m.name for k, n in self._refs.values()):
                    self._refs[m.actor.health.remote()] = ("health", m.name)
        for ref, (actor, deadline) in list(self._stopping.items()):
            if now > deadline:
                del self._stopping[ref]
                ray.kill(actor, no_restart=True)

    def _poll_control(self) -> None:
        if self._control is None or time.monotonic() - self._control_polled < self.options.control_poll_s:
            return
        self._control_polled = time.monotonic()
        try:
            n, seq = get(self._control.desired.remote(), 10, "control poll")
            self._control.report.remote(self.status())
        except Exception as err:  # noqa: BLE001 - outside control is optional; never stop generating for it
            logger.warning("generator pool: control actor unreachable (%s)", _short(err))
            return
        if seq > self._control_seq:
            self._control_seq = seq
            if n != self._target:
                self.scale(n)

    def _recover_push(self, targets: list[_Member], version: int, err: BaseException,
                      previous: _Weights | None, rewind: bool = False) -> dict:
        """After a failed push: replace dead/broken generators, retry healthy laggards once."""
        health = {}
        for m in targets:
            try:
                health[m.name] = get(m.actor.health.remote(), 30, f"{m.name}.health")
            except Exception as probe:  # noqa: BLE001
                health[m.name] = {"ok": False, "broken": _short(probe), "version": -1}
        loaded = [m for m in targets if health[m.name].get("version") == version]
        lagging = [m for m in targets if health[m.name].get("ok") and health[m.name].get("version") != version]
        if not loaded and len(lagging) == len(targets) and isinstance(err, weight_sync.WeightUpdateError):
            self._weights = previous  # nobody could load it: the update itself is wrong
            raise err
        for m in targets:
            if not health[m.name].get("ok"):
                self._remove(m, failed=True, reason=f"weight push: {health[m.name].get('broken')}")
        report: dict[str, Any] = {"version": version, "recovered_from": _short(err)}
        if lagging:
            # Retry once from the kept buckets (object store refs: any node; the driver never holds the bytes).
            blobs = self._weights.blobs
            refs = [m.actor.update_weights_from_blobs.remote(version, *blobs, rewind=rewind) for m in lagging]
            ray.wait(refs, num_returns=len(refs), timeout=self.options.weight_timeout_s)
            for m, ref in zip(lagging, refs):
                try:
                    get(ref, 0, f"{m.name}.update_weights (retry)")
                except Exception as again:  # noqa: BLE001 - replaced: the replacement loads these weights
                    self._remove(m, failed=True, reason=f"weight push retry: {_short(again)}")
        self._reconcile()
        return report
