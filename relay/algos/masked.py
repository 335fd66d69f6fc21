"""Masked reductions shared by the estimators and losses."""
from __future__ import annotations

import torch


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean over positions where mask is 1 (safe when a row has no such position)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = masked_mean(x, mask)
    return masked_mean((x - mean) ** 2, mask)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise to mean 0 (optional) and std 1 over masked positions; masked-out positions become 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def masked_token_mean(x: torch.Tensor, mask: torch.Tensor, token_normalizer: float | None = None) -> torch.Tensor:
    """masked_mean over all positions, or, with `token_normalizer`, the masked sum divided by it.

    Gradient accumulation over micro-batches of unequal token counts: pass every micro-batch the total number of
    tokens of the whole (global) batch and sum the results; that equals one token mean over the whole batch,
    where a mean of per-micro-batch means would weight a short micro-batch's tokens more.
    """
    if token_normalizer is None:
        return masked_mean(x, mask)
    if token_normalizer <= 0:
        raise ValueError(f"token_normalizer must be > 0, got {token_normalizer}")
    return masked_sum(x, mask.to(x.dtype)) / token_normalizer
