"""Bookkeeping of one optimizer step's micro-batches: the reported loss and metrics of a rank, and their
reduction over data-parallel ranks. Pure Python (the worker passes its all-reduce in), so it is unit-tested.

- The loss is what was back-propagated: the sum of the micro-batches' (normalised) losses, or, for a loss
  without step-wide denominators, their mean. Ranks average it, as DDP/ZeRO average gradients.
- Metrics a `normalized` loss lists as `summed` add up like the loss; every other metric is a mean weighted by
  each micro-batch's primary count (its token or pair count; 1 per micro-batch for plain losses), over the
  micro-batches and then over the ranks.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class StepStats:
    """One rank's running sums over its micro-batches."""

    summed_names: frozenset[str] = frozenset()
    loss: float = 0.0
    summed: dict[str, float] = field(default_factory=dict)
    weighted: dict[str, float] = field(default_factory=dict)  # sum of value x weight
    weights: dict[str, float] = field(default_factory=dict)

    def add(self, loss: float, metrics: dict[str, float], weight: float) -> None:
        """One micro-batch: the loss it back-propagated, its metrics, its primary count."""
        self.loss += loss
        for k, v in metrics.items():
            if k in self.summed_names:
                self.summed[k] = self.summed.get(k, 0.0) + float(v)
            else:
                self.weighted[k] = self.weighted.get(k, 0.0) + float(v) * weight
                self.weights[k] = self.weights.get(k, 0.0) + weight

    def local(self) -> dict[str, float]:
        """This rank's loss and metrics (no communication)."""
        out = {"loss": self.loss, **self.summed}
        out.update({k: v / self.weights[k] if self.weights[k] else 0.0 for k, v in self.weighted.items()})
        return out

    def reduce(self, all_reduce_sum: Callable[[list[float]], list[float]], ranks: int) -> dict[str, float]:
        """Loss and metrics over all data-parallel ranks: one all-reduce of [loss, summed..., weighted...,
        weights...]. Every rank must report the same metric names."""
        s_keys, w_keys = sorted(self.summed), sorted(self.weighted)
        values = [self.loss] + [self.summed[k] for k in s_keys]
        values += [self.weighted[k] for k in w_keys] + [self.weights[k] for k in w_keys]
        total = all_reduce_sum(values)
        out = {"loss": total[0] / ranks}
        out.update({k: total[1 + i] / ranks for i, k in enumerate(s_keys)})
        base = 1 + len(s_keys)
        for i, k in enumerate(w_keys):
            weight = total[base + len(w_keys) + i]
            out[k] = total[base + i] / weight if weight else 0.0
        return out


@dataclass
class NonfiniteGuard:
    """Driver side: counts optimizer steps the learners skipped for a non-finite loss or gradient, and stops
    the run after `limit` in a row (a diverged run would otherwise go on skipping forever)."""

    limit: int
    field_name: str  # the config field named in the error
    streak: int = 0
    total: int = 0

    def update(self, skipped: bool, where: str) -> None:
        """Record one step (or one update step of several learners); raise FloatingPointError at the limit."""
        if not skipped:
            self.streak = 0
            return
        self.streak += 1
        self.total += 1
        if self.streak >= self.limit:
            raise FloatingPointError(
                f"{where}: {self.streak} optimizer steps in a row had a non-finite loss or gradient and were "
                f"skipped ({self.field_name}={self.limit}); lower the learning rate or check the data and rewards"
            )
