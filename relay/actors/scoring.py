"""Where a scorer's model (the reference policy, a reward model) runs and in what precision: the device torch
sees in the scorer's process (`relay.cluster.devices.torch_device`: CUDA where Ray gave the actor a GPU), the
configured dtype resolved for that device, and row slices for micro-batched scoring.

One code path for CPU and GPU: the device is picked once, the model and each micro-batch are moved to it
(a no-op on CPU) and results come back as fp32 CPU tensors, so the CPU tests run every line a GPU run does
except the pick itself.

dtype settings (`reference.dtype`, `reward.dtype`):

- auto: bfloat16 on CUDA (float16 on a GPU without bf16), float32 on CPU (bf16 pays on CPU only for memory).
- float32: everywhere.
- bfloat16: on CUDA with bf16, and on CPUs that compute it natively (AVX512_BF16 or AMX, `relay.cpu`). Elsewhere
  a startup error naming the field rather than a fallback: torch would emulate it (slower than float32), and
  silently loading float32 instead would double the memory the layout was planned for.
- float16: GPU only (an error naming the field on CPU, where torch's fp16 matmuls are emulated and slow).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SCORER_DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16")


def resolve_scorer_dtype(setting: str, device: str, bf16_native: bool, field: str = "dtype",
                         hardware: str = "") -> str:
    """The torch dtype name ("float32", "bfloat16", "float16") a scorer on `device` ("cuda"/"cpu") loads its
    model in, for the configured `setting`. `bf16_native`: whether that device computes bf16 natively;
    `hardware` names it in errors. ValueError naming `field` when the setting cannot run there."""
    where = f" ({hardware})" if hardware else ""
    if setting not in SCORER_DTYPES:
        raise ValueError(f"{field}={setting!r}: expected one of {', '.join(SCORER_DTYPES)}")
    if setting == "auto":
        if device == "cuda":
            return "bfloat16" if bf16_native else "float16"
        return "float32"
    if setting == "float16" and device != "cuda":
        raise ValueError(f"{field}=float16 runs only on a GPU, and this scorer runs on {device}{where}: use auto, "
                         f"float32 or bfloat16 (or give it a GPU: num_gpus > 0)")
    if setting == "bfloat16" and not bf16_native:
        hint = "float16 or float32" if device == "cuda" else "auto or float32"
        raise ValueError(f"{field}=bfloat16: this {device}{where} has no native bf16 (it would be emulated, slower "
                         f"than float32); use {hint}")
    return setting


@dataclass(frozen=True)
class ScorerPrecision:
    """The device and dtype a scorer process runs its model in."""

    device: str
    dtype: str

    @property
    def torch_dtype(self) -> Any:
        import torch

        return getattr(torch, self.dtype)


def _bf16_native(device: str) -> tuple[bool, str]:
    """(native bf16, hardware name) of this process's `device`."""
    if device == "cuda":
        import torch

        try:
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # older torch: no emulation flag
            native = torch.cuda.is_bf16_supported()
        return bool(native), torch.cuda.get_device_name()
    from relay.cpu import bf16_is_fast, cpu_capabilities

    return bf16_is_fast(), cpu_capabilities().label


def scorer_precision(setting: str, field: str) -> ScorerPrecision:
    """Device and dtype for a scorer in this process: `torch_device()` and `setting` resolved for it."""
    from relay.cluster.devices import torch_device

    device = torch_device()
    native, hardware = _bf16_native(device)
    return ScorerPrecision(device, resolve_scorer_dtype(setting, device, native, field, hardware))


def row_slices(rows: int, micro_batch_size: int) -> list[slice]:
    """Consecutive slices of at most `micro_batch_size` rows covering `rows` (none for 0 rows)."""
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    return [slice(start, min(start + micro_batch_size, rows)) for start in range(0, rows, micro_batch_size)]
