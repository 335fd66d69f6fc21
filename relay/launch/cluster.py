"""Starting or attaching to a Ray cluster (the driver's side). Actor options, names and remote-call helpers
that every layer shares live below, in `relay.cluster`."""
from __future__ import annotations

import logging
import os
import sys
from typing import Any

from relay import logs
from relay.cluster.options import NAMESPACE, actor_env
from relay.launch import ray_auth, safe_points

# Variables the driver sets in its own process before Ray starts (the first cluster start reads them). Token
# authentication (RAY_AUTH_MODE=token) is set by relay.launch.ray_auth, which also makes the token.
# No prestarted workers: every Relay actor asks for its own env vars (thread counts), so it never takes a prestarted
# default worker, and each such worker costs ~1.6 CPU-s to start (2 per local cluster, measured on 2 cores).
# The log monitor looks for new log files every 0.5 s instead of every 0.1 s (Ray does that only past 1000 files):
# its globbing was most of its CPU, the busiest of Ray's own processes in the test suite; lines in known files
# are still forwarded as they come.
DRIVER_ENV: dict[str, str] = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_prestart_worker_first_driver": "0",
                              "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0"}


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
