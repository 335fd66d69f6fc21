"""Peak resident memory per role of a running PPO system (benchmarks, run summaries)."""
from __future__ import annotations

from typing import Any

from relay.cluster.calls import process_memory


def peak_memory_by_role(system: Any) -> dict[str, float]:
    """{role: the largest peak resident memory (MiB) among its processes} for generator, actor_learner,
    critic_learner, reference, reward and buffer (those the run has). A generator whose engine runs in a
    process of its own (GPU default) counts only the actor's process."""
    handles: dict[str, list[Any]] = {
        "generator": [c.actor for c in system.pool.clients().values()] if system.pool is not None else [],
        "actor_learner": list(system.actor.workers) if system.actor is not None else [],
        "critic_learner": list(system.critic.workers) if system.critic is not None else [],
    }
    for role, client in (("reference", system.ref), ("reward", system.reward), ("buffer", system.buffer)):
        handles[role] = [client.actor] if client is not None else []
    out = {}
    for role, actors in handles.items():
        peaks = [process_memory(a, what=role)["peak"] for a in actors]
        if peaks and all(p is not None for p in peaks):
            out[role] = max(peaks)
    return out
