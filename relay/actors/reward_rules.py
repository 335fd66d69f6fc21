"""Python rules as reward sources: `RuleReward` loads a ``module:function`` and calls it per sample or batched,
and the built-in rules, which configs name as ``relay.actors.rewards:<name>``."""
from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Sequence
from typing import Any

from relay.actors.reward_source import INFO_KEYS, RewardError, _check_lengths, as_reward

EOS_MARKERS = ("<|im_end|>", "<|endoftext|>", "</s>", "<|eot_id|>", "<|end_of_text|>")
"""EOS texts `ends_with_eos` recognises when it has no token ids."""


def batched(fn: Callable) -> Callable:
    """Mark a rule as batched: called once with lists instead of once per sample."""
    fn.relay_batched = True
    return fn


def load_rule(spec: str) -> Callable:
    """Import ``"package.module:function"`` with errors that say what is wrong."""
    if isinstance(spec, str) and ":" not in spec:
        from relay.tasks import rule_spec, task_names

        if spec in task_names():
            spec = rule_spec(spec)  # a task name: that task's reward (relay/tasks/<name>.py)
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise RewardError(f"reward rule {spec!r}: expected 'module:function' (e.g. 'relay.actors.rewards:ends_with_eos') "
                          f"or a task name (e.g. 'arithmetic')")
    module_name, func_name = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 - ImportError or an error inside the module
        raise RewardError(f"reward rule {spec!r}: cannot import module {module_name!r} "
                          f"({type(err).__name__}: {err})") from err
    fn = getattr(module, func_name, None)
    if fn is None:
        raise RewardError(f"reward rule {spec!r}: module {module_name!r} has no attribute {func_name!r}")
    if not callable(fn):
        raise RewardError(f"reward rule {spec!r}: {func_name!r} is a {type(fn).__name__}, not a function")
    return fn


class RuleReward:
    """A Python function as a reward source (see `relay.actors.rewards` for the calling convention)."""

    def __init__(self, rule: str | Callable, batched: bool | None = None, kwargs: dict[str, Any] | None = None):
        self.name = rule if isinstance(rule, str) else f"{rule.__module__}:{rule.__qualname__}"
        self.fn = load_rule(rule) if isinstance(rule, str) else rule
        self.batched = bool(getattr(self.fn, "relay_batched", False)) if batched is None else batched
        self.kwargs = dict(kwargs or {})
        try:
            params = inspect.signature(self.fn).parameters
        except (TypeError, ValueError):  # some builtins and C callables have no signature: pass no extras
            params = {}
        self._takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        self._names = set(params)

    def _wanted(self, extras: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in extras.items() if v is not None and (self._takes_all or k in self._names)}

    def score(self, prompts: list[str], responses: list[str], **info: Any) -> list[float]:
        _check_lengths(prompts, responses, info)
        if self.batched:
            extras = self._wanted({k: info.get(k) for k in INFO_KEYS})
            try:
                out = self.fn(list(prompts), list(responses), **extras, **self.kwargs)
            except RewardError:
                raise
            except Exception as err:
                raise RewardError(f"reward rule {self.name} raised {type(err).__name__}: {err}") from err
            if isinstance(out, (str, bytes)) or not hasattr(out, "__len__") or len(out) != len(prompts):
                raise RewardError(f"batched reward rule {self.name} must return {len(prompts)} numbers, "
                                  f"got {type(out).__name__}")
            return [as_reward(v, f"reward rule {self.name} (sample {i})") for i, v in enumerate(out)]
        rewards = []
        for i, (prompt, response) in enumerate(zip(prompts, responses)):
            extras = self._wanted({
                "prompt_ids": _at(info.get("prompt_ids"), i),
                "response_ids": _at(info.get("response_ids"), i),
                "finish_reason": _at(info.get("finish_reasons"), i),
                "eos_token_ids": info.get("eos_token_ids"),
            })
            try:
                value = self.fn(prompt, response, **extras, **self.kwargs)
            except RewardError:
                raise
            except Exception as err:
                raise RewardError(f"reward rule {self.name} raised {type(err).__name__} on sample {i}: {err}") from err
            rewards.append(as_reward(value, f"reward rule {self.name} (sample {i})"))
        return rewards


def _at(values: Sequence[Any] | None, i: int) -> Any:
    return None if values is None else values[i]


# Built-in rules (per sample). Referenced as relay.actors.rewards:<name>, which re-exports them so configs keep
# working.


def ends_with_eos(prompt: str, response: str, response_ids: Sequence[int] | None = None,
                  eos_token_ids: Sequence[int] | None = None) -> float:
    """1.0 when the response ends with an EOS/stop token, else 0.0. Uses the ids when given (exact), else
    looks for a known EOS text (`EOS_MARKERS`) at the end of the response."""
    if response_ids is not None and eos_token_ids:
        return 1.0 if len(response_ids) > 0 and int(response_ids[-1]) in set(map(int, eos_token_ids)) else 0.0
    return 1.0 if response.rstrip().endswith(EOS_MARKERS) else 0.0


def length_penalty(prompt: str, response: str, response_ids: Sequence[int] | None = None,
                   per_token: float = 0.01) -> float:
    """-per_token x response length (tokens when ids are given, else whitespace-separated words)."""
    n = len(response_ids) if response_ids is not None else len(response.split())
    return -per_token * n


def contains_text(prompt: str, response: str, text: str = "!") -> float:
    """1.0 when `text` occurs in the response (bind another `text` with RuleReward(kwargs={"text": ...}))."""
    return 1.0 if text in response else 0.0


def token_fraction(prompt: str, response: str, response_ids: Sequence[int] | None = None,
                   token_id: int | None = None) -> float:
    """Share of response tokens equal to `token_id` (a dense reward for learning tests; bind `token_id`)."""
    if token_id is None:
        raise RewardError("token_fraction needs token_id: RuleReward('relay.actors.rewards:token_fraction', "
                          "kwargs={'token_id': ...})")
    if response_ids is None:
        raise RewardError("token_fraction needs response_ids (score through RewardActor.score_ids)")
    return sum(1 for t in response_ids if int(t) == int(token_id)) / max(1, len(response_ids))
