"""Token logprobs over a big vocabulary without an fp32 [tokens, vocab] log-softmax.

`log_softmax(logits.float()).gather(token)` keeps a full fp32 copy of the logits' log-softmax for the backward
(SmolLM2: 49,152 floats = 192 KiB per token) and, for bf16 logits, an fp32 copy of the logits too. Here
logprob = scale * logit[token] - logsumexp(scale * logits) is computed in chunks of rows, fp32 only inside a
chunk; the backward recomputes each chunk's softmax from the saved logits (in their own dtype) and the saved
logsumexp: d logprob / d logits = scale * (onehot(token) - softmax). The entropy of each row comes from the same
pass (no gradient), for the PPO loss's metric.

Chunks are fixed-size row slices processed in order, so results are deterministic run to run (bit-identical),
though not bit-identical to the one-shot formula (a different summation order: ~1e-7 relative in fp32).
"""
from __future__ import annotations

import torch

# Rows per chunk: 64 rows x 49k vocab x 4 B = 12 MiB of fp32 scratch, enough to amortise the loop.
CHUNK_ROWS = 64


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _chunk_stats(x: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(logsumexp, entropy) per row of one chunk, in fp32 (fp64 for fp64 input)."""
    z = x.to(_acc(x.dtype))
    if scale != 1.0:
        z = z * scale
    lse = torch.logsumexp(z, dim=-1)
    p = torch.exp(z - lse[:, None])
    entropy = lse - (p * z).sum(-1)
    return lse, entropy


def _chunks(shape: torch.Size, chunk: int):
    """(b, slice) over a [B, T, V] tensor: row slices of at most `chunk` positions, in order."""
    for b in range(shape[0]):
        for s in range(0, shape[1], chunk):
            yield b, slice(s, s + chunk)


class _ChunkedLogprobs(torch.autograd.Function):
    """[B, T, V] logits (any strides: a slice of the model's output is not copied) and [B, T] tokens."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, tokens: torch.Tensor, scale: float, chunk: int):  # type: ignore[override]
        B, T, _ = logits.shape
        lse = torch.empty(B, T, dtype=_acc(logits.dtype), device=logits.device)
        entropy = torch.empty_like(lse)
        for b, s in _chunks(logits.shape, chunk):
            lse[b, s], entropy[b, s] = _chunk_stats(logits[b, s], scale)
        picked = logits.gather(-1, tokens[..., None]).squeeze(-1).to(lse.dtype) * scale
        ctx.save_for_backward(logits, tokens, lse)
        ctx.scale, ctx.chunk = scale, chunk
        ctx.mark_non_differentiable(entropy)
        return picked - lse, entropy

    @staticmethod
    def backward(ctx, grad_logp: torch.Tensor, _grad_entropy: torch.Tensor):  # type: ignore[override]
        logits, tokens, lse = ctx.saved_tensors
        scale, chunk = ctx.scale, ctx.chunk
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        g = grad_logp.to(lse.dtype)
        for b, s in _chunks(logits.shape, chunk):
            z = logits[b, s].to(lse.dtype)
            if scale != 1.0:
                z = z * scale
            gs = g[b, s, None]
            d = torch.exp(z - lse[b, s, None]).mul_(-gs)  # -g * softmax
            d.scatter_add_(-1, tokens[b, s, None], gs)  # + g at the token
            if scale != 1.0:
                d.mul_(scale)
            grad[b, s] = d
        return grad, None, None, None


def chunked_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                     chunk: int = CHUNK_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 log_softmax(logits / temperature)[token], fp32 entropy of that distribution, no gradient):
    logits [B, T, V] or [N, V] (any float dtype) and tokens [B, T] or [N] -> two tensors shaped like tokens."""
    if logits.dim() == 2:
        logp, entropy = _ChunkedLogprobs.apply(logits[None], tokens[None], 1.0 / temperature, chunk)
        return logp[0], entropy[0]
    return _ChunkedLogprobs.apply(logits, tokens, 1.0 / temperature, chunk)


def reference_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The one-shot formula `chunked_logprobs` replaces (tests and before/after benchmarks compare with it)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    with torch.no_grad():
        entropy = -(logp.exp() * logp).sum(-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1), entropy
