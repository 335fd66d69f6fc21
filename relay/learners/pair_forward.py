"""Preference pairs through one forward with the prompt computed once (DPO's policy and reference passes).

A chosen and a rejected reply usually share their prompt, and prompts are most of a pair's tokens (the demo
data: ~75%). The plain way (`stack_pairs`) runs 2P full rows. Here the pairs go through
`relay.learners.prefix_forward` (the P prompts once with the KV cache on, the 2P replies on top): p + 2r tokens
per pair instead of 2(p + r), with the loss and gradient of the stacked forward (a test checks both).

Needs a plain Hugging Face forward with a KV cache: not under gradient checkpointing (which turns the cache
off) nor ColossalAI's shardformer forwards (tp). Callers fall back to the stacked forward there, and whenever a
pair's prompts differ.
"""
from __future__ import annotations

from typing import Any

import torch

from relay.algos.losses import IGNORE_INDEX, logprobs_from_logits
from relay.learners.prefix_forward import shared_prefix_response_logits


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
    stacked pairs gives them. `prompt_lengths` from `shared_prompt_lengths`.

    The pairs are laid out as the PPO rollouts are (left-padded prompt, right-padded reply; the two rows of a
    pair next to each other), so `shared_prefix_response_logits` runs each prompt once."""
    pairs = prompt_lengths.shape[0]
    prompts, replies, labels = [], [], []
    for i in range(pairs):
        p = int(prompt_lengths[i])
        for side in ("chosen", "rejected"):  # interleaved: row 2i chosen, 2i+1 rejected
            n = int(batch[f"{side}_attention_mask"][i].sum())
            prompts.append(batch[f"{side}_input_ids"][i, :p])
            replies.append(batch[f"{side}_input_ids"][i, p:n])
            labels.append(batch[f"{side}_labels"][i, p:n])
    reply_ids, reply_labels = _right_pad(replies, 0), _right_pad(labels, IGNORE_INDEX)
    rows = {
        "input_ids": torch.cat([_left_pad(prompts, 0), reply_ids], dim=1),
        "attention_mask": torch.cat([_left_pad([torch.ones_like(p) for p in prompts], 0),
                                     _right_pad([torch.ones_like(r) for r in replies], 0)], dim=1),
    }
    logits = shared_prefix_response_logits(model, rows, reply_ids.shape[1])
    logp = logprobs_from_logits(logits, reply_labels).sum(-1)
    counts = (reply_labels != IGNORE_INDEX).sum(-1)
    order = torch.cat([torch.arange(0, 2 * pairs, 2), torch.arange(1, 2 * pairs, 2)]).to(logp.device)
    return logp[order], counts[order]
