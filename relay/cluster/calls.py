"""Remote calls: `get` with a timeout on every call, and the error that says what timed out."""
from __future__ import annotations

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


def free_port() -> int:
    """A free TCP port on this node (a learner group's rendezvous)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _own_memory(_actor: Any) -> dict[str, float | None]:
    from relay.procmem import memory_mib

    return memory_mib()


def process_memory(actor: Any, timeout: float = 60.0, what: str = "actor") -> dict[str, float | None]:
    """{'rss', 'peak'} MiB of an actor's process (`relay.procmem`), asked through Ray's `__ray_call__`, so any
    actor answers without a method of its own. Child processes (a vLLM engine core of its own) are not counted."""
    return get(actor.__ray_call__.remote(_own_memory), timeout, f"{what}: process memory")
