"""Driver-side data for `relay sft|rm|dpo` (relay.launch.train): prepared rows as token lists, right-padded
numpy batches, the once-computed DPO reference logprobs, and eval metrics over a whole split (computed from
the learner group's no-grad forwards, with the same formulas the training losses use)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from relay.algos.losses import IGNORE_INDEX
from relay.config import TrainConfig


# ------------------------------------------------------------------------------------------------ data
@dataclass
class Samples:
    """Token ids of prepared rows, truncated to max_length. sft: ids/labels; preference: chosen_*/rejected_*."""

    columns: dict[str, list[list[int]]]
    dropped: int = 0

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def max_id(self) -> int:
        return max((max(s) for k, col in self.columns.items() if k.endswith("input_ids") for s in col if s), default=0)


def load_samples(paths: list[str], data_kind: str, max_length: int) -> Samples:
    """Load prepared folders; truncate to max_length and drop rows left without a trained token."""
    from relay.data.shards import load_prepared

    prefixes = [""] if data_kind == "sft" else ["chosen_", "rejected_"]
    names = [f"{p}{c}" for p in prefixes for c in ("input_ids", "labels")]
    data = load_prepared(paths, kind=data_kind).select_columns(names)[:]
    cols: dict[str, list[list[int]]] = {n: [] for n in names}
    dropped = 0
    for i in range(len(data[names[0]])):
        row = {n: list(data[n][i][:max_length]) for n in names}
        if any(all(x == IGNORE_INDEX for x in row[f"{p}labels"][1:]) for p in prefixes):
            dropped += 1  # nothing left to learn from after truncation (the loss would be 0/0)
            continue
        for n in names:
            cols[n].append(row[n])
    return Samples(cols, dropped)


def _pad(seqs: list[list[int]], value: int, length: int) -> np.ndarray:
    out = np.full((len(seqs), length), value, dtype=np.int64)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out


def collate(samples: Samples, idx: list[int], pad_id: int, stage: str) -> dict[str, np.ndarray]:
    """Right-padded numpy batch (numpy travels through the object store faster than torch tensors)."""
    c = samples.columns
    if stage == "sft":
        ids = [c["input_ids"][i] for i in idx]
        n = max(map(len, ids))
        return {
            "input_ids": _pad(ids, pad_id, n),
            "attention_mask": _pad([[1] * len(s) for s in ids], 0, n),
            "labels": _pad([c["labels"][i] for i in idx], IGNORE_INDEX, n),
        }
    # Pairs: chosen and rejected padded to one length so the loss runs both halves in one forward.
    n = max(len(c[f"{side}_input_ids"][i]) for side in ("chosen", "rejected") for i in idx)
    out = {}
    for side in ("chosen", "rejected"):
        ids = [c[f"{side}_input_ids"][i] for i in idx]
        out[f"{side}_input_ids"] = _pad(ids, pad_id, n)
        out[f"{side}_attention_mask"] = _pad([[1] * len(s) for s in ids], 0, n)
        if stage == "dpo":
            out[f"{side}_labels"] = _pad([c[f"{side}_labels"][i] for i in idx], IGNORE_INDEX, n)
    return out


def stacked(batch: dict[str, np.ndarray], keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Pair batch -> one (2P, T) batch, chosen rows first (for forward_logprobs / forward_values)."""
    return {k: np.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]]) for k in keys}


def token_count(batch: dict[str, np.ndarray]) -> int:
    return int(sum(v.sum() for k, v in batch.items() if k.endswith("attention_mask")))


# ---------------------------------------------------------------------------------------- reference / eval
def batches_of(indices: list[int], size: int) -> list[list[int]]:
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def reference_logps(group: Any, samples: Samples, indices: list[int], pad_id: int, chunk: int) -> np.ndarray:
    """Summed reference logprobs of chosen/rejected label tokens for `indices`: array (N, 2), NaN elsewhere.
    Rows are sorted by length so that each forward pads little."""
    import torch

    from relay.learners.dpo import token_logprob_sums

    out = np.full((len(samples), 2), np.nan, dtype=np.float64)
    lengths = {i: max(len(samples.columns["chosen_input_ids"][i]), len(samples.columns["rejected_input_ids"][i])) for i in indices}
    for part in batches_of(sorted(set(indices), key=lengths.__getitem__), chunk):
        batch = stacked(collate(samples, part, pad_id, "dpo"), ("input_ids", "attention_mask", "labels"))
        lp = group.forward_logprobs({k: batch[k] for k in ("input_ids", "attention_mask")})
        sums, _ = token_logprob_sums(lp, torch.as_tensor(batch["labels"]))
        out[part, 0] = sums[: len(part)].double().numpy()
        out[part, 1] = sums[len(part) :].double().numpy()
    return out


def evaluate(group: Any, cfg: TrainConfig, stage: str, samples: Samples, pad_id: int, chunk: int,
             ref: np.ndarray | None) -> dict[str, float]:
    """eval/* metrics over the whole eval split (no gradients, current weights)."""
    import torch

    from relay.algos.losses import dpo_loss, reward_model_loss
    from relay.learners.dpo import dpo_metrics, token_logprob_sums
    from relay.learners.rm import eval_rewards, pair_metrics
    from relay.learners.sft import masked_token_mean_nll

    order = list(range(len(samples)))
    if stage == "sft":
        nll = count = 0.0
        for part in batches_of(order, chunk):
            b = collate(samples, part, pad_id, "sft")
            lp = group.forward_logprobs({k: b[k] for k in ("input_ids", "attention_mask")})
            s, c = masked_token_mean_nll(lp, torch.as_tensor(b["labels"]))
            nll, count = nll + s, count + c
        return {"eval/loss": nll / max(count, 1.0)}
    cols: dict[str, list[Any]] = {"c": [], "r": [], "cl": [], "rl": []}
    for part in batches_of(order, chunk):
        b, n = collate(samples, part, pad_id, stage), len(part)
        if stage == "rm":
            both = stacked(b, ("input_ids", "attention_mask"))
            c, r = eval_rewards(group.forward_values(both), torch.as_tensor(both["attention_mask"]), n)
        else:
            both = stacked(b, ("input_ids", "attention_mask", "labels"))
            lp = group.forward_logprobs({k: both[k] for k in ("input_ids", "attention_mask")})
            sums, lengths = token_logprob_sums(lp, torch.as_tensor(both["labels"]))
            c, r = sums[:n], sums[n:]
            cols["cl"].append(lengths[:n])
            cols["rl"].append(lengths[n:])
        cols["c"].append(c)
        cols["r"].append(r)
    chosen, rejected = torch.cat(cols["c"]).double(), torch.cat(cols["r"]).double()
    if stage == "rm":
        return {"eval/loss": float(reward_model_loss(chosen, rejected, cfg.loss_type)), **pair_metrics(chosen, rejected, "eval/")}
    ref_c = ref_r = None
    if ref is not None:
        ref_c, ref_r = torch.as_tensor(ref[:, 0]), torch.as_tensor(ref[:, 1])
    loss, cr, rr = dpo_loss(
        chosen, rejected, ref_c, ref_r, beta=cfg.beta, loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing,
        gamma=cfg.gamma, chosen_lengths=torch.cat(cols["cl"]).double(), rejected_lengths=torch.cat(cols["rl"]).double(),
    )
    return {"eval/loss": float(loss), **dpo_metrics(cr, rr, chosen, rejected, prefix="eval/")}
