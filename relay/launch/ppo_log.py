"""The PPO driver's console line: one module every part of the driver imports (no import of the driver itself)."""
from __future__ import annotations

import sys


def log(msg: str) -> None:
    from tqdm import tqdm  # a line between progress-bar redraws, not through the bar

    tqdm.write(f"[relay ppo] {msg}", file=sys.stderr)
    sys.stderr.flush()
