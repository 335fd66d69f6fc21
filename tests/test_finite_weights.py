"""`all_finite`, the guard before every weight push and checkpoint, against torch's own `isfinite` on every
element (the reference), for NaN and infinities anywhere in large and small tensors of each float dtype. No Ray."""
from __future__ import annotations

import pytest
import torch

from relay.learners.worker_state import all_finite


def reference(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_all_finite_matches_isfinite(dtype):
    g = torch.Generator().manual_seed(0)
    for trial in range(60):
        tensors = [torch.randn(n, generator=g).to(dtype) for n in (1, 7, 4096, 100_003)]
        if trial % 4:  # three trials in four plant one bad value somewhere, in any tensor
            bad = [float("nan"), float("inf"), float("-inf")][trial % 3]
            t = tensors[int(torch.randint(len(tensors), (1,), generator=g))]
            t.view(-1)[int(torch.randint(t.numel(), (1,), generator=g))] = bad
        assert all_finite(tensors) == reference(tensors), (trial, dtype)


def test_all_finite_edge_cases():
    assert all_finite([]) and all_finite([torch.zeros(0, 3)])  # nothing to check
    assert all_finite([torch.arange(5), torch.tensor([True])])  # integers and bools are always finite
    huge = torch.tensor([3e38, -3e38, 3e38])  # a sum would overflow; min and max do not
    assert all_finite([huge]) and reference([huge])
    assert not all_finite([torch.randn(3, 4), torch.tensor([[1.0, float("nan")]]).t()])  # non-contiguous
    param = torch.nn.Parameter(torch.tensor([1.0, float("inf")]))
    assert not all_finite([param])  # parameters that require grad
