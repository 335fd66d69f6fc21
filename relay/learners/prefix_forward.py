"""PPO/GRPO batches through the policy with each group's prompt computed once.

GRPO and RLOO sample n responses per prompt, and rows of one prompt sit next to each other (the rollout keeps
groups contiguous). Prompts are usually longer than responses, so a plain forward spends most of its work on
n copies of the same prompt. Here the distinct prompts run once with the KV cache on, the cache rows are
repeated for their samples (`batch_select_indices`, differentiable), and the responses run on top: P + nR
tokens per group instead of n(P + R). The logits and their gradients are the plain forward's (a test checks).

Needs a plain Hugging Face forward with a KV cache (not ColossalAI's shardformer forwards, not gradient
checkpointing); the PPO driver only asks for it where that holds. Batches without repeated prompts return None
and the caller runs the plain forward.
"""
from __future__ import annotations

from typing import Any

import torch

from relay.learners.logprobs import chunked_logprobs
from relay.learners.lossfn import position_ids_from_mask


def prompt_groups(input_ids: torch.Tensor, attention_mask: torch.Tensor, num_actions: int) -> torch.Tensor | None:
    """Row -> group index (B,) where consecutive rows share their (left-padded) prompt columns; None when no
    prompt repeats, or when there is no prompt."""
    P = input_ids.shape[1] - num_actions
    if P < 1 or input_ids.shape[0] < 2:
        return None
    prompts, pmask = input_ids[:, :P], attention_mask[:, :P]
    same = (prompts[1:] == prompts[:-1]).all(1) & (pmask[1:] == pmask[:-1]).all(1)
    if not bool(same.any()):
        return None
    starts = torch.cat([torch.ones(1, dtype=torch.long, device=input_ids.device), (~same).long()])
    return starts.cumsum(0) - 1


def shared_prefix_response_logits(model: Any, batch: dict[str, Any], num_actions: int) -> torch.Tensor | None:
    """[B, A, V] logits predicting the A response tokens (as `response_logits` of a plain forward), with
    each group's prompt computed once; None when no prompt repeats."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    groups = prompt_groups(ids, mask, num_actions)
    if groups is None:
        return None
    P = ids.shape[1] - num_actions
    is_first = torch.ones_like(groups, dtype=torch.bool)
    is_first[1:] = groups[1:] != groups[:-1]
    first = is_first.nonzero().squeeze(1)  # each group's first row
    pmask = mask[first, :P]
    out = model(input_ids=ids[first, :P], attention_mask=pmask, position_ids=position_ids_from_mask(pmask),
                use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    cache.batch_select_indices(groups)
    starts = pmask.sum(1)[groups]
    positions = starts[:, None] + torch.arange(num_actions, device=ids.device)[None, :]
    out2 = model(input_ids=ids[:, P:], attention_mask=mask, position_ids=positions, past_key_values=cache,
                 use_cache=False, logits_to_keep=num_actions)
    return torch.cat([out.logits[:, -1:][groups], out2.logits[:, : num_actions - 1]], dim=1)


def shared_prefix_logprobs(model: Any, batch: dict[str, Any], last: int, temperature: float = 1.0) -> torch.Tensor | None:
    """fp32 log p of the last `last` tokens [B, last] (the learners' `forward_logprobs(last=...)`), prompts
    once per group; None when no prompt repeats."""
    logits = shared_prefix_response_logits(model, batch, last)
    if logits is None:
        return None
    return chunked_logprobs(logits, batch["input_ids"][:, -last:], temperature)[0]
