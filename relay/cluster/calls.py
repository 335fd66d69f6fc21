"""Remote calls: `get` with a timeout on every call, and the error that says what timed out."""
from __future__ import annotations

import random
import socket
from typing import Any

DEFAULT_TIMEOUT_S = 600.0


class RemoteCallTimeout(TimeoutError):
    """A remote call did not finish in time."""


def get(refs: Any, timeout: float | None = DEFAULT_TIMEOUT_S, what: str = "remote call") -> Any:
    """`ray.get` that always has a timeout and says what timed out."""
    import ray

    try:
        return ray.get(refs, timeout=timeout)
    except ray.exceptions.GetTimeoutError as err:
        raise RemoteCallTimeout(f"{what} did not finish within {timeout:.0f} s") from err


# Rendezvous ports: below Linux's default ephemeral range (32768-60999) and above Ray's worker ports (10002-19999).
RENDEZVOUS_PORTS = (20000, 32767)
EPHEMERAL_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"


def rendezvous_range(ephemeral_file: str | None = None) -> tuple[int, int] | None:
    """(low, high) ports to draw a rendezvous port from: RENDEZVOUS_PORTS cut below this kernel's ephemeral
    range; None when too little is left (then the kernel's pick is used)."""
    low, high = RENDEZVOUS_PORTS
    try:
        with open(ephemeral_file or EPHEMERAL_RANGE_FILE) as f:
            high = min(high, int(f.read().split()[0]) - 1)
    except (OSError, ValueError, IndexError):
        pass
    return (low, high) if high - low >= 1000 else None


def free_port(rng: random.Random | None = None) -> int:
    """A free TCP port on this node for a learner group's rendezvous. Drawn at random outside the kernel's
    ephemeral range rather than by binding port 0: an ephemeral port can go to any outgoing connection (Ray opens
    many) between this check and the process group binding it, which then fails with EADDRINUSE."""
    span = rendezvous_range()
    rng = rng or random.SystemRandom()
    for _ in range(100 if span else 0):
        port = rng.randint(*span)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("", port))
            except OSError:  # taken
                continue
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _own_memory(_actor: Any) -> dict[str, float | None]:
    from relay.procmem import memory_mib

    return memory_mib()


def process_memory(actor: Any, timeout: float = 60.0, what: str = "actor") -> dict[str, float | None]:
    """{'rss', 'peak'} MiB of an actor's process (`relay.procmem`), asked through Ray's `__ray_call__`, so any
    actor answers without a method of its own. Child processes (a vLLM engine core of its own) are not counted."""
    return get(actor.__ray_call__.remote(_own_memory), timeout, f"{what}: process memory")


def actor_state(actor: Any) -> str:
    """What Ray's GCS says of an actor: "placed, in its constructor (pid N)", "not placed", or Ray's state name
    (ALIVE, RESTARTING, DEAD, ...); "unknown" when it cannot be read. Reads the GCS directly, so it works on
    clusters started without a dashboard, where the state API does not."""
    try:
        from ray._private.state import actors

        info = actors(actor_id=actor._actor_id.hex())
    except Exception:  # noqa: BLE001 - a diagnosis for an error message; never its own failure
        return "unknown"
    state = str(info.get("State", "unknown"))
    if state in ("PENDING_CREATION", "DEPENDENCIES_UNREADY"):  # Ray says so until the constructor returns
        return f"placed, in its constructor (pid {info['Pid']})" if info.get("Pid") else "not placed"
    return state


def waiting_actors_text(actors: dict[str, Any]) -> str:
    """For errors about actors that did not start in time: each one's `actor_state`, and the cluster's free
    CPU/GPU when one is not placed yet (no node has room for what it asks)."""
    import ray

    states = {name: actor_state(actor) for name, actor in actors.items()}
    text = "; ".join(f"{name}: {state}" for name, state in states.items())
    if "not placed" in states.values():
        free = ray.available_resources()
        text += (f" (the cluster has {free.get('CPU', 0.0):g} CPU and {free.get('GPU', 0.0):g} GPU free: other "
                 "actors or jobs hold the rest)")
    return text
