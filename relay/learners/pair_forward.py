"""Preference pairs through one forward with the prompt computed once (DPO's policy and reference passes).

A chosen and a rejected reply usually share their prompt, and prompts are most of a pair's tokens (the demo
data: ~75%). The plain way (`stack_pairs`) runs 2P full rows. Here the P prompts run once with the KV cache on,
the cache is repeated for the two replies, and the 2P replies run on top of it: p + 2r tokens per pair instead
of 2(p + r). Gradients flow through the cache into the prompt's activations, so the loss and its gradient are
those of the stacked forward (a test checks both).

Needs a plain Hugging Face forward with a KV cache: not under gradient checkpointing (which turns the cache
off) nor ColossalAI's shardformer forwards (tp). Callers fall back to the stacked forward there, and whenever a
pair's prompts differ.
"""
from __future__ import annotations

from typing import Any

import torch

from relay.algos.losses import IGNORE_INDEX, logprobs_from_logits
from relay.learners.lossfn import position_ids_from_mask


def shared_prompt_lengths(batch: dict[str, Any]) -> torch.Tensor | None:
    """Per pair, the prompt length both replies share (tokens before the first label), or None when a pair's
    prompts differ, a row has no label, or a prompt is empty."""
    ids_c, ids_r = batch["chosen_input_ids"], batch["rejected_input_ids"]
    lab_c, lab_r = batch["chosen_labels"], batch["rejected_labels"]
    if ids_c.shape[0] == 0:
        return None
    has_c, has_r = (lab_c != IGNORE_INDEX), (lab_r != IGNORE_INDEX)
    if not (has_c.any(1).all() and has_r.any(1).all()):
        return None
    p_c, p_r = has_c.int().argmax(1), has_r.int().argmax(1)
    if not torch.equal(p_c, p_r) or int(p_c.min()) < 1:
        return None
    width = min(ids_c.shape[1], ids_r.shape[1])
    cols = torch.arange(width, device=ids_c.device)
    in_prompt = cols[None, :] < p_c[:, None]
    if not torch.equal(ids_c[:, :width][in_prompt], ids_r[:, :width][in_prompt]):
        return None
    return p_c


def _left_pad(rows: list[torch.Tensor], value: int) -> torch.Tensor:
    width = max(r.shape[0] for r in rows)
    return torch.stack([torch.nn.functional.pad(r, (width - r.shape[0], 0), value=value) for r in rows])


def _right_pad(rows: list[torch.Tensor], value: int) -> torch.Tensor:
    width = max(r.shape[0] for r in rows)
    return torch.stack([torch.nn.functional.pad(r, (0, width - r.shape[0]), value=value) for r in rows])


def shared_prompt_logprobs(
    model: Any, batch: dict[str, Any], prompt_lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed label logprobs (2P,), label counts (2P,)), chosen rows first, as `sequence_logprobs` of the
    stacked pairs gives them. `prompt_lengths` from `shared_prompt_lengths`."""
    pairs = prompt_lengths.shape[0]
    prompts, replies, labels = [], [], []
    for i in range(pairs):
        p = int(prompt_lengths[i])
        prompts.append(batch["chosen_input_ids"][i, :p])
        for side in ("chosen", "rejected"):  # interleaved: row 2i chosen, 2i+1 rejected (repeat_interleave order)
            n = int(batch[f"{side}_attention_mask"][i].sum())
            replies.append(batch[f"{side}_input_ids"][i, p:n])
            labels.append(batch[f"{side}_labels"][i, p:n])
    prompt_ids = _left_pad(prompts, 0)
    prompt_mask = _left_pad([torch.ones_like(p) for p in prompts], 0)
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=position_ids_from_mask(prompt_mask),
                use_cache=True, logits_to_keep=1)
    first_logits = out.logits[:, -1:].repeat_interleave(2, dim=0)  # predicts each reply's first token
    cache = out.past_key_values
    cache.batch_repeat_interleave(2)

    reply_ids = _right_pad(replies, 0)
    reply_mask = _right_pad([torch.ones_like(r) for r in replies], 0)
    reply_labels = _right_pad(labels, IGNORE_INDEX)
    starts = prompt_lengths.repeat_interleave(2).to(reply_ids.device)
    positions = starts[:, None] + torch.arange(reply_ids.shape[1], device=reply_ids.device)[None, :]
    mask = torch.cat([prompt_mask.repeat_interleave(2, dim=0), reply_mask], dim=1)
    width = reply_ids.shape[1]
    out2 = model(input_ids=reply_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                 use_cache=False, logits_to_keep=width)  # the last position predicts nothing but keeps shapes simple
    logits = torch.cat([first_logits, out2.logits[:, : width - 1]], dim=1)
    logp = logprobs_from_logits(logits, reply_labels).sum(-1)
    counts = (reply_labels != IGNORE_INDEX).sum(-1)
    order = torch.cat([torch.arange(0, 2 * pairs, 2), torch.arange(1, 2 * pairs, 2)]).to(logp.device)
    return logp[order], counts[order]
