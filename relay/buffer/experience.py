"""The Experience record: one batch of scored rollouts, ready for PPO updates. Imports torch only.

B = sequences in the batch, S = prompt + response length (prompt left-padded, response right-padded),
A = response length (the last A positions of `sequences`).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

_OPTIONAL = ("values", "ref_logprobs")


@dataclass
class Experience:
    sequences: torch.Tensor  # [B, S] int64 token ids: left-padded prompt, then right-padded response
    attention_mask: torch.Tensor  # [B, S] 1 on real (non-pad) tokens
    action_mask: torch.Tensor  # [B, A] 1 on generated response tokens
    old_logprobs: torch.Tensor  # [B, A] logprobs of the response under the policy that sampled it
    ref_logprobs: torch.Tensor | None  # [B, A] logprobs under the frozen reference (None: no KL, no reference)
    values: torch.Tensor | None  # [B, A] critic values (None for grpo / rloo)
    rewards: torch.Tensor  # [B, A] token-level rewards (KL penalty + score on the last action token)
    scores: torch.Tensor  # [B] sequence-level reward from the reward source
    advantages: torch.Tensor  # [B, A]
    returns: torch.Tensor  # [B, A]
    weight_version: torch.Tensor  # [B] int64 generator weight version that produced each sample
    sample_ids: list[str]  # B unique ids: a sample is stored, trained and counted once

    def __len__(self) -> int:
        return self.sequences.shape[0]

    @property
    def response_length(self) -> int:
        return self.action_mask.shape[1]

    def tensor_fields(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}

    def split(self) -> list["Experience"]:
        """One Experience per sample (B = 1), for buffering and reshuffling."""
        items = []
        for i in range(len(self)):
            kwargs: dict[str, Any] = {}
            for f in fields(self):
                value = getattr(self, f.name)
                if isinstance(value, torch.Tensor):
                    kwargs[f.name] = value[i : i + 1].clone()
                elif f.name == "sample_ids":
                    kwargs[f.name] = [value[i]]
                else:
                    kwargs[f.name] = value
            items.append(Experience(**kwargs))
        return items

    @staticmethod
    def collate(items: list["Experience"], pad_token_id: int = 0) -> "Experience":
        """Concatenate experiences, re-padding sequences (left) and response fields (right) to common lengths."""
        if not items:
            raise ValueError("Experience.collate: no experiences")
        A = max(e.response_length for e in items)
        P = max(e.sequences.shape[1] - e.response_length for e in items)

        def pad_seq(e: Experience, name: str, value: int) -> torch.Tensor:
            t = getattr(e, name)
            prompt, response = t[:, : t.shape[1] - e.response_length], t[:, t.shape[1] - e.response_length :]
            prompt = torch.nn.functional.pad(prompt, (P - prompt.shape[1], 0), value=value)
            response = torch.nn.functional.pad(response, (0, A - response.shape[1]), value=value)
            return torch.cat([prompt, response], dim=1)

        def pad_resp(t: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.pad(t, (0, A - t.shape[1]), value=0)

        out: dict[str, Any] = {
            "sequences": torch.cat([pad_seq(e, "sequences", pad_token_id) for e in items]),
            "attention_mask": torch.cat([pad_seq(e, "attention_mask", 0) for e in items]),
            "scores": torch.cat([e.scores for e in items]),
            "weight_version": torch.cat([e.weight_version for e in items]),
            "sample_ids": [s for e in items for s in e.sample_ids],
        }
        for name in ("action_mask", "old_logprobs", "ref_logprobs", "rewards", "advantages", "returns", "values"):
            present = [getattr(e, name) is not None for e in items]
            if name in _OPTIONAL and not all(present):
                if any(present):
                    raise ValueError(f"Experience.collate: field {name} is set on some experiences only")
                out[name] = None
                continue
            out[name] = torch.cat([pad_resp(getattr(e, name)) for e in items])
        return Experience(**out)
