"""Stage 1 (SFT) loss, run inside the learner workers, and the batch helpers the RM and DPO losses share.

Losses here follow `relay.learners.lossfn`'s protocol `fn(model, batch, **kw) -> (loss, metrics)`. The driver
passes the functions themselves to `LearnerGroup.train_step`, so they pickle by reference to this module and
the workers import it; they are also registered by name for callers that prefer names.

Gradient accumulation (the config's accumulation_steps) is the learner worker's job: `train_step(...,
micro_batches=n)` calls these losses once per micro-batch and runs a backward after each, so only one
micro-batch's activations are alive at a time.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from relay.algos.losses import IGNORE_INDEX
from relay.learners.lossfn import (
    denominators_or_counts, label_token_counts, model_inputs, normalized, register_loss,
)


def prepare_step(num_threads: int | None = None, step_seed: int | None = None) -> None:
    """Per-step worker setup: the config's thread count (workers start with 1 thread), and a random state that
    depends only on (step_seed, rank). Dropout masks then come out the same after a resume, with no worker RNG
    state to checkpoint."""
    if num_threads and torch.get_num_threads() != num_threads:
        torch.set_num_threads(num_threads)
    if step_seed is not None:
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_initialized() else 0
        torch.manual_seed(hash((step_seed, rank)) & 0x7FFF_FFFF_FFFF_FFFF)  # int hashes are not randomised


def trim_padding(batch: dict[str, Any], mask_key: str = "attention_mask") -> dict[str, Any]:
    """Drop trailing columns no row attends to (rows are right-padded to the global batch's longest row; this
    rank's rows are often shorter). Every (B, T) tensor shaped like the mask is cut the same way."""
    mask = batch[mask_key]
    used = mask.any(dim=0).nonzero()
    length = int(used.max()) + 1 if used.numel() else 1
    if length == mask.shape[1]:
        return batch
    return {k: (v[:, :length] if torch.is_tensor(v) and v.dim() == 2 and v.shape == mask.shape else v) for k, v in batch.items()}


def first_label_column(labels: torch.Tensor) -> int:
    """Smallest shifted position t (target = labels[:, t + 1]) any row trains on; T - 2 when none does."""
    cols = (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero()
    return int(cols.min()) if cols.numel() else max(labels.shape[1] - 2, 0)


def label_logits(model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits predicting targets first..T-2, targets labels[:, first+1:]) with logits computed only there."""
    labels = batch["labels"]
    first = first_label_column(labels)
    keep = labels.shape[1] - first  # logits at positions first..T-1; the last one predicts nothing
    out = model(**model_inputs(batch), use_cache=False, logits_to_keep=keep)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits[:, :-1], labels[:, first + 1 :]


def _sft_micro(model: Any, batch: dict[str, Any], label_tokens: float) -> tuple[torch.Tensor, dict[str, float]]:
    logits, targets = label_logits(model, trim_padding(batch))
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    return loss / label_tokens, {}


@register_loss("sft")
@normalized(label_token_counts)
def sft_loss(
    model: Any, batch: dict[str, Any], num_threads: int | None = None, step_seed: int | None = None,
    denominators: dict[str, float] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Next-token cross entropy on assistant tokens only: `labels` (from `relay prepare sft`) are -100 on
    system/user/template tokens and padding, so those positions do not count. A mean over the optimizer step's
    label tokens (all micro-batches and ranks; over `batch` when called without `denominators`)."""
    prepare_step(num_threads, step_seed)
    den = denominators_or_counts(denominators, label_token_counts, batch)
    return _sft_micro(model, batch, den["label_tokens"])


def masked_token_mean_nll(logprobs: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(sum of -log p, label-token count) from `forward_logprobs` output (B, T-1) and labels (B, T): the
    driver's eval loss for SFT, over the same tokens as the training loss."""
    mask = labels[:, 1 : 1 + logprobs.shape[1]] != IGNORE_INDEX
    return float(-(logprobs * mask).sum()), float(mask.sum())
