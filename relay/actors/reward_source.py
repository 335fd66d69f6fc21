"""The interface every reward source implements, and the checks the sources share on what goes in and
what comes out.

Interface (`RewardSource`): ``score(prompts, responses, **info) -> list[float]``, one number per sample.
`prompts` and `responses` are texts; `info` may carry, per sample, what the generator knew, so rules need not
re-tokenize or guess:

- ``prompt_ids`` / ``response_ids``: list[list[int]] token ids (the response includes the EOS/stop token
  when one ended it);
- ``finish_reasons``: list[str] ("stop" = EOS or a stop token, "length" = hit max_new_tokens);
- ``eos_token_ids``: list[int] (one list for the batch): the tokenizer's EOS plus the template's stop ids.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

INFO_KEYS = ("prompt_ids", "response_ids", "finish_reasons", "eos_token_ids")


class RewardError(RuntimeError):
    """A reward source could not produce valid rewards (bad rule, bad reply, unreachable service)."""


class RewardSource(Protocol):
    def score(self, prompts: list[str], responses: list[str], **info: Any) -> list[float]: ...


def _check_lengths(prompts: Sequence[str], responses: Sequence[str], info: dict[str, Any]) -> None:
    if len(prompts) != len(responses):
        raise ValueError(f"score: {len(prompts)} prompts but {len(responses)} responses")
    for key in ("prompt_ids", "response_ids", "finish_reasons"):
        if info.get(key) is not None and len(info[key]) != len(prompts):
            raise ValueError(f"score: {key} has {len(info[key])} entries for {len(prompts)} samples")
    unknown = set(info) - set(INFO_KEYS)
    if unknown:
        raise ValueError(f"score: unknown info keys {sorted(unknown)} (known: {INFO_KEYS})")


def as_reward(value: Any, what: str) -> float:
    """`value` as a finite float, or RewardError naming `what` (bools are refused: likely a bug)."""
    if isinstance(value, bool) or isinstance(value, (str, bytes)) or value is None:
        raise RewardError(f"{what} returned {value!r} ({type(value).__name__}); a reward must be a number")
    try:
        number = float(value)
    except (TypeError, ValueError) as err:
        raise RewardError(f"{what} returned {value!r} ({type(value).__name__}); a reward must be a number") from err
    if not math.isfinite(number):
        raise RewardError(f"{what} returned {number}; a reward must be finite")
    return number
