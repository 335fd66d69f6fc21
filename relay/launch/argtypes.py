"""argparse types for numbers with a range, so a bad option is one usage line naming it (argparse's own
`float` takes 'nan' and 'inf', which then fail deep inside an engine)."""
from __future__ import annotations

import argparse
import math
from typing import Callable


def finite_float(low: float | None = None, high: float | None = None) -> Callable[[str], float]:
    """A finite number, optionally within [low, high]."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f">= {low:g}" if high is None else f"in [{low:g}, {high:g}]" if low is not None else f"<= {high:g}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return value

    return parse
