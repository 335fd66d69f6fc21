"""ColossalAI CPU compatibility patches (single process, no process group)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

colossalai = pytest.importorskip("colossalai")

from relay.learners import colossal_compat  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the patches apply on CPU only")


def test_apply_is_idempotent_and_cpu_methods_work():
    from colossalai.accelerator import get_accelerator

    assert colossal_compat.apply() is True
    assert colossal_compat.apply() is True  # second call: no-op
    acc = get_accelerator()
    assert acc.name == "cpu"
    acc.synchronize()
    acc.empty_cache()
    acc.manual_seed(3)
    a = torch.rand(2)
    acc.manual_seed(3)
    assert torch.equal(a, torch.rand(2))
    state = acc.get_rng_state()  # the original passed a device to torch.get_rng_state (TypeError)
    acc.set_rng_state(state)
    assert acc.device_count() == 1
    assert torch.empty(1, device=acc.current_device()).device.type == "cpu"
    assert acc.memory_allocated() == 0 and acc.max_memory_allocated() == 0 and acc.memory_stats() == {}
    stream = acc.Stream()
    stream.wait_stream(acc.current_stream())
    with acc.stream(stream):
        pass
    event = acc.Event()
    event.record()
    event.synchronize()


def test_zero_sanity_check_keeps_dtype_check():
    from colossalai.zero.low_level.low_level_optim import LowLevelZeroOptimizer

    colossal_compat.apply()
    p32 = torch.nn.Parameter(torch.zeros(2))
    ok = SimpleNamespace(optim=SimpleNamespace(param_groups=[{"params": [p32]}]), _dtype=torch.float32)
    LowLevelZeroOptimizer._sanity_checks(ok)  # no "device is required" assert on CPU any more
    bad = SimpleNamespace(optim=SimpleNamespace(param_groups=[{"params": [p32]}]), _dtype=torch.bfloat16)
    with pytest.raises(AssertionError, match="same dtype"):
        LowLevelZeroOptimizer._sanity_checks(bad)
