"""Experience split/collate keeps every field aligned. No Ray."""
from __future__ import annotations

import pytest
import torch

from relay.buffer.experience import Experience


def _make(B, P, A, version, seed, values=True):
    g = torch.Generator().manual_seed(seed)
    resp = lambda: torch.randn(B, A, generator=g)  # noqa: E731
    return Experience(
        sequences=torch.randint(1, 50, (B, P + A), generator=g),
        attention_mask=torch.ones(B, P + A, dtype=torch.long),
        action_mask=torch.ones(B, A),
        old_logprobs=resp(), ref_logprobs=resp(), values=resp() if values else None,
        rewards=resp(), scores=torch.randn(B, generator=g), advantages=resp(), returns=resp(),
        weight_version=torch.full((B,), version), sample_ids=[f"{seed}-{i}" for i in range(B)],
    )


def test_split_then_collate_round_trip():
    e = _make(3, 4, 5, 2, 0)
    again = Experience.collate(e.split())
    for name, tensor in e.tensor_fields().items():
        assert torch.equal(tensor, getattr(again, name)), name
    assert again.sample_ids == e.sample_ids


def test_collate_pads_prompts_left_and_responses_right():
    a, b = _make(1, 2, 3, 1, 1), _make(2, 4, 1, 2, 2)
    c = Experience.collate([a, b], pad_token_id=0)
    assert c.sequences.shape == (3, 4 + 3) and c.action_mask.shape == (3, 3)
    assert torch.equal(c.sequences[0, 2:4], a.sequences[0, :2])  # prompt moved right (left padding)
    assert torch.equal(c.sequences[0, 4:], a.sequences[0, 2:])
    assert c.attention_mask[0, :2].sum() == 0 and c.action_mask[1:, 1:].sum() == 0
    assert c.weight_version.tolist() == [1, 2, 2]


def test_collate_rejects_mixed_optional_fields():
    with pytest.raises(ValueError, match="values"):
        Experience.collate([_make(1, 2, 2, 0, 3), _make(1, 2, 2, 0, 4, values=False)])
    assert Experience.collate([_make(1, 2, 2, 0, 3, values=False)]).values is None
