"""Ray plumbing: connect to a running cluster or start a local one, actor options that carry Relay's
environment, and `get` with a timeout on every remote call."""
from __future__ import annotations

import logging
import os
import sys
from typing import Any

from relay import logs
from relay.launch import ray_auth, safe_points

NAMESPACE = "relay"
DEFAULT_TIMEOUT_S = 600.0

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
# Variables the driver sets in its own process before Ray starts (the first cluster start reads them). Token
# authentication (RAY_AUTH_MODE=token) is set by relay.launch.ray_auth, which also makes the token.
DRIVER_ENV: dict[str, str] = {"RAY_USAGE_STATS_ENABLED": "0"}


class RemoteCallTimeout(TimeoutError):
    """A remote call did not finish in time."""


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


def init_ray(
    address: str | None = None,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    dashboard_host: str = "127.0.0.1",
    include_dashboard: bool | None = None,
    temp_dir: str | None = None,
    resources: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Attach to a cluster (`address`, RAY_ADDRESS, or a running local one) or start a local one.

    A started cluster binds its dashboard to 127.0.0.1 unless told otherwise. Ray token authentication is on
    unless RAY_AUTH_MODE says otherwise; a started cluster gets a token file if none exists
    (`relay.launch.ray_auth`). Returns ray.init's context info.

    Every worker process runs `relay.logs.worker_setup` first: where the driver named a log folder
    (`relay.logs.run_logs`) and is not verbose, actors write to that folder instead of the terminal, and Ray
    does not forward worker output to the driver (no `(pid=...)` lines); Ray's own INFO lines stay off too.
    """
    import ray

    for key, value in DRIVER_ENV.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        return {"address": ray.get_runtime_context().gcs_address}
    runtime_env = {"env_vars": actor_env(), "worker_process_setup_hook": logs.SETUP_HOOK}
    quiet = logs.log_dir() is not None
    console = dict(log_to_driver=not quiet, logging_level=logging.WARNING if quiet else logging.INFO)
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        ray_auth.enable()  # the cluster's token: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token
        ctx = ray.init(address=address, namespace=NAMESPACE, runtime_env=runtime_env, **console)
    else:
        ray_auth.ensure_token()
        kwargs: dict[str, Any] = dict(
            address="local",
            namespace=NAMESPACE,
            runtime_env=runtime_env,
            dashboard_host=dashboard_host,
            include_dashboard=include_dashboard,
            **console,
        )
        if num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
        if num_gpus is not None:
            kwargs["num_gpus"] = num_gpus
        if resources:
            kwargs["resources"] = resources
        if temp_dir:
            kwargs["_temp_dir"] = os.path.abspath(temp_dir)
        ctx = ray.init(**kwargs)
    # ray.init replaces the driver's SIGTERM handler with one that exits at once: a `relay` run takes it back
    # so `ray job stop` / preemption stops it at a safe point with a checkpoint (relay.launch.safe_points).
    safe_points.reclaim_signals()
    if quiet:  # ray.init's own line about the cluster is off in quiet mode: say where things are instead
        url = ctx.dashboard_url
        where = f"Ray dashboard {url if '://' in url else 'http://' + url}; " if url else ""
        print(f"[relay] {where}actors' output (Ray, vLLM, ColossalAI): {logs.log_dir()}/ (--verbose prints it here)",
              file=sys.stderr, flush=True)
    return {"address": ctx.address_info.get("address"), "dashboard_url": ctx.dashboard_url}


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


def get(refs: Any, timeout: float | None = DEFAULT_TIMEOUT_S, what: str = "remote call") -> Any:
    """`ray.get` that always has a timeout and says what timed out."""
    import ray

    try:
        return ray.get(refs, timeout=timeout)
    except ray.exceptions.GetTimeoutError as err:
        raise RemoteCallTimeout(f"{what} did not finish within {timeout:.0f} s") from err


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
