"""Learning-rate schedule shared by every trainer: linear warm-up, then cosine decay to lr * min_lr_ratio.

Pure and stateless (a function of the step), so resuming needs only the step number.
"""
from __future__ import annotations

import math


def lr_at(step: int, peak_lr: float, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.1) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / decay_steps, 1.0)
    floor = peak_lr * min_lr_ratio
    return floor + (peak_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
