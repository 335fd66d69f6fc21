"""What every Relay-side benchmark shares: the process environment it runs in and how it writes results.

Import it before torch or Ray (`set_bench_env()` must run before they read the environment). Standard library
only; the TRL workers, which run in .venv-bench, have their own `trl_common.py`.
"""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

# One thread per process (torch is up to 10x slower with 2 on this class of machine), no hub, no telemetry.
BENCH_ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
             "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "WANDB_MODE": "offline"}


def set_bench_env() -> None:
    for key, value in BENCH_ENV.items():
        os.environ.setdefault(key, value)


def write_results(folder: Path, result: dict[str, Any]) -> Path:
    """FOLDER/results.json with the machine described (cores, platform); prints where it went."""
    path = Path(folder) / "results.json"
    path.write_text(json.dumps({**result, "cpu_count": os.cpu_count(), "platform": platform.platform()},
                               indent=1, default=str))
    print(f"results: {path}")
    return path
