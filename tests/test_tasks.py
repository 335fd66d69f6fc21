"""Verifiable tasks (relay/tasks) and the determinism of the demo data. No Ray."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from relay.actors.reward_rules import RuleReward, load_rule
from relay.tasks import arithmetic, find_task, rule_spec, task_names

ROOT = Path(__file__).resolve().parents[1]


def test_arithmetic_reward_reads_the_question_from_the_rendered_prompt():
    prompt = "<|im_start|>user\nWhat is 12 - 5? Reply with the number only.<|im_end|>\n<|im_start|>assistant\n"
    assert arithmetic.reward(prompt, "7<|im_end|>") == 1.0
    assert arithmetic.reward(prompt, " 7, because 12 - 5 = 7") == 1.0
    assert arithmetic.reward(prompt, "12 - 5 = 7") == 0.0  # the first number must be the answer
    assert arithmetic.reward(prompt, "seven") == 0.0
    assert arithmetic.reward("no question here", "7") == 0.0


def test_arithmetic_splits_never_share_a_question():
    train = {r["messages"][0]["content"] for r in arithmetic.make_records(10_000, "train")}
    held = {r["messages"][0]["content"] for r in arithmetic.make_records(64, "heldout")}
    assert len(held) == 64 and not train & held
    assert len(train) + len(held) <= len(arithmetic.all_questions())
    assert all(arithmetic.reward(r["messages"][0]["content"], r["answer"]) == 1.0
               for r in arithmetic.make_records(64, "heldout"))
    assert arithmetic.make_records(8, "train", seed=3) == arithmetic.make_records(8, "train", seed=3)


def test_task_registry_and_rule_names():
    assert "arithmetic" in task_names()
    assert find_task("arithmetic") is arithmetic
    assert rule_spec("arithmetic") == "relay.tasks.arithmetic:reward"
    assert load_rule("arithmetic") is arithmetic.reward
    assert RuleReward("arithmetic").score(["What is 2 + 2?"], ["4"]) == [1.0]
    with pytest.raises(ValueError, match="unknown task"):
        find_task("nope")


def _demo_files(out: Path, hash_seed: str) -> dict[str, bytes]:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    subprocess.run([sys.executable, "-m", "relay.launch.cli", "data", "demo", str(out), "--sft", "16",
                    "--preference", "64", "--prompt", "16", "--ptx", "4", "--rejected", "mixed"],
                   check=True, cwd=ROOT, env=env, capture_output=True, timeout=300)
    return {p.name: p.read_bytes() for p in sorted((out / "raw").glob("*.jsonl"))}


def test_demo_data_is_byte_identical_across_processes(tmp_path):
    """Same seed, two interpreters with different string hashing: the same bytes (ties never fall in hash order)."""
    a = _demo_files(tmp_path / "a", "1")
    b = _demo_files(tmp_path / "b", "2")
    assert a.keys() == b.keys() and "preference_heldout.jsonl" in a
    assert a == b


def test_demo_pairs_differ_only_in_word_order_or_context_fit():
    import json

    from relay.data.demo import DemoSizes, demo_records

    recs = demo_records(DemoSizes(sft=8, preference=64, prompt=8, ptx=2, rejected="mixed"))
    styles = {p["rejected_style"] for p in recs["preference"]}
    assert styles == {"garbled", "off-topic"}
    for p in recs["preference"]:
        c, r = p["chosen"][0]["content"], p["rejected"][0]["content"]
        assert c != r and p["context"][-1]["from"] == "human"
        if p["rejected_style"] == "garbled":
            assert sorted(c.split()) == sorted(r.split())  # same words, same length: only the order differs
    # held-out pairs come from other conversations: (almost) no (context, reply) is shared
    train = {json.dumps([p["context"], p["chosen"]]) for p in recs["preference"]}
    shared = train & {json.dumps([p["context"], p["chosen"]]) for p in recs["preference_heldout"]}
    assert len(shared) <= 1, shared  # only a stock exchange ("hi" -> "hello") could repeat
