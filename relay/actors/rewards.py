"""Reward sources behind one interface (`RewardSource`, see `relay.actors.reward_source`), and the
`relay/reward` Ray actor that serves any of them.

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
  per request; an outage (connection errors, timeouts, HTTP 408/429/5xx) is waited out with exponential backoff
  up to `max_outage_s`; a clear `RewardError`, not retried, on TLS/certificate errors and on any other reply (4xx,
  malformed JSON, wrong length, non-numbers, larger than `max_response_bytes`). Secrets in the URL are redacted.
- `ModelReward(folder)`: a trained reward model (value-head folder, `relay.models.heads`), scored at the last
  response token on the actor's device in `reward.dtype`, `reward.micro_batch_size` samples per forward;
  imported lazily so rule/HTTP users never load transformers.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import ray

from relay.actors.reward_http import DEFAULT_MAX_OUTAGE_S, DEFAULT_MAX_RESPONSE_BYTES, RETRY_STATUS, HttpReward
from relay.actors.reward_rules import (
    EOS_MARKERS,
    RuleReward,
    batched,
    contains_text,
    ends_with_eos,
    length_penalty,
    load_rule,
    token_fraction,
)
from relay.actors.reward_source import INFO_KEYS, RewardError, RewardSource, _check_lengths, as_reward
from relay.restarts import call_or_explain, restart_options

# Callers and configs (`relay.actors.rewards:ends_with_eos`) name these here, where they lived before the split.
__all__ = [
    "EOS_MARKERS", "INFO_KEYS", "RETRY_STATUS", "HttpReward", "ModelReward", "RewardActor", "RewardClient",
    "RewardError", "RewardServer", "RewardSource", "RewardSpec", "RuleReward", "as_reward", "batched",
    "contains_text", "ends_with_eos", "length_penalty", "load_rule", "make_reward_source", "start_reward_actor",
    "token_fraction",
]

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ model


class ModelReward:
    """A trained reward model (value-head folder written by the RM stage), run in this process.

    The model comes from `relay.models.heads` (imported here, lazily): `load_reward_model(folder, dtype=...)`
    when that module offers it, else `CriticModel.from_pretrained`. It runs on the device torch sees here (CUDA
    where Ray gave the actor a GPU) in `dtype` (`relay.actors.scoring`: auto = bf16 on CUDA, fp32 on CPU), scoring
    `batch_size` samples per forward (`reward.micro_batch_size`). The reward of a sample is the head's value at
    its last real token (prompt + response, right-padded), as the RM was trained to score, returned as a float."""

    def __init__(self, folder: str, tokenizer: str | None = None, batch_size: int = 8, dtype: str = "auto",
                 field: str = "reward"):
        from relay.actors.scoring import scorer_precision
        from relay.models import heads
        from relay.models.smollm2 import resolve_model_path

        if batch_size < 1:
            raise ValueError(f"{field}.micro_batch_size must be >= 1, got {batch_size}")
        folder = resolve_model_path(folder, "reward.model")  # bundled names ('smollm2', ...) as everywhere
        load = getattr(heads, "load_reward_model", None) or heads.CriticModel.from_pretrained
        self.precision = scorer_precision(dtype, f"{field}.dtype")
        self.dtype = self.precision.torch_dtype
        self.model = load(folder, dtype=self.dtype).to(self.precision.device).eval()
        self.model.requires_grad_(False)
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

        from relay.actors.scoring import row_slices

        _check_lengths(prompts, responses, info)
        p_ids = info.get("prompt_ids") or self._tokenize(list(prompts))
        r_ids = info.get("response_ids") or self._tokenize(list(responses))
        seqs = [list(p) + list(r) for p, r in zip(p_ids, r_ids)]
        device, out = self.precision.device, []
        for rows in row_slices(len(seqs), self.batch_size):
            batch = seqs[rows]
            width = max(1, max(len(s) for s in batch))
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for i, s in enumerate(batch):
                ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
                mask[i, :len(s)] = 1
            with torch.no_grad():
                values = self.model(input_ids=ids.to(device), attention_mask=mask.to(device))  # [B, T]
            last = (mask.sum(1) - 1).clamp(min=0)
            out.extend(values.float().cpu()[torch.arange(len(batch)), last].tolist())
        return [as_reward(v, f"reward model {self.folder}") for v in out]

    def describe(self) -> dict[str, Any]:
        """Where and how it scores (the reward actor's stats report it)."""
        return {"device": self.precision.device, "dtype": self.precision.dtype, "micro_batch_size": self.batch_size}


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
    max_outage_s: float = DEFAULT_MAX_OUTAGE_S
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
    dtype: str = "auto"
    micro_batch_size: int = 8


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
        return HttpReward(cfg.url, timeout_s=cfg.timeout_s, retries=cfg.retries,
                          max_outage_s=getattr(cfg, "max_outage_s", DEFAULT_MAX_OUTAGE_S),
                          max_response_bytes=getattr(cfg, "max_response_bytes", DEFAULT_MAX_RESPONSE_BYTES))
    if kind == "model":
        if not cfg.model:
            raise ValueError("reward.kind=model needs reward.model (a reward-model folder)")
        return ModelReward(cfg.model, tokenizer=tokenizer, batch_size=getattr(cfg, "micro_batch_size", 8),
                           dtype=getattr(cfg, "dtype", "auto"))
    raise ValueError(f"reward.kind must be model, rule or http, not {kind!r}")


class RewardServer:
    """Body of the `relay/reward` actor: one reward source plus (optionally) a tokenizer to decode ids."""

    def __init__(self, cfg: Any, tokenizer: str | None = None):
        self.source = make_reward_source(cfg, tokenizer)
        self._tokenizer = None
        if tokenizer:  # loaded while the run starts, not in the first episode's scoring
            from relay.models.decoder import load_decoder  # tokenizer.json alone where it decodes the same

            try:
                self._tokenizer = load_decoder(tokenizer)
            except Exception as err:
                raise RewardError(f"reward: no tokenizer to decode responses in {tokenizer}: {err}") from err
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
            raise RewardError("RewardActor.score_ids needs a tokenizer (start_reward_actor(tokenizer=...))")
        tok = self._tokenizer
        if eos_token_ids is None and tok.eos_token_id is not None:
            eos_token_ids = [int(tok.eos_token_id)]
        prompts = tok.batch_decode(prompt_ids, skip_special_tokens=False)
        responses = tok.batch_decode(response_ids, skip_special_tokens=False)
        return self.score(prompts, responses, prompt_ids=prompt_ids, response_ids=response_ids,
                          finish_reasons=finish_reasons, eos_token_ids=eos_token_ids)

    def stats(self) -> dict[str, Any]:
        """Counters, pid, and for a reward model the device, dtype and micro-batch size it scores with."""
        where = self.source.describe() if hasattr(self.source, "describe") else {}
        return {"kind": type(self.source).__name__, "calls": self.calls, "samples": self.samples,
                "seconds": self.seconds, "pid": os.getpid(), **where}


@dataclass
class RewardClient:
    """Driver-side handle of the reward actor; every call has a timeout. The actor is stateless: Ray restarts it
    up to `max_restarts` times and re-runs the calls in flight (`relay.restarts`); after that a wait raises
    ActorLost naming it."""

    actor: Any
    timeout_s: float = 300.0
    max_restarts: int = 0
    name: str = "relay/reward"

    def result(self, ref: Any, what: str = "score_ids", timeout_s: float | None = None) -> Any:
        """Wait for a call's ObjectRef (ActorLost once Ray gave up restarting the actor)."""
        from relay.cluster.calls import get

        return call_or_explain(lambda: get(ref, timeout_s or self.timeout_s, f"{self.name}.{what}"), self.name,
                               self.max_restarts)

    def score(self, prompts: list[str], responses: list[str], **info: Any) -> list[float]:
        return self.result(self.actor.score.remote(prompts, responses, **info), "score")

    def score_ids(self, prompt_ids: list[list[int]], response_ids: list[list[int]], **kw: Any) -> list[float]:
        return self.result(self.actor.score_ids.remote(prompt_ids, response_ids, **kw))

    def score_ids_async(self, prompt_ids: list[list[int]], response_ids: list[list[int]], **kw: Any) -> Any:
        """ObjectRef of `score_ids` (overlap scoring with other work; wait with `result`)."""
        return self.actor.score_ids.remote(prompt_ids, response_ids, **kw)

    def stats(self, timeout_s: float = 30.0) -> dict[str, Any]:
        return self.result(self.actor.stats.remote(), "stats", timeout_s)

    def info(self, timeout_s: float = 30.0) -> dict[str, Any]:
        """Its process id and counters (the same as `stats`; the name every Relay actor client answers to)."""
        return self.stats(timeout_s)

    def kill(self) -> None:
        ray.kill(self.actor, no_restart=True)


def start_reward_actor(cfg: Any, tokenizer: str | None = None, name: str = "reward", num_cpus: float = 1.0,
                       timeout_s: float = 300.0, max_restarts: int = 0, **options: Any) -> RewardClient:
    """Start `relay/<name>` serving the source described by `cfg` (RewardConfig, RewardSpec or dict), and
    wait until it is built (a bad rule or an unloadable model fails here, not at the first score). Ray
    restarts it up to `max_restarts` times if its process dies."""
    from relay.cluster.calls import get
    from relay.cluster.options import actor_options

    if not isinstance(cfg, (dict, RewardSpec)):  # e.g. relay.config.RewardConfig: send plain fields
        cfg = RewardSpec(kind=cfg.kind, model=cfg.model, rule=cfg.rule, url=cfg.url,
                         timeout_s=cfg.timeout_s, retries=cfg.retries,
                         max_outage_s=getattr(cfg, "max_outage_s", DEFAULT_MAX_OUTAGE_S),
                         max_response_bytes=getattr(cfg, "max_response_bytes", DEFAULT_MAX_RESPONSE_BYTES),
                         dtype=getattr(cfg, "dtype", "auto"), micro_batch_size=getattr(cfg, "micro_batch_size", 8))
    opts = actor_options(name=name, num_cpus=num_cpus, **{**restart_options(max_restarts), **options})
    actor = RewardActor.options(**opts).remote(cfg, tokenizer)
    client = RewardClient(actor, timeout_s, max_restarts, opts["name"])
    try:
        get(actor.stats.remote(), timeout_s, f"relay/{name} start")
    except Exception:
        ray.kill(actor, no_restart=True)
        raise
    return client


RewardActor = ray.remote(RewardServer)
"""The Ray actor class (`start_reward_actor` names it relay/reward)."""
