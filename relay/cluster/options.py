"""How Relay starts an actor: its name (prefix, run scope, namespace) and the environment every actor gets."""
from __future__ import annotations

import os
from typing import Any

from relay import logs

NAMESPACE = "relay"

# Every Relay actor gets these. One thread per process: with 2 threads torch ran up to 10x slower on small
# machines under load; vLLM and the learners each size their own threads explicitly where they need more.
ACTOR_ENV: dict[str, str] = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "WANDB_MODE": "offline",
}


def actor_env(extra: dict[str, str] | None = None, name: str | None = None) -> dict[str, str]:
    """Every actor's environment variables: ACTOR_ENV, the user's overrides, where the actor's output goes
    (`relay.logs.actor_env_vars`: RELAY_LOG_DIR / RELAY_LOG_ROLE / RELAY_VERBOSE), then `extra`."""
    env = dict(ACTOR_ENV)
    # User overrides from the driver's environment win over our defaults (e.g. WANDB_MODE=online), and the
    # CPU-capability knobs reach the actors (RELAY_CPU_CAPABILITY: relay/cpu.py; ATEN_CPU_CAPABILITY: torch's kernels)
    # and so does the scratch folders' shared-memory root (RELAY_SHM_DIR: relay/scratch.py).
    for key in ("WANDB_MODE", "HF_HUB_OFFLINE", "OMP_NUM_THREADS", "RELAY_CPU_CAPABILITY", "ATEN_CPU_CAPABILITY",
                "RELAY_SHM_DIR"):
        if key in os.environ:
            env[key] = os.environ[key]
    env.update(logs.actor_env_vars(name))
    env.update(extra or {})
    return env


def scoped(name: str, run: str | None) -> str:
    """An actor name that carries its run: `ref@myrun` (Ray names it relay/ref@myrun), so two runs share a
    cluster. Log files keep the part before `@` (each run has its own log folder)."""
    return f"{name}@{run}" if run else name


def actor_options(
    name: str | None = None,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    env: dict[str, str] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Options for `ActorClass.options(...)`: Relay's name prefix, namespace and environment."""
    opts: dict[str, Any] = {
        "num_cpus": num_cpus,
        "num_gpus": num_gpus,
        "runtime_env": {"env_vars": actor_env(env, name=name)},
    }
    if name:
        opts["name"] = name if name.startswith("relay/") else f"relay/{name}"
        opts["namespace"] = NAMESPACE
    opts.update(extra)
    return opts
