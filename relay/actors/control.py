"""Run control from outside the driver: a tiny named Ray actor (`relay/control`) that holds the wanted number of
generators. `GeneratorPool` polls it while it works (see `PoolOptions.control_name`) and reports its status
back, so `relay scale --generators N` (another process, attached to the same cluster) can resize a running
pool and show what it is doing. Requests carry a sequence number: the pool acts on each request once, and a
driver-side `pool.scale()` is never undone by an old request.
"""
from __future__ import annotations

import time
from typing import Any

import ray

from relay.cluster.calls import get
from relay.cluster.options import NAMESPACE, actor_options

DEFAULT_CONTROL_NAME = "control"


def control_actor_name(run: str | None = None) -> str:
    """`control` for the default run, `control-<run>` for a named one (Ray adds the `relay/` prefix)."""
    return DEFAULT_CONTROL_NAME if not run else f"{DEFAULT_CONTROL_NAME}-{run}"


class _PoolControl:
    """State only; every method is cheap. Use `start_control` / `find_control`."""

    def __init__(self, generators: int):
        self._desired = int(generators)
        self._seq = 0
        self._status: dict[str, Any] = {}
        self._status_time: float | None = None

    def request(self, generators: int) -> int:
        """Ask for `generators` generators (>= 1); returns the request's sequence number."""
        n = int(generators)
        if n < 1:
            raise ValueError(f"generators must be >= 1, got {generators}")
        self._desired = n
        self._seq += 1
        return self._seq

    def desired(self) -> tuple[int, int]:
        """(wanted generator count, sequence number of the last request; 0 = none yet)."""
        return self._desired, self._seq

    def report(self, status: dict[str, Any]) -> None:
        self._status = dict(status)
        self._status_time = time.time()

    def status(self) -> dict[str, Any]:
        age = None if self._status_time is None else round(time.time() - self._status_time, 1)
        return {"desired": self._desired, "request_seq": self._seq, "pool": self._status, "report_age_s": age}


PoolControl = ray.remote(_PoolControl)


def start_control(generators: int, name: str = DEFAULT_CONTROL_NAME) -> Any:
    """Create the named control actor (0 CPUs; it dies with the driver that created it)."""
    opts = actor_options(name=name, num_cpus=0)
    return PoolControl.options(**opts).remote(generators)


def find_control(name: str = DEFAULT_CONTROL_NAME) -> Any:
    """Handle of a running pool's control actor (ValueError when there is none)."""
    full = name if name.startswith("relay/") else f"relay/{name}"
    return ray.get_actor(full, namespace=NAMESPACE)


def request_generators(generators: int, name: str = DEFAULT_CONTROL_NAME, timeout_s: float = 30.0) -> int:
    """Ask a running pool (on the cluster this process is attached to) for `generators` generators."""
    return get(find_control(name).request.remote(generators), timeout_s, "relay control request")


def control_status(name: str = DEFAULT_CONTROL_NAME, timeout_s: float = 30.0) -> dict[str, Any]:
    return get(find_control(name).status.remote(), timeout_s, "relay control status")
