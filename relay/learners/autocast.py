"""bf16 autocast for a learner's forward: fp32 weights, optimizer and loss math, bf16 matmuls.

Unlike `mixed_precision: bf16` (the ColossalAI plugin keeps bf16 weights), autocast leaves the model and the
optimizer in fp32 and runs only the matmul-heavy ops in bf16: on CPUs with AVX512_BF16 or AMX those run about
twice as fast (`benchmarks.matmul_rate`), on AVX2-only CPUs bf16 is emulated and slower, so "auto" turns it on
only where the hardware computes bf16 natively (`relay.cpu.bf16_is_fast`) or on a GPU. Logprobs stay fp32
(`relay.learners.logprobs` accumulates each chunk in fp32), but the logits themselves come from bf16 matmuls, so
numbers differ from an fp32 forward at the ~1e-2 level: an opt-in setting, off by default (exact
reproducibility and generator-logprob reuse need fp32).
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Literal

AutocastSetting = Literal["off", "bf16", "auto"]
AUTOCAST_SETTINGS: tuple[str, ...] = ("off", "bf16", "auto")


def resolve_autocast(setting: str | None, on_gpu: bool = False) -> str | None:
    """"bf16" when the update should run under bf16 autocast, else None. "auto": bf16 on a GPU or a CPU with
    native bf16, off elsewhere (AVX2-only CPUs)."""
    if setting in (None, "off"):
        return None
    if setting == "bf16":
        if not on_gpu:
            from relay.cpu import bf16_slow_reason

            if reason := bf16_slow_reason():  # asked for explicitly: honoured, but said once per process
                warnings.warn(f"algo.update_autocast=bf16: {reason}; 'auto' would keep the update in fp32 here",
                              RuntimeWarning, stacklevel=2)
        return "bf16"
    if setting == "auto":
        from relay.cpu import bf16_is_fast

        return "bf16" if on_gpu or bf16_is_fast() else None
    raise ValueError(f"autocast={setting!r}: expected one of {', '.join(AUTOCAST_SETTINGS)}")


def autocast_forward(model: Any, setting: str | None) -> contextlib.AbstractContextManager:
    """A context for the forward: torch.autocast(bf16) on the model's device type when `setting` resolves to
    bf16 on this process's hardware (`resolve_autocast`), else nothing. The backward runs outside it (autograd
    replays the recorded dtypes)."""
    if setting in (None, "off"):
        return contextlib.nullcontext()
    import torch

    device = next(model.parameters()).device.type
    if resolve_autocast(setting, on_gpu=device == "cuda") is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device, dtype=torch.bfloat16)
