"""Batches for the learners: a resumable, seeded sample order, and collation of prepared records (SFT, ptx,
preference, prompt) into padded tensors. The order depends only on (seed, epoch), so a checkpoint needs just
(epoch, position) to resume exactly."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from relay.data.tokenize import pad_left, pad_right

IGNORE_INDEX = -100


@dataclass
class BatchOrder:
    """Which sample indices make each global batch. State = (epoch, position) within the epoch's permutation."""

    num_samples: int
    batch_size: int  # global batch (all data-parallel ranks x micro-batch x accumulation)
    seed: int = 42
    shuffle: bool = True
    drop_last: bool = True
    epoch: int = 0
    position: int = 0

    def __post_init__(self) -> None:
        if self.num_samples < self.batch_size and self.drop_last:
            raise ValueError(
                f"dataset has {self.num_samples} samples, fewer than one global batch of {self.batch_size}; "
                "lower batch_size / accumulation_steps / num_ranks or add data"
            )

    @property
    def batches_per_epoch(self) -> int:
        full, rest = divmod(self.num_samples, self.batch_size)
        return full + (0 if self.drop_last or rest == 0 else 1)

    def _permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_samples))
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_samples, generator=g).tolist()

    def next_batch(self) -> list[int]:
        """Indices of the next global batch; moves to the next epoch when this one is exhausted."""
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        perm = self._permutation(self.epoch)
        start = self.position * self.batch_size
        self.position += 1
        return perm[start : start + self.batch_size]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_samples": self.num_samples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("num_samples", self.num_samples) != self.num_samples:
            raise ValueError(
                f"checkpoint was made on {state['num_samples']} samples, this dataset has {self.num_samples}: "
                "resume with the same data"
            )
        self.epoch, self.position, self.seed = int(state["epoch"]), int(state["position"]), int(state["seed"])


def _tensors(ids: list[list[int]], mask: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)


def collate_sft(rows: list[dict[str, Any]], pad_id: int, prefix: str = "") -> dict[str, torch.Tensor]:
    """SFT / ptx rows -> {input_ids, attention_mask, labels}, right-padded (labels padded with -100)."""
    ids, mask = pad_right([r[f"{prefix}input_ids"] for r in rows], pad_id)
    labels, _ = pad_right([r[f"{prefix}labels"] for r in rows], IGNORE_INDEX)
    input_ids, attention_mask = _tensors(ids, mask)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": torch.tensor(labels, dtype=torch.long)}


def collate_preference(rows: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Preference rows -> chosen rows first, then rejected rows, padded to one length: [2B, S] tensors.

    One forward over both halves is cheaper than two; `num_pairs` says where the halves split.
    """
    chosen = [{"input_ids": r["chosen_input_ids"], "labels": r["chosen_labels"]} for r in rows]
    rejected = [{"input_ids": r["rejected_input_ids"], "labels": r["rejected_labels"]} for r in rows]
    batch = collate_sft(chosen + rejected, pad_id)
    batch["num_pairs"] = torch.tensor(len(rows))
    return batch


def collate_prompts(rows: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Prompt rows -> left-padded {input_ids, attention_mask}, ready for generation."""
    ids, mask = pad_left([r["input_ids"] for r in rows], pad_id)
    input_ids, attention_mask = _tensors(ids, mask)
    return {"input_ids": input_ids, "attention_mask": attention_mask}
