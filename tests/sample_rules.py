"""Reward rules for tests/test_rewards.py, imported by RuleReward as `sample_rules:<name>` (tests/ is on
sys.path under pytest)."""
from __future__ import annotations

from relay.actors.rewards import batched

IMPORTED = True
not_a_function = 3


def text_length(prompt, response):
    return len(response)


def with_ids(prompt, response, response_ids=None, finish_reason=None):
    return len(response_ids) + (100 if finish_reason == "stop" else 0)


def sees_everything(prompt, response, **info):
    return float(len(info))


@batched
def rank_in_batch(prompts, responses, response_ids=None):
    order = sorted(range(len(responses)), key=lambda i: len(responses[i]))
    ranks = [0.0] * len(responses)
    for r, i in enumerate(order):
        ranks[i] = float(r)
    return ranks


def returns_text(prompt, response):
    return "good"


def returns_none(prompt, response):
    return None


def returns_nan(prompt, response):
    return float("nan")


def raises(prompt, response):
    raise KeyError("boom")


@batched
def wrong_count(prompts, responses):
    return [1.0]
