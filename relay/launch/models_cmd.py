"""`relay models prepare smollm2|tiny-llama|tiny-qwen2`: build bundled models into the local cache.
`relay models quantize SRC --out DST`: an int4 (AWQ format, round-to-nearest) copy that vLLM loads on CPU."""
from __future__ import annotations

import argparse
import sys


def int4_serving_note() -> str | None:
    """One line when vLLM cannot serve (or only slowly serves) an int4 folder on this machine, else None."""
    from relay.cpu import bf16_slow_reason, vllm_int4_support

    ok, why = vllm_int4_support()
    if not ok:
        return f"this machine cannot serve the folder with vLLM ({why}); it loads on GPUs and AVX-512 CPUs"
    if why.startswith("GPU"):
        return None
    slow = bf16_slow_reason()
    return f"vLLM serves int4 with bf16 activations here, and {slow}" if slow else None


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="relay models", description="Prepare bundled models (no hub needed).")
    sub = parser.add_subparsers(dest="action", required=True)
    prep = sub.add_parser("prepare", help="convert/build a bundled model and print its folder")
    prep.add_argument("name", choices=["smollm2", "tiny-llama", "tiny-qwen2"])
    prep.add_argument("--cache-dir", default=None, help="where to put it (default ~/.cache/relay or $RELAY_CACHE)")
    prep.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="SmolLM2 weight dtype")
    prep.add_argument("--force", action="store_true", help="rebuild even if cached")
    quant = sub.add_parser("quantize", help="int4 weight-only copy of a model folder (AWQ gemm format, RTN)")
    quant.add_argument("src", help="HF model folder (safetensors), e.g. a Relay output or `prepare` folder")
    quant.add_argument("--out", required=True, help="folder to write")
    quant.add_argument("--group-size", type=int, default=64, help="input channels per scale/zero point")
    args = parser.parse_args(argv)
    if args.action == "quantize":
        from relay.models.quantize import quantize_awq_rtn
        from relay.models.smollm2 import resolve_model_path

        print(quantize_awq_rtn(resolve_model_path(args.src, "SRC"), args.out, args.group_size))
        note = int4_serving_note()
        if note:
            print(f"relay models quantize: note: {note}", file=sys.stderr)
        return 0
    if args.name == "smollm2":
        from relay.models.smollm2 import prepare_smollm2

        path = prepare_smollm2(args.cache_dir, dtype=args.dtype, force=args.force)
    else:
        from relay.models.tiny import TinyModelSpec, build_tiny_model

        path = build_tiny_model(TinyModelSpec(family=args.name.split("-", 1)[1]), args.cache_dir)
    print(path)
    return 0
