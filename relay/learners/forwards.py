"""No-grad forwards of one learner rank: the critic's per-token values and the policy's token logprobs (PPO
scoring, old logprobs), optionally in micro-batches so peak activation memory follows the micro-batch, not
the episode.

A micro-batch drops the columns none of its rows attends to (left padding before its longest prompt, right
padding after its longest response: what `relay.learners.ppo.trim_padding_columns` does for each training
micro-batch, here read off the attention mask since a forward has no action mask), runs, and is written back
into the batch's full width. Micro-batched outputs read 0 where they hold no real number: values at padding
positions, logprobs of padding tokens and of each row's first token (nothing real precedes it); the real
entries do not depend on the micro-batch size beyond float rounding (tests/test_learner_accumulation.py).

Every data-parallel rank runs the same number of forwards (`forward_count`), a slice with nothing to compute
(no rows, or no real token where the output is wanted) running a one-token `keep_step` forward whose output is
dropped: torch DDP's first forward after training broadcasts buffers and sharded plugins (Gemini) gather weights
in every forward, so a rank that skipped one would leave its peers waiting.
"""
from __future__ import annotations

from typing import Any

import torch

from relay.learners.lossfn import causal_logits, last_token_logprobs, model_inputs, split_rows, token_logprobs
from relay.learners.prefix_forward import shared_prefix_logprobs

WHATS = ("logprobs", "values")


def forward_count(global_rows: int, dp_size: int, micro_batch_size: int) -> int:
    """Forwards each data-parallel rank runs: the busiest rank's rows (ceil(rows / dp)) in micro-batches of at most
    `micro_batch_size` rows; one forward with `micro_batch_size` 0 (all of a rank's rows at once)."""
    if micro_batch_size < 0:
        raise ValueError(f"micro_batch_size must be >= 0 (0: one forward), got {micro_batch_size}")
    if micro_batch_size == 0:
        return 1
    busiest = -(-global_rows // dp_size)
    return max(1, -(-busiest // micro_batch_size))


def used_columns(attention_mask: torch.Tensor) -> tuple[int, int]:
    """[lo, hi): the columns some row attends to (0, 0 when none does)."""
    cols = attention_mask.bool().any(dim=0).nonzero()
    if cols.numel() == 0:
        return 0, 0
    return int(cols.min()), int(cols.max()) + 1


def keep_step(model: Any, device: Any) -> None:
    """A one-token forward whose output is dropped: takes part in whatever collectives a forward makes."""
    model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device))


def plain_forward(model: Any, batch: dict[str, Any], what: str, temperature: float = 1.0, last: int | None = None,
                  shared_prefix: bool = False) -> torch.Tensor:
    """One forward over all of `batch`'s rows: 'logprobs' [B, T-1] (or their last `last` columns, a group's
    repeated prompt run once when `shared_prefix`), or 'values' [B, T]."""
    if what == "values":
        return model(**model_inputs(batch)).float()
    if what != "logprobs":
        raise ValueError(f"forward: unknown output {what!r} (use one of {WHATS})")
    if not last:
        return token_logprobs(causal_logits(model, batch), batch["input_ids"], temperature)
    out = shared_prefix_logprobs(model, batch, last, temperature) if shared_prefix else None
    return out if out is not None else last_token_logprobs(model, batch, last, temperature)


def trimmed_forward(model: Any, batch: dict[str, Any], what: str, temperature: float = 1.0, last: int | None = None,
                    shared_prefix: bool = False) -> torch.Tensor:
    """`plain_forward` over only the columns some row attends to, placed back into the full width, entries without
    a real number set to 0 (module docstring). Without an attention mask: `plain_forward` as it is."""
    mask = batch.get("attention_mask")
    if mask is None:
        return plain_forward(model, batch, what, temperature, last, shared_prefix)
    B, T = mask.shape
    lo, hi = used_columns(mask)
    cut = {k: (v[:, lo:hi] if torch.is_tensor(v) and v.dim() == 2 and v.shape[1] == T else v) for k, v in batch.items()}
    if what == "values":
        full = torch.zeros(B, T, dtype=torch.float32, device=mask.device)
        if hi > lo:
            full[:, lo:hi] = plain_forward(model, cut, what)
        else:
            keep_step(model, mask.device)
        return full * mask
    # Token t's logprob (column t-1 of [B, T-1]) needs position t-1 in the batch: tokens lo+1 .. hi-1 can be had.
    first = T - last if last else 1
    start = max(first, lo + 1)
    full = torch.zeros(B, T - first, dtype=torch.float32, device=mask.device)
    if hi > start:
        n = hi - start
        out = plain_forward(model, cut, what, temperature, n if last else None, shared_prefix)
        full[:, start - first : hi - first] = out[:, -n:].float()
    else:
        keep_step(model, mask.device)
    real = mask[:, 1:].bool() & mask[:, :-1].bool()  # the token and the one before it are real
    return full * real[:, first - 1 :]


def micro_batched_forward(
    model: Any, local: dict[str, Any], what: str, *, count: int, micro_batch_size: int, temperature: float = 1.0,
    last: int | None = None, shared_prefix: bool = False,
) -> torch.Tensor | None:
    """This rank's rows in `count` near-equal slices (`forward_count`), outputs concatenated in row order;
    None when the rank has no rows. `micro_batch_size` 0: untrimmed forwards (the raw outputs, padding
    entries included); > 0: `trimmed_forward`s. An empty slice runs a `keep_step`."""
    run = trimmed_forward if micro_batch_size > 0 else plain_forward
    parts = []
    for i in range(count):
        part = split_rows(local, i, count)
        if part["input_ids"].shape[0] == 0:
            keep_step(model, part["input_ids"].device)
            continue
        parts.append(run(model, part, what, temperature, last, shared_prefix))
    return torch.cat(parts, dim=0) if parts else None
