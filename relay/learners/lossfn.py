"""Loss functions for learner groups: the protocol, a name registry, forward helpers and placeholder losses.

A loss is `fn(model, batch, **kwargs) -> loss | (loss, metrics)`: `model` is the boosted model (call it like
the HF causal LM or `relay.models.heads.CriticModel`), `batch` one rank's rows as tensors on its device,
`metrics` a dict of floats. PPO/DPO/RM losses live in `relay.algos` and plug in by name (`register_loss`) or as
callables. Nothing here imports ColossalAI or Ray, so the same functions run on an unwrapped model in tests.

A loss that averages over units (tokens, pairs) declares them with `@normalized(counts)`: the worker then
counts the units of the whole optimizer step (all micro-batches, all data-parallel ranks) and passes
`denominators`, so that accumulated micro-batches of any sizes give the gradient of one big batch's mean.
Losses without it are weighted 1/n per micro-batch (exact only for equal micro-batches).
"""
from __future__ import annotations

from typing import Any, Callable

LossFn = Callable[..., Any]
Counts = Callable[[dict[str, Any]], dict[str, float]]
_LOSSES: dict[str, LossFn] = {}
IGNORE_INDEX = -100
# Tensors whose name starts with one of these form their own rows (e.g. ptx rows beside PPO experiences): they
# are split over data-parallel ranks and micro-batches by their own row count.
ROW_GROUP_PREFIXES = ("ptx_",)


def register_loss(name: str) -> Callable[[LossFn], LossFn]:
    """Decorator: make `fn(model, batch, **kwargs)` available to `train_step(loss=name)`. The module defining
    it must be imported in the workers too (a module of the `relay` package imported by this one, or pass the
    callable itself)."""

    def deco(fn: LossFn) -> LossFn:
        _LOSSES[name] = fn
        return fn

    return deco


def normalized(counts: Counts, summed: tuple[str, ...] = ()) -> Callable[[LossFn], LossFn]:
    """Decorator for a loss that is a mean over units counted by `counts(batch) -> {unit: count}` (the first
    unit is the primary one). The loss takes `denominators={unit: n}` and divides its sums by them; when it is
    called without them it divides by its own batch's counts (a plain mean over `batch`). Metrics named in
    `summed` are computed the same way (contributions that add up over micro-batches); the others are means
    that the worker weights by each micro-batch's primary count."""

    def deco(fn: LossFn) -> LossFn:
        fn.loss_counts = counts
        fn.summed_metrics = frozenset(summed)
        return fn

    return deco


def denominators_or_counts(denominators: dict[str, float] | None, counts: Counts, batch: dict[str, Any]) -> dict[str, float]:
    """The worker's step-wide denominators, or this batch's own counts (at least 1 each) when there are none."""
    if denominators is not None:
        return denominators
    return {k: max(float(v), 1.0) for k, v in counts(batch).items()}


def resolve_loss(loss: str | LossFn) -> LossFn:
    if callable(loss):
        return loss
    if loss not in _LOSSES:
        raise ValueError(f"unknown loss {loss!r}; registered: {sorted(_LOSSES)} (or pass a callable)")
    return _LOSSES[loss]


def row_group(key: str) -> str:
    """The row group of a batch entry: its `ROW_GROUP_PREFIXES` prefix, or '' for the main rows."""
    return next((p for p in ROW_GROUP_PREFIXES if key.startswith(p)), "")


def split_rows(batch: dict[str, Any], i: int, n: int) -> dict[str, Any]:
    """Slice i of n of every row group: each group is cut by its own row count into near-equal parts (a group
    with fewer rows than n leaves some slices empty). Non-tensors and scalars are kept as they are."""
    import torch

    rows: dict[str, int] = {}
    for k, v in batch.items():
        if torch.is_tensor(v) and v.dim() > 0:
            rows.setdefault(row_group(k), v.shape[0])
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v) and v.dim() > 0:
            r = rows[row_group(k)]
            out[k] = v[r * i // n : r * (i + 1) // n]
        else:
            out[k] = v
    return out


def split_micro_batches(batch: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """`n` near-equal row slices of a rank's batch, each row group cut by its own row count (so `ptx_*` rows,
    which number differently from the main rows, are spread over the micro-batches too). Fewer than `n`
    slices when the main rows number fewer than `n`."""
    import torch

    main = batch.get("input_ids", next((v for v in batch.values() if torch.is_tensor(v)), None))
    n = max(1, min(n, main.shape[0] if main is not None else 1))
    return [split_rows(batch, i, n) for i in range(n)]


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
    """log p(input_ids[:, t] | prefix) for t >= 1, shape (B, T-1), in fp32 (chunked over positions: no fp32
    copy of the whole log-softmax; the PPO loss computes its logprobs the same way, so a recomputed ratio is 1)."""
    from relay.learners.logprobs import chunked_logprobs

    return chunked_logprobs(logits[:, :-1], input_ids[:, 1:], temperature)[0]


def lm_labels(batch: dict[str, Any]) -> Any:
    """`labels`, or input_ids where attention_mask (-100 elsewhere) when the batch has none."""
    labels = batch.get("labels")
    if labels is None:
        labels = batch["input_ids"].clone()
        if "attention_mask" in batch:
            labels[batch["attention_mask"] == 0] = IGNORE_INDEX
    return labels


def label_token_counts(batch: dict[str, Any]) -> dict[str, float]:
    """Tokens a next-token loss trains on: labels[:, 1:] that are not -100."""
    return {"label_tokens": float((lm_labels(batch)[:, 1:] != IGNORE_INDEX).sum())}


def _value_mask(batch: dict[str, Any], values: Any) -> Any:
    import torch

    mask = batch.get("loss_mask", batch.get("attention_mask"))
    return torch.ones_like(values) if mask is None else mask.float()


def value_token_counts(batch: dict[str, Any]) -> dict[str, float]:
    mask = batch.get("loss_mask", batch.get("attention_mask"))
    return {"tokens": float(mask.sum()) if mask is not None else float(batch["targets"].numel())}


@register_loss("causal_lm")
@normalized(label_token_counts)
def causal_lm_loss(
    model: Any, batch: dict[str, Any], denominators: dict[str, float] | None = None
) -> tuple[Any, dict[str, float]]:
    """Token-mean next-token cross-entropy. `labels` (-100 ignored) default to input_ids where attention_mask."""
    import torch.nn.functional as F

    den = denominators_or_counts(denominators, label_token_counts, batch)
    logits = causal_logits(model, batch)
    shift_logits = logits[:, :-1].float()
    shift_labels = lm_labels(batch)[:, 1:]
    loss_sum = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss_sum / den["label_tokens"], {}


@register_loss("value_mse")
@normalized(value_token_counts)
def value_mse_loss(
    model: Any, batch: dict[str, Any], denominators: dict[str, float] | None = None
) -> tuple[Any, dict[str, float]]:
    """Masked mean of (value - targets)^2 for a critic; mask = `loss_mask`, else `attention_mask`, else all."""
    den = denominators_or_counts(denominators, value_token_counts, batch)
    values = model(**model_inputs(batch)).float()
    mask = _value_mask(batch, values)
    loss = ((values - batch["targets"].float()) ** 2 * mask).sum() / den["tokens"]
    value_mean = (values.detach() * mask).sum() / mask.sum().clamp(min=1.0)
    return loss, {"value_mean": float(value_mean)}
