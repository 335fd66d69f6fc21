"""Matmul FLOPs of a causal LM's update, from parameter counts: the numerator of "achieved GFLOP/s", which
benchmarks divide by the machine's measured matmul rate (`benchmarks.matmul_rate`).

The usual estimate (Kaplan et al. 2020): a forward costs 2 FLOPs per weight per token (a multiply and an add),
a backward twice that, so forward + backward is 6 x parameters x tokens; a forward-only pass (old or reference
logprobs recomputed by the learner) is 2 x parameters x tokens. Two refinements matter for small models with
big vocabularies: the input embedding is a lookup, not a matmul, and the LM head (vocab x hidden, 21% of
SmolLM2-135M) runs only at positions whose logits are kept (`logits_to_keep`: the response, not the prompt).
Attention's own T^2 terms and the element-wise work (norms, activations, softmax) are left out: at a few
hundred tokens and hidden 576 they are a few percent. Pure functions, no torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

FWD_BWD = 6  # FLOPs per weight per token, forward + backward
FWD = 2  # forward only


@dataclass(frozen=True)
class ParamSplit:
    """Weights a token passes through as matmuls: `body` (every layer's projections) and `head` (LM head)."""

    body: int
    head: int


def param_split(config: Mapping[str, Any] | Any) -> ParamSplit:
    """Matmul weights of a Llama-style decoder from its config (a dict or a transformers config): per layer
    q/o (h x h), k/v (h x kv_heads x head_dim), gate/up/down (h x intermediate); head vocab x h. Norm weights and
    the embedding lookup are not matmuls."""
    get = (lambda k, d=None: config.get(k, d)) if isinstance(config, Mapping) else (lambda k, d=None: getattr(config, k, d))
    h, inter, layers = get("hidden_size"), get("intermediate_size"), get("num_hidden_layers")
    heads = get("num_attention_heads")
    kv_heads = get("num_key_value_heads") or heads
    head_dim = get("head_dim") or h // heads
    attn = 2 * h * heads * head_dim + 2 * h * kv_heads * head_dim
    mlp = 3 * h * inter
    return ParamSplit(body=layers * (attn + mlp), head=get("vocab_size") * h)


def update_flops(params: ParamSplit, trained_tokens: int, trained_logit_tokens: int, forward_tokens: int = 0,
                 forward_logit_tokens: int = 0) -> int:
    """Matmul FLOPs of an update: 6 x (body x trained tokens + head x trained positions with logits) for the
    forward + backward passes, plus 2 x (the same) for forward-only passes (tokens summed over all such passes)."""
    return (FWD_BWD * (params.body * trained_tokens + params.head * trained_logit_tokens)
            + FWD * (params.body * forward_tokens + params.head * forward_logit_tokens))


def achieved_gflops(flops: float, seconds: float) -> float:
    """FLOPs / seconds in GFLOP/s (0 for a zero or negative time)."""
    return flops / seconds / 1e9 if seconds > 0 else 0.0
