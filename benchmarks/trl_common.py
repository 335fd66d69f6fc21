"""What the TRL worker scripts share (they run in .venv-bench and import it as a sibling module; no Relay):
their process environment and a callback that times each optimizer step.

Import it before torch: `set_worker_env()` must run before torch reads OMP_NUM_THREADS.
"""
from __future__ import annotations

import os
import sys
import time

WORKER_ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
              "TOKENIZERS_PARALLELISM": "false", "TRL_EXPERIMENTAL_SILENCE": "1"}


def set_worker_env() -> None:
    for key, value in WORKER_ENV.items():
        os.environ.setdefault(key, value)


def step_timer(label: str, chained: bool):
    """A TrainerCallback recording {'step', 'wall_s', 'load'} per optimizer step in `.steps`.

    chained=False: from each step's begin to its end (SFT/DPO: the data loading between steps is not counted).
    chained=True: from the previous step's end (the first step: from its begin, or from the start of training
    when the trainer never calls on_step_begin, as TRL's PPOTrainer), so generation inside a GRPO/PPO step,
    and anything between steps, counts."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.t, self.steps = None, []

        def on_train_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_begin(self, args, state, control, **kw):
            if not chained or not self.steps:
                self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            self.steps.append({"step": state.global_step, "wall_s": now - self.t, "load": os.getloadavg()[0]})
            print(f"trl {label} step {state.global_step}: {now - self.t:.2f} s (load {os.getloadavg()[0]:.2f})",
                  file=sys.stderr, flush=True)
            self.t = now

    return StepTimer()
