"""Verifiable tasks: one module per task, each holding its prompt generator and its rule reward.

A task module defines `NAME`, `DESCRIPTION`, `make_records(n, split, seed) -> list[dict]` (prompt records in
the seed's format, `{"messages": [...]}` plus the task's own fields) and `reward(prompt, response) -> float`
(1.0 = solved). Adding a file here adds a task: `find_task` imports `relay.tasks.<name>`, and the rule-reward
registry accepts the bare task name (`reward.rule: arithmetic`) as `relay.tasks.<name>:reward`.
"""
from __future__ import annotations

import hashlib
import importlib
import pkgutil
from types import ModuleType

SPLITS = ("train", "heldout")


def task_names() -> list[str]:
    """Every task module in this package."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def find_task(name: str) -> ModuleType:
    """The module of task `name`, or ValueError listing the known ones."""
    if name not in task_names():
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(task_names()) or 'none'}")
    return importlib.import_module(f"{__name__}.{name}")


def rule_spec(name: str) -> str:
    """The `module:function` of a task's reward (what `reward.rule` resolves a bare task name to)."""
    find_task(name)
    return f"{__name__}.{name}:reward"


def split_of(key: str, heldout_share: float) -> str:
    """'heldout' for a stable share of keys, else 'train': a question lands in the same split in every run
    and process (a hash of its text, not Python's per-process `hash`)."""
    bucket = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "heldout" if bucket < heldout_share else "train"
