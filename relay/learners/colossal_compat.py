"""Make ColossalAI 0.5.0 usable on CPU (gloo) under torch 2.13 / transformers 5.

ColossalAI picks `CpuAccelerator` when no GPU is present, but about 30 of its methods raise "not supported
for cpu accelerator" and its ZeRO optimizer asserts a CUDA/NPU device. `apply()` replaces those methods with
trivial CPU versions (no streams, no events, no device memory: CPU work is synchronous) and relaxes the ZeRO
device assert while keeping its dtype check. Measured result (see /work/shared/ENVIRONMENT.md): ddp, zero2,
zero2_cpu and tensor-parallel-only 3d then train on CPU with losses equal to an unwrapped model.

On a CUDA machine `apply()` changes nothing: GPU behaviour stays ColossalAI's own.

Not patched: `pipeline/p2p.py` calls `torch.distributed.is_hccl_available` / `Backend.HCCL`, which CPU torch
lacks, but only at run time inside pipeline-parallel send/recv, never at import; Relay rejects pp>1 (see
`relay.learners.plugins`), so that path is unreachable and left alone.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any

import torch

_LOCK = threading.Lock()
_APPLIED = False


class CpuStream:
    """Stand-in for a CUDA stream: CPU kernels run in program order, so every wait/sync is already done."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> "CpuEvent":
        return event if event is not None else CpuEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class CpuEvent:
    """Stand-in for a CUDA event (see CpuStream)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end_event: Any) -> float:
        return 0.0


_DEFAULT_STREAM = CpuStream()


def _noop(self: Any, *args: Any, **kwargs: Any) -> None:
    return None


def _zero(self: Any, *args: Any, **kwargs: Any) -> int:
    return 0


def _manual_seed(self: Any, seed: int) -> None:
    torch.manual_seed(seed)


def _seed(self: Any) -> None:
    torch.seed()


# Replacements for CpuAccelerator methods that raise in 0.5.0. Values: the new function.
_CPU_METHODS: dict[str, Any] = {
    # There is one "device" (the host); ColossalAI creates tensors with device=current_device(), so it must be
    # a CPU device, not an index (an int would mean cuda:N).
    "current_device": lambda self: torch.device("cpu"),
    "set_device": _noop,  # launch() skips it (support_set_device=False); other callers bind nothing on CPU
    "get_device_name": lambda self, device=None: "cpu",
    "get_device_capability": lambda self, device=None: (0, 0),
    "get_device_properties": lambda self, device=None: None,
    "utilization": _zero,
    "device_count": lambda self: 1,
    # Called around checkpoint I/O and timers; CPU ops are synchronous, so nothing to wait for.
    "synchronize": _noop,
    # The original passes a device to torch.get_rng_state(), which takes none (TypeError).
    "get_rng_state": lambda self, device=None: torch.get_rng_state(),
    "get_rng_state_all": lambda self: [torch.get_rng_state()],
    "set_rng_state_all": lambda self, new_states: torch.set_rng_state(new_states[0]),
    # Seeding "the device" on CPU is seeding torch's CPU generator.
    "manual_seed": _manual_seed,
    "manual_seed_all": _manual_seed,
    "seed": _seed,
    "seed_all": _seed,
    "initial_seed": lambda self: torch.initial_seed(),
    # No caching allocator on CPU: nothing to free, no device-memory statistics to report.
    "empty_cache": _noop,
    "memory_stats": lambda self, device=None: {},
    "memory_summary": lambda self, device=None, abbreviated=False: "",
    "memory_snapshot": lambda self: [],
    "memory_allocated": _zero,
    "max_memory_allocated": _zero,
    "reset_max_memory_allocated": _noop,
    "reset_max_memory_cached": _noop,
    "memory_reserved": _zero,
    "max_memory_reserved": _zero,
    "set_per_process_memory_fraction": _noop,
    "reset_peak_memory_stats": _noop,
    # ZeRO's bucket store creates a communication stream at construction and waits on the current stream;
    # with overlap_communication=False (set by relay.learners.plugins) these objects only need to exist.
    "Stream": lambda self, device=None, priority=0, **kwargs: CpuStream(),
    "Event": lambda self, enable_timing=False, blocking=False, interprocess=False: CpuEvent(),
    "current_stream": lambda self, device=None: _DEFAULT_STREAM,
    "default_stream": lambda self, device=None: _DEFAULT_STREAM,
    "set_stream": _noop,
    "stream": lambda self, stream_: contextlib.nullcontext(),
}


def _patch_cpu_accelerator() -> None:
    from colossalai.accelerator.cpu_accelerator import CpuAccelerator

    for name, fn in _CPU_METHODS.items():
        setattr(CpuAccelerator, name, fn)


def _patch_zero_sanity_check() -> None:
    """Keep LowLevelZeroOptimizer's dtype check, drop its `device in [cuda, npu]` assert (ZeRO's sharding and
    gloo collectives work on CPU tensors; only the assert stood in the way)."""
    from colossalai.zero.low_level.low_level_optim import LowLevelZeroOptimizer

    def _sanity_checks(self: Any) -> None:
        for param_group in self.optim.param_groups:
            for param in param_group["params"]:
                if not getattr(param, "skip_zero_check", False):
                    assert (
                        param.dtype == self._dtype
                    ), f"Parameters are expected to have the same dtype `{self._dtype}`, but got `{param.dtype}`"

    LowLevelZeroOptimizer._sanity_checks = _sanity_checks


def on_cpu() -> bool:
    """True when ColossalAI will run on its CpuAccelerator (no usable CUDA device)."""
    from colossalai.accelerator import get_accelerator

    return get_accelerator().name == "cpu"


def apply() -> bool:
    """Patch ColossalAI for CPU once per process (idempotent, thread-safe). Returns True if patches are active.

    Call it before creating a plugin or Booster. On CUDA machines it patches nothing and returns False.
    """
    global _APPLIED
    with _LOCK:
        if _APPLIED:
            return True
        if not on_cpu():
            return False
        _patch_cpu_accelerator()
        _patch_zero_sanity_check()
        _APPLIED = True
        return True


def is_applied() -> bool:
    return _APPLIED
