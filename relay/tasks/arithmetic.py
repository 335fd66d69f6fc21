"""Arithmetic: "What is 17 + 25?", answered with the number first. A verifiable task for GRPO with a rule
reward; questions are split into train and held-out by a hash of the question, so no held-out question is
ever trained on.

Reward: 1.0 when the first number in the reply equals the result, else 0.0 (the pass rate is its mean).
The question is read back from the prompt text, so the rule needs nothing but (prompt, response).
"""
from __future__ import annotations

import random
import re
from typing import Any

from relay.tasks import SPLITS, split_of

NAME = "arithmetic"
DESCRIPTION = "two-operand addition/subtraction; reward 1 when the reply's first number is the result"
INSTRUCTION = "Reply with the number only."
HELDOUT_SHARE = 0.3
MAX_OPERAND = 12
OPS = ("+", "-")

_QUESTION = re.compile(r"What is (-?\d+) ([+\-*]) (-?\d+)\?")
_NUMBER = re.compile(r"-?\d+")


def question(a: int, op: str, b: int) -> str:
    return f"What is {a} {op} {b}? {INSTRUCTION}"


def solve(a: int, op: str, b: int) -> int:
    return {"+": a + b, "-": a - b, "*": a * b}[op]


def all_questions(max_operand: int = MAX_OPERAND, ops: tuple[str, ...] = OPS) -> list[tuple[int, str, int]]:
    """Every question of the task, in a fixed order (subtraction only where the result is not negative)."""
    return [(a, op, b) for op in ops for a in range(max_operand + 1) for b in range(max_operand + 1)
            if not (op == "-" and b > a)]


def make_records(n: int, split: str = "train", seed: int = 0, max_operand: int = MAX_OPERAND,
                 ops: tuple[str, ...] = OPS) -> list[dict[str, Any]]:
    """`n` prompt records of `split` ('train' or 'heldout'), sampled without repeats while the split has
    enough questions, deterministic for a seed."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    pool = [q for q in all_questions(max_operand, ops) if split_of(question(*q), HELDOUT_SHARE) == split]
    rng = random.Random(f"{NAME}-{split}-{seed}")
    picked = rng.sample(pool, n) if n <= len(pool) else [rng.choice(pool) for _ in range(n)]
    return [{"messages": [{"from": "human", "content": question(*q)}], "answer": str(solve(*q))} for q in picked]


def parse_question(prompt: str) -> tuple[int, str, int] | None:
    """The last question in a (rendered) prompt, or None."""
    found = _QUESTION.findall(prompt)
    if not found:
        return None
    a, op, b = found[-1]
    return int(a), op, int(b)


def reward(prompt: str, response: str) -> float:
    """1.0 when the reply's first number is the answer to the prompt's question, else 0.0."""
    q = parse_question(prompt)
    if q is None:
        return 0.0
    first = _NUMBER.search(response)
    return 1.0 if first is not None and int(first.group()) == solve(*q) else 0.0
