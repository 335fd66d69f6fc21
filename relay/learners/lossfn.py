"""Loss functions for learner groups: the protocol, a name registry, forward helpers and placeholder losses.

A loss is `fn(model, batch, **kwargs) -> loss | (loss, metrics)`: `model` is the boosted model (call it like
the HF causal LM or `relay.models.heads.CriticModel`), `batch` one rank's rows as tensors on its device,
`metrics` a dict of floats. PPO/DPO/RM losses live in `relay.algos` and plug in by name (`register_loss`) or as
callables. Nothing here imports ColossalAI or Ray, so the same functions run on an unwrapped model in tests.
"""
from __future__ import annotations

from typing import Any, Callable

LossFn = Callable[..., Any]
_LOSSES: dict[str, LossFn] = {}


def register_loss(name: str) -> Callable[[LossFn], LossFn]:
    """Decorator: make `fn(model, batch, **kwargs)` available to `train_step(loss=name)`. The module defining
    it must be imported in the workers too (a module of the `relay` package imported by this one, or pass the
    callable itself)."""

    def deco(fn: LossFn) -> LossFn:
        _LOSSES[name] = fn
        return fn

    return deco


def resolve_loss(loss: str | LossFn) -> LossFn:
    if callable(loss):
        return loss
    if loss not in _LOSSES:
        raise ValueError(f"unknown loss {loss!r}; registered: {sorted(_LOSSES)} (or pass a callable)")
    return _LOSSES[loss]


def split_micro_batches(batch: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """`n` near-equal row slices of a rank's batch, each tensor cut by its own row count (so `ptx_*` rows,
    which number differently from the main rows, are spread over the micro-batches too). Fewer than `n`
    slices when the main rows number fewer than `n`."""
    import torch

    main = batch.get("input_ids", next((v for v in batch.values() if torch.is_tensor(v)), None))
    n = max(1, min(n, main.shape[0] if main is not None else 1))

    def cut(v: Any, i: int) -> Any:
        if not (torch.is_tensor(v) and v.dim() > 0):
            return v
        rows = v.shape[0]
        return v[rows * i // n : rows * (i + 1) // n]

    return [{k: cut(v, i) for k, v in batch.items()} for i in range(n)]


def position_ids_from_mask(attention_mask: Any) -> Any:
    """Positions that skip left padding (as vLLM numbers prompt tokens): cumsum(mask) - 1, clamped at 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """input_ids, attention_mask and position_ids for a forward (positions derived from the mask if absent)."""
    inputs = {"input_ids": batch["input_ids"]}
    mask = batch.get("attention_mask")
    if mask is not None:
        inputs["attention_mask"] = mask
        inputs["position_ids"] = batch.get("position_ids", position_ids_from_mask(mask))
    elif "position_ids" in batch:
        inputs["position_ids"] = batch["position_ids"]
    return inputs


def causal_logits(model: Any, batch: dict[str, Any], keep: int = 0) -> Any:
    """(B, T, V) logits of a causal LM (full vocabulary also under tp: the policies gather them); with `keep`
    only the last `keep` positions (B, keep, V): the LM head and its softmax skip the prompt, a large share of a
    small model's forward."""
    extra = {"logits_to_keep": keep} if keep > 0 else {}
    out = model(**model_inputs(batch), use_cache=False, **extra)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits[:, -keep:] if keep > 0 else logits  # a forward that ignores logits_to_keep still fits


def last_token_logprobs(model: Any, batch: dict[str, Any], last: int, temperature: float = 1.0) -> Any:
    """The last `last` columns of `token_logprobs` (B, last), with logits computed only where needed."""
    logits = causal_logits(model, batch, keep=last + 1)
    return token_logprobs(logits, batch["input_ids"][:, -(last + 1):], temperature)


def token_logprobs(logits: Any, input_ids: Any, temperature: float = 1.0) -> Any:
    """log p(input_ids[:, t] | prefix) for t >= 1, shape (B, T-1), computed in fp32."""
    import torch

    logits = logits[:, :-1].float()
    if temperature != 1.0:
        logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)


@register_loss("causal_lm")
def causal_lm_loss(model: Any, batch: dict[str, Any]) -> tuple[Any, dict[str, float]]:
    """Token-mean next-token cross-entropy. `labels` (-100 ignored) default to input_ids where attention_mask."""
    import torch.nn.functional as F

    logits = causal_logits(model, batch)
    labels = batch.get("labels")
    if labels is None:
        labels = batch["input_ids"].clone()
        if "attention_mask" in batch:
            labels[batch["attention_mask"] == 0] = -100
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=-100
    )
    return loss, {"label_tokens": float((shift_labels != -100).sum())}


@register_loss("value_mse")
def value_mse_loss(model: Any, batch: dict[str, Any]) -> tuple[Any, dict[str, float]]:
    """Masked mean of (value - targets)^2 for a critic; mask = `loss_mask`, else `attention_mask`, else all."""
    import torch

    values = model(**model_inputs(batch)).float()
    targets = batch["targets"].float()
    mask = batch.get("loss_mask", batch.get("attention_mask"))
    mask = torch.ones_like(values) if mask is None else mask.float()
    loss = ((values - targets) ** 2 * mask).sum() / mask.sum().clamp(min=1.0)
    value_mean = (values.detach() * mask).sum() / mask.sum().clamp(min=1.0)
    return loss, {"value_mean": float(value_mean)}
