"""`relay scale [RUN] --generators N`: resize a running pipeline's generator pool from another process.

Attaches to the cluster (`--address`, else RAY_ADDRESS, else the local running cluster), finds the run's
control actor (`relay/control`, or `relay/control-RUN`) and records the request; the pool applies it the next
time it is stepped: new generators load the current weights before taking work, removed ones finish their
chunk first. `--wait S` waits until the pool reports N active generators; `--status` only prints the state.
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="relay scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", nargs="?", default=None, help="run name (control actor relay/control-RUN); "
                        "omit for the default relay/control")
    parser.add_argument("--generators", "-n", type=int, help="wanted number of generators (>= 1)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or 'auto')")
    parser.add_argument("--status", action="store_true", help="print the pool's status and exit")
    parser.add_argument("--wait", type=float, default=0.0, metavar="S",
                        help="wait up to S seconds until the pool reports N active generators")
    args = parser.parse_args(argv)
    if args.generators is None and not args.status:
        parser.error("give --generators N or --status")
    if args.generators is not None and args.generators < 1:
        parser.error("--generators must be >= 1")

    import os

    import ray

    from relay.actors.control import control_actor_name, control_status, request_generators
    from relay.launch import ray_auth
    from relay.cluster.options import NAMESPACE
    from relay.launch.cluster import DRIVER_ENV

    for key, value in DRIVER_ENV.items():
        os.environ.setdefault(key, value)
    ray_auth.enable()
    address = args.address or os.environ.get("RAY_ADDRESS") or "auto"
    # Attach only: never start a cluster from here (there would be no pool to talk to).
    try:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, logging_level="ERROR")
    except ConnectionError as err:
        print(f"relay scale: error: no Ray cluster at {address!r} ({err})", file=sys.stderr)
        return 2
    name = control_actor_name(args.run)
    try:
        if args.status:
            print(json.dumps(control_status(name), indent=2, default=str))
            return 0
        seq = request_generators(args.generators, name)
        print(f"requested {args.generators} generators from relay/{name} (request {seq})")
        deadline = time.monotonic() + args.wait
        while args.wait > 0:
            status = control_status(name)
            pool = status.get("pool", {})
            if pool.get("active") == args.generators and pool.get("target") == args.generators:
                print(json.dumps(pool, indent=2, default=str))
                return 0
            if time.monotonic() > deadline:
                print(f"relay scale: pool not at {args.generators} generators after {args.wait:.0f} s: "
                      f"{json.dumps(pool, default=str)}")
                return 1
            time.sleep(1.0)
        return 0
    except ValueError as err:
        print(f"relay scale: error: no running pool with control actor relay/{name} ({err})", file=sys.stderr)
        return 2
    finally:
        ray.shutdown()
