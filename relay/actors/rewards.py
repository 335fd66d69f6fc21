"""Reward sources behind one interface, and the `relay/reward` Ray actor that serves any of them.

Interface (`RewardSource`): ``score(prompts, responses, **info) -> list[float]``, one number per sample.
`prompts` and `responses` are texts; `info` may carry, per sample, what the generator knew, so rules need not
re-tokenize or guess:

- ``prompt_ids`` / ``response_ids``: list[list[int]] token ids (the response includes the EOS/stop token
  when one ended it);
- ``finish_reasons``: list[str] ("stop" = EOS or a stop token, "length" = hit max_new_tokens);
- ``eos_token_ids``: list[int] (one list for the batch): the tokenizer's EOS plus the template's stop ids.

How texts are made: `RewardActor.score_ids` decodes with ``skip_special_tokens=False``, so a response that
ended with EOS ends with its text (e.g. ``<|im_end|>``); rules that need exactness should use the ids.

Sources:

- `RuleReward("module:function")`: a Python function. Per sample (default):
  ``fn(prompt: str, response: str, **info) -> float`` where it receives only the info keys it names
  (``prompt_ids``, ``response_ids``, ``finish_reason``, ``eos_token_ids``) or all with ``**kwargs``.
  Batched (decorate with `batched`, or ``RuleReward(..., batched=True)``):
  ``fn(prompts, responses, **info_lists) -> Sequence[float]``.
  Built-ins, usable as ``relay.actors.rewards:<name>``: `ends_with_eos`, `length_penalty`, `contains_text`,
  `token_fraction`.
- `HttpReward(url)`: POST ``{"prompts": [...], "responses": [...]}`` -> ``{"rewards": [...]}``, with a timeout
  per request, retries with exponential backoff on connection errors, timeouts, HTTP 408/429/5xx, and a clear
  `RewardError` on any other reply (4xx, malformed JSON, wrong length, non-numbers), which is not retried.
- `ModelReward(folder)`: a trained reward model (value-head folder, `relay.models.heads`), scored at the last
  response token; imported lazily so rule/HTTP users never load transformers.
"""
from __future__ import annotations

import importlib
import inspect
import json
import logging
import math
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import ray

logger = logging.getLogger(__name__)

EOS_MARKERS = ("<|im_end|>", "<|endoftext|>", "</s>", "<|eot_id|>", "<|end_of_text|>")
"""EOS texts `ends_with_eos` recognises when it has no token ids."""
INFO_KEYS = ("prompt_ids", "response_ids", "finish_reasons", "eos_token_ids")
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})


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


# ------------------------------------------------------------------------------------------ rules


def batched(fn: Callable) -> Callable:
    """Mark a rule as batched: called once with lists instead of once per sample."""
    fn.relay_batched = True
    return fn


def load_rule(spec: str) -> Callable:
    """Import ``"package.module:function"`` with errors that say what is wrong."""
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise RewardError(f"reward rule {spec!r}: expected 'module:function', e.g. 'relay.actors.rewards:ends_with_eos'")
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
    """A Python function as a reward source (see the module docstring for the calling convention)."""

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


# Built-in rules (per sample). Referenced as relay.actors.rewards:<name>.


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


# ------------------------------------------------------------------------------------------ HTTP


class HttpReward:
    """A remote reward service (see the module docstring for the protocol and the retry rules)."""

    def __init__(self, url: str, timeout_s: float = 30.0, retries: int = 3, backoff_s: float = 0.5,
                 max_backoff_s: float = 8.0, batch_size: int | None = None, headers: dict[str, str] | None = None,
                 send_ids: bool = False):
        if not url or not url.startswith(("http://", "https://")):
            raise ValueError(f"HttpReward: url must start with http:// or https://, got {url!r}")
        if timeout_s <= 0 or retries < 0:
            raise ValueError("HttpReward: timeout_s must be > 0 and retries >= 0")
        self.url, self.timeout_s, self.retries = url, timeout_s, retries
        self.backoff_s, self.max_backoff_s, self.batch_size = backoff_s, max_backoff_s, batch_size
        self.headers = {"Content-Type": "application/json", **(headers or {})}
        self.send_ids = send_ids
        self.requests = 0  # attempts made, for tests and metrics

    def score(self, prompts: list[str], responses: list[str], **info: Any) -> list[float]:
        _check_lengths(prompts, responses, info)
        step = self.batch_size or max(1, len(prompts))
        out: list[float] = []
        for start in range(0, len(prompts), step):
            payload: dict[str, Any] = {"prompts": list(prompts[start:start + step]),
                                       "responses": list(responses[start:start + step])}
            if self.send_ids:
                for key in ("prompt_ids", "response_ids", "finish_reasons"):
                    if info.get(key) is not None:
                        payload[key] = list(info[key][start:start + step])
            out.extend(self._post(payload))
        return out

    def _post(self, payload: dict[str, Any]) -> list[float]:
        body = json.dumps(payload).encode()
        n = len(payload["prompts"])
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1)))
            self.requests += 1
            request = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as reply:
                    raw = reply.read()
            except urllib.error.HTTPError as err:
                detail = err.read()[:200].decode(errors="replace")
                last = f"HTTP {err.code} {err.reason}: {detail}"
                if err.code in RETRY_STATUS:
                    continue
                raise RewardError(f"reward service {self.url} refused the request ({last})") from err
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as err:
                reason = getattr(err, "reason", err)
                last = f"{type(reason).__name__}: {reason}"
                continue
            return self._parse(raw, n)
        raise RewardError(f"reward service {self.url} failed after {self.retries + 1} attempt(s) "
                          f"(timeout {self.timeout_s:g} s): {last}")

    def _parse(self, raw: bytes, n: int) -> list[float]:
        snippet = raw[:200].decode(errors="replace")
        try:
            data = json.loads(raw)
        except ValueError as err:
            raise RewardError(f"reward service {self.url} replied with malformed JSON: {snippet!r}") from err
        rewards = data.get("rewards") if isinstance(data, dict) else None
        if not isinstance(rewards, list):
            raise RewardError(f"reward service {self.url} reply has no 'rewards' list: {snippet!r}")
        if len(rewards) != n:
            raise RewardError(f"reward service {self.url} returned {len(rewards)} rewards for {n} samples")
        return [as_reward(v, f"reward service {self.url} (sample {i})") for i, v in enumerate(rewards)]


# ------------------------------------------------------------------------------------------ model


class ModelReward:
    """A trained reward model (value-head folder written by the RM stage), run in this process.

    The model comes from `relay.models.heads` (imported here, lazily): `load_reward_model(folder, dtype=...)`
    when that module offers it, else `CriticModel.from_pretrained`. The reward of a sample is the head's
    value at its last real token (prompt + response, right-padded), as the RM was trained to score."""

    def __init__(self, folder: str, tokenizer: str | None = None, batch_size: int = 8, dtype: str = "float32"):
        import torch

        from relay.models import heads

        load = getattr(heads, "load_reward_model", None) or heads.CriticModel.from_pretrained
        self.dtype = getattr(torch, dtype)
        self.model = load(folder, dtype=self.dtype).eval()
        self.folder, self.batch_size = folder, batch_size
        self._tokenizer_path = tokenizer or folder
        self._tokenizer = None

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self._tokenizer_path)
        return [self._tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]

    def score(self, prompts: list[str], responses: list[str], **info: Any) -> list[float]:
        import torch

        _check_lengths(prompts, responses, info)
        p_ids = info.get("prompt_ids") or self._tokenize(list(prompts))
        r_ids = info.get("response_ids") or self._tokenize(list(responses))
        seqs = [list(p) + list(r) for p, r in zip(p_ids, r_ids)]
        out: list[float] = []
        for start in range(0, len(seqs), self.batch_size):
            batch = seqs[start:start + self.batch_size]
            width = max(1, max(len(s) for s in batch))
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for i, s in enumerate(batch):
                ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
                mask[i, :len(s)] = 1
            with torch.no_grad():
                values = self.model(input_ids=ids, attention_mask=mask)  # [B, T]
            last = (mask.sum(1) - 1).clamp(min=0)
            out.extend(values[torch.arange(len(batch)), last].float().tolist())
        return [as_reward(v, f"reward model {self.folder}") for v in out]


# ------------------------------------------------------------------------------------------ config + actor


@dataclass
class RewardSpec:
    """What `make_reward_source` builds (the fields of `relay.config.RewardConfig`)."""

    kind: str = "rule"
    model: str | None = None
    rule: str | None = None
    url: str | None = None
    timeout_s: float = 30.0
    retries: int = 3
    rule_kwargs: dict[str, Any] | None = None


def make_reward_source(cfg: Any, tokenizer: str | None = None) -> RewardSource:
    """A reward source from a `RewardConfig` / `RewardSpec` (or a dict with the same fields)."""
    cfg = RewardSpec(**cfg) if isinstance(cfg, dict) else cfg
    kind = getattr(cfg, "kind", None)
    if kind == "rule":
        if not cfg.rule:
            raise ValueError("reward.kind=rule needs reward.rule ('module:function')")
        return RuleReward(cfg.rule, kwargs=getattr(cfg, "rule_kwargs", None))
    if kind == "http":
        if not cfg.url:
            raise ValueError("reward.kind=http needs reward.url")
        return HttpReward(cfg.url, timeout_s=cfg.timeout_s, retries=cfg.retries)
    if kind == "model":
        if not cfg.model:
            raise ValueError("reward.kind=model needs reward.model (a reward-model folder)")
        return ModelReward(cfg.model, tokenizer=tokenizer)
    raise ValueError(f"reward.kind must be model, rule or http, not {kind!r}")


class RewardServer:
    """Body of the `relay/reward` actor: one reward source plus (optionally) a tokenizer to decode ids."""

    def __init__(self, cfg: Any, tokenizer: str | None = None):
        self.source = make_reward_source(cfg, tokenizer)
        self._tokenizer_path = tokenizer
        self._tokenizer = None
        self.calls, self.samples, self.seconds = 0, 0, 0.0

    def score(self, prompts: list[str], responses: list[str], **info: Any) -> list[float]:
        start = time.perf_counter()
        rewards = self.source.score(list(prompts), list(responses), **info)
        self.calls, self.samples = self.calls + 1, self.samples + len(rewards)
        self.seconds += time.perf_counter() - start
        return rewards

    def score_ids(self, prompt_ids: list[list[int]], response_ids: list[list[int]],
                  finish_reasons: list[str] | None = None, eos_token_ids: list[int] | None = None) -> list[float]:
        """Decode (keeping special tokens) and score; ids are passed on to the source as `info`."""
        if self._tokenizer is None:
            if not self._tokenizer_path:
                raise RewardError("RewardActor.score_ids needs a tokenizer (start_reward_actor(tokenizer=...))")
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self._tokenizer_path)
        tok = self._tokenizer
        if eos_token_ids is None and tok.eos_token_id is not None:
            eos_token_ids = [int(tok.eos_token_id)]
        prompts = tok.batch_decode(prompt_ids, skip_special_tokens=False)
        responses = tok.batch_decode(response_ids, skip_special_tokens=False)
        return self.score(prompts, responses, prompt_ids=prompt_ids, response_ids=response_ids,
                          finish_reasons=finish_reasons, eos_token_ids=eos_token_ids)

    def stats(self) -> dict[str, Any]:
        return {"kind": type(self.source).__name__, "calls": self.calls, "samples": self.samples,
                "seconds": self.seconds, "pid": os.getpid()}


@dataclass
class RewardClient:
    """Driver-side handle of the reward actor; every call has a timeout."""

    actor: Any
    timeout_s: float = 300.0

    def score(self, prompts: list[str], responses: list[str], **info: Any) -> list[float]:
        from relay.launch.cluster import get

        return get(self.actor.score.remote(prompts, responses, **info), self.timeout_s, "relay/reward.score")

    def score_ids(self, prompt_ids: list[list[int]], response_ids: list[list[int]], **kw: Any) -> list[float]:
        from relay.launch.cluster import get

        ref = self.actor.score_ids.remote(prompt_ids, response_ids, **kw)
        return get(ref, self.timeout_s, "relay/reward.score_ids")

    def score_ids_async(self, prompt_ids: list[list[int]], response_ids: list[list[int]], **kw: Any) -> Any:
        """ObjectRef of `score_ids` (overlap scoring with other work)."""
        return self.actor.score_ids.remote(prompt_ids, response_ids, **kw)

    def stats(self) -> dict[str, Any]:
        from relay.launch.cluster import get

        return get(self.actor.stats.remote(), 30, "relay/reward.stats")

    def kill(self) -> None:
        ray.kill(self.actor, no_restart=True)


def start_reward_actor(cfg: Any, tokenizer: str | None = None, name: str = "reward", num_cpus: float = 1.0,
                       timeout_s: float = 300.0, **options: Any) -> RewardClient:
    """Start `relay/<name>` serving the source described by `cfg` (RewardConfig, RewardSpec or dict), and
    wait until it is built (a bad rule or an unloadable model fails here, not at the first score)."""
    from relay.launch.cluster import actor_options, get

    if not isinstance(cfg, (dict, RewardSpec)):  # e.g. relay.config.RewardConfig: send plain fields
        cfg = RewardSpec(kind=cfg.kind, model=cfg.model, rule=cfg.rule, url=cfg.url,
                         timeout_s=cfg.timeout_s, retries=cfg.retries)
    actor = RewardActor.options(**actor_options(name=name, num_cpus=num_cpus, **options)).remote(cfg, tokenizer)
    client = RewardClient(actor, timeout_s)
    try:
        get(actor.stats.remote(), timeout_s, f"relay/{name} start")
    except Exception:
        ray.kill(actor, no_restart=True)
        raise
    return client


RewardActor = ray.remote(RewardServer)
"""The Ray actor class (`start_reward_actor` names it relay/reward)."""
