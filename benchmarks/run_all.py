"""Run every benchmark in turn (`make bench`). Each prints its own table; see the README for the results."""
from __future__ import annotations

import importlib
import sys

BENCHMARKS = ["benchmarks.bench_data_prep", "benchmarks.bench_rollout", "benchmarks.bench_ppo", "benchmarks.bench_grpo_trl",
              "benchmarks.bench_train_trl", "benchmarks.bench_ppo_trl", "benchmarks.bench_learn_race"]


def main() -> int:
    failed = []
    for name in BENCHMARKS:
        print(f"\n=== {name} ===", flush=True)
        try:
            code = importlib.import_module(name).main([])
        except Exception as err:  # keep going: one broken benchmark should not hide the others
            print(f"{name} failed: {err!r}", file=sys.stderr)
            code = 1
        if code:
            failed.append(name)
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
