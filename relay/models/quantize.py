"""Int4 weight-only checkpoints made locally: round-to-nearest (RTN) quantization written in AutoAWQ's "gemm"
format, which vLLM loads on CPU (its WNA16 kernel) and on GPU (AWQ / Marlin kernels).

Why RTN: AWQ and GPTQ proper need calibration data and their own packages, and the hub's pre-quantized
checkpoints cannot be downloaded here. RTN with a zero point per group of `group_size` input channels is what
those methods start from; on small models it loses more quality than AWQ's activation-aware scaling, so compare
answers before relying on it (README, "Inference").

Format (per quantized Linear of weight W [out, in]): `qweight` int32 [in, out/8] and `qzeros` int32
[in/group, out/8], eight 4-bit values per int32 in AutoAWQ's order (0, 2, 4, 6, 1, 3, 5, 7); `scales` fp16
[in/group, out]. W ~ (q - zero) * scale. Embeddings, norms and the LM head stay in the model's dtype.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
QUANTIZED_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".index.json")


def rtn_quantize(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W [out, in] -> (q [out, in] int in 0..15, zeros [out, in/group], scales [out, in/group] fp16-rounded)."""
    out_f, in_f = weight.shape
    if in_f % group_size:
        raise ValueError(f"input size {in_f} is not a multiple of group_size {group_size}")
    w = weight.float().reshape(out_f, in_f // group_size, group_size)
    lo, hi = w.amin(-1), w.amax(-1)
    scales = ((hi - lo).clamp(min=1e-5) / 15).half().float()  # stored as fp16: quantize against what loads
    zeros = (-torch.round(lo / scales)).clamp(0, 15)
    q = (torch.round(w / scales[..., None]) + zeros[..., None]).clamp(0, 15)
    return q.reshape(out_f, in_f).to(torch.int32), zeros.to(torch.int32), scales


def dequantize(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """Inverse of `rtn_quantize` (what the int4 kernels compute with)."""
    z = zeros.repeat_interleave(group_size, dim=1).float()
    s = scales.repeat_interleave(group_size, dim=1).float()
    return (q.float() - z) * s


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """[rows, cols] ints in 0..15 -> [rows, cols/8] int32, AutoAWQ's order within each group of eight."""
    rows, cols = values.shape
    if cols % 8:
        raise ValueError(f"{cols} columns cannot be packed eight to an int32")
    v = values.to(torch.int64).reshape(rows, cols // 8, 8)
    packed = torch.zeros(rows, cols // 8, dtype=torch.int64)
    for slot, col in enumerate(PACK_ORDER):
        packed |= v[..., col] << (4 * slot)
    # int32 two's complement of the 32-bit pattern
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`."""
    p = packed.to(torch.int64) & 0xFFFFFFFF
    rows, groups = p.shape
    out = torch.zeros(rows, groups, 8, dtype=torch.int32)
    for slot, col in enumerate(PACK_ORDER):
        out[..., col] = ((p >> (4 * slot)) & 0xF).to(torch.int32)
    return out.reshape(rows, groups * 8)


def quantize_awq_rtn(src: str | Path, dst: str | Path, group_size: int = 64) -> Path:
    """Write an int4 (AWQ gemm format, RTN) copy of the HF model folder `src` to `dst`; returns `dst`."""
    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{src}: no *.safetensors weights to quantize")
    config = json.loads((src / "config.json").read_text())
    if "quantization_config" in config:
        raise ValueError(f"{src} is already quantized ({config['quantization_config'].get('quant_method')})")
    dtype = getattr(torch, config.get("torch_dtype") or config.get("dtype") or "bfloat16")
    if dtype == torch.float32:
        dtype = torch.bfloat16  # vLLM's int4 kernels take 16-bit activations
    dst.mkdir(parents=True, exist_ok=True)
    out: dict[str, torch.Tensor] = {}
    for f in files:
        for name, t in load_file(str(f)).items():
            module = name.rsplit(".", 1)[0]
            if name.endswith(".weight") and module.endswith(QUANTIZED_SUFFIXES):
                q, zeros, scales = rtn_quantize(t, group_size)
                out[f"{module}.qweight"] = pack_int4(q.t().contiguous())
                out[f"{module}.qzeros"] = pack_int4(zeros.t().contiguous())
                out[f"{module}.scales"] = scales.t().contiguous().half()
            else:
                out[name] = t.to(dtype) if t.is_floating_point() else t
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config["torch_dtype"] = config["dtype"] = str(dtype).replace("torch.", "")
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group_size,
                                     "zero_point": True, "version": "gemm", "modules_to_not_convert": None}
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for f in src.iterdir():
        if f.is_file() and f.name != "config.json" and not f.name.endswith(_WEIGHT_FILES):
            shutil.copy2(f, dst / f.name)
    return dst
