"""What a person sees on the terminal when they run `relay`: the lines that must not reach it, and a `relay` run
with the console a person gets (the suite's RAY_ADDRESS and log settings removed). Used by test_console.py and by
the determinism test, whose first PPO run is also the console's PPO run."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from relay import logs

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Lines seen on the console before: Ray's per-actor prefixes and start banner, ColossalAI/torch warnings,
# transformers progress bars, vLLM's engine log and its misleading reload warning.
NOISE = ["pid=", "Started a local Ray instance", "Warning", "warnings.warn", "Loading weights", "gemm_4bit",
         "apex", "tensornvme", "broadcast_buffers", "INFO", "non-default args", "Failed to load weights", "Triton",
         "Traceback", "repeated", "deduplicates"]


def console_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (logs.LOG_DIR_ENV, logs.VERBOSE_ENV, "RAY_ADDRESS")}
    return {**env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
            "WANDB_MODE": "offline", **extra}


def relay(*args: str, timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "relay"), *args], cwd=REPO, env=console_env(**env), capture_output=True,
                          text=True, timeout=timeout)


def noise_in(text: str) -> list[str]:
    return [m for m in NOISE if m in text]
