"""What every Relay-side benchmark shares: the process environment it runs in and how it writes results.

Import it before torch or Ray (`set_bench_env()` must run before they read the environment). Standard library
only; the TRL workers, which run in .venv-bench, have their own `trl_common.py`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

# One thread per process (torch is up to 10x slower with 2 on this class of machine), no hub, no telemetry.
BENCH_ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
             "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0", "WANDB_MODE": "offline"}


def int_list(text: str) -> list[int]:
    """argparse type for comma lists of counts: "1,2" -> [1, 2] (blank items ignored)."""
    try:
        return [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None


def name_list(text: str) -> list[str]:
    """argparse type for comma lists of names: "a, b" -> ["a", "b"] (blank items ignored)."""
    return [item.strip() for item in text.split(",") if item.strip()]


def set_bench_env() -> None:
    for key, value in BENCH_ENV.items():
        os.environ.setdefault(key, value)


def machine_info() -> dict[str, Any]:
    """The CPU model and the vector/matrix extensions that change torch's and vLLM's CPU kernels (lscpu, else
    /proc/cpuinfo), cores, memory and the load average now."""
    model, flags = "", set()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name" and not model:
                model = value.strip()
            elif key.strip() == "Flags":
                flags = set(value.split())
    except (OSError, subprocess.SubprocessError):
        pass
    if not model or not flags:
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not model:
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
        except OSError:
            pass
    mem_gib = None
    try:
        kb = int(next(l.split()[1] for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal")))
        mem_gib = round(kb / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        pass
    return {"cpu_model": model, "cores": os.cpu_count(), "mem_gib": mem_gib,
            "avx2": "avx2" in flags, "avx512f": "avx512f" in flags, "avx512_bf16": "avx512_bf16" in flags,
            "amx_bf16": "amx_bf16" in flags, "loadavg": [round(x, 2) for x in os.getloadavg()]}


def write_results(folder: Path, result: dict[str, Any]) -> Path:
    """FOLDER/results.json with the machine described (cores, platform, CPU model and flags, load); prints where
    it went."""
    path = Path(folder) / "results.json"
    path.write_text(json.dumps({**result, "cpu_count": os.cpu_count(), "platform": platform.platform(),
                                "machine": result.get("machine") or machine_info()}, indent=1, default=str))
    print(f"results: {path}")
    return path
