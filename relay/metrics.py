"""Metrics sinks for every pipeline: SAVE_DIR/metrics.jsonl (always), TensorBoard, wandb (offline by default)
and Ray custom metrics (gauges visible on the cluster's metrics endpoint / dashboard)."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable


def _warn(msg: str) -> None:
    print(f"[relay] {msg}", file=sys.stderr, flush=True)


def _clean(metrics: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in metrics.items():
        if hasattr(value, "item"):
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            value = str(value)  # JSON has no NaN/inf; keep the fact, not a crash
        out[key] = value
    return out


class MetricsLogger:
    """Append one JSON object per step to metrics.jsonl and mirror numbers to TensorBoard / wandb.

    On resume (`resume_step`), lines at or after that step are dropped first, so a crashed run's partial tail is
    not counted twice; so is a torn last line (a run killed mid-write), said through `note`.
    """

    def __init__(
        self,
        save_dir: str | Path,
        log_dir: str | Path | None = None,
        use_tensorboard: bool = True,
        use_wandb: bool = False,
        wandb_project: str = "relay",
        run_name: str | None = None,
        config: dict[str, Any] | None = None,
        resume_step: int | None = None,
        note: Callable[[str], None] | None = None,
    ):
        note = note or _warn
        self.save_dir = Path(save_dir)
        self.save_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.save_dir / "metrics.jsonl"
        self._note = note
        if resume_step is not None and self.path.exists():
            self._keep_before(resume_step)
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._file = self.path.open("a")
        log_dir = Path(log_dir) if log_dir else self.save_dir / "logs"
        self._tb = None
        if use_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(log_dir / "tensorboard"))
        self._wandb = None
        if use_wandb:
            import wandb

            os.environ.setdefault("WANDB_MODE", "offline")
            from relay.redact import redact_config  # a reward URL's token must not reach the wandb run

            self._wandb = wandb.init(
                project=wandb_project, name=run_name, dir=str(log_dir), config=redact_config(config or {}),
                reinit="finish_previous",
            )
        self._start = time.time()

    def _keep_before(self, step: int) -> None:
        records, torn = parse_metrics(self.path)
        if torn is not None:
            self._note(f"{self.path}: dropped a torn last line (the run was stopped while writing it): {torn[:80]!r}")
        kept = [r for r in records if r.get("step", 0) < step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def truncate(self, step: int) -> None:
        """Drop the lines at or after `step` (a run that went back to a checkpoint logs those steps again);
        TensorBoard and wandb keep what they were sent."""
        self._file.close()
        self._keep_before(step)
        self._file = self.path.open("a")

    def log(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        record = {"step": int(step), "time": round(time.time() - self._start, 3), **_clean(metrics)}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tb is not None:
            for key, value in numbers.items():
                self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(numbers, step=step)
        return record

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def parse_metrics(path: Path) -> tuple[list[dict[str, Any]], str | None]:
    """metrics.jsonl's records, and its last line when that one is torn (not JSON: the writer was killed
    mid-line), which is left out. A bad line anywhere else is corruption: an error naming file and line."""
    lines = [(n, line) for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if line.strip()]
    records, torn = [], None
    for k, (n, line) in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError as err:
            if k < len(lines) - 1:
                raise ValueError(f"{path}: line {n} is not JSON ({err})") from None
            torn = line
    return records, torn


def read_metrics(save_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(save_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no metrics file (is {save_dir} a Relay run folder?)")
    return parse_metrics(path)[0]


class RayGauges:
    """Ray custom metrics (ray.util.metrics.Gauge), created lazily per name; a no-op outside a Ray session."""

    def __init__(self, prefix: str = "relay", tags: dict[str, str] | None = None):
        self.prefix, self.tags, self._gauges = prefix, tags or {}, {}

    def set(self, metrics: dict[str, Any]) -> None:
        import ray

        if not ray.is_initialized():
            return
        from ray.util.metrics import Gauge

        for key, value in metrics.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            name = f"{self.prefix}_{key}".replace("/", "_").replace(".", "_").replace("-", "_")
            if name not in self._gauges:
                self._gauges[name] = Gauge(name, description=f"Relay metric {key}", tag_keys=tuple(self.tags))
            self._gauges[name].set(float(value), tags=self.tags)
