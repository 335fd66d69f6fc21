"""Which ColossalAI plugin setups Relay supports, as pure rules (no ColossalAI, no torch): the config validator
rejects a bad combination before any actor starts, and `relay.learners.plugins.make_plugin` runs the same checks
before it builds the plugin. The table of what runs where is in `relay.learners.plugins`."""
from __future__ import annotations

PLUGINS = ("ddp", "zero2", "zero2_cpu", "gemini", "gemini_auto", "3d")
PRECISIONS = ("fp32", "bf16", "fp16")
DEVICES = ("cpu", "cuda")

GEMINI_CPU = (
    "plugin {p!r} is not available on CPU: Gemini is designed around CUDA memory chunks (its chunk manager "
    "asserts CUDA and its memory monitor calls torch.cuda.synchronize); use 'zero2_cpu' (ZeRO-2 with the "
    "optimizer state on the host) or 'zero2' instead"
)
PP_UNSUPPORTED = (
    "pp={pp}: pipeline parallelism is not supported: ColossalAI 0.5.0's pipeline forwards are written for "
    "transformers 4.51 and Relay runs transformers 5; use pp=1 with tp>1 ('3d') and/or ZeRO ('zero2', 'zero2_cpu') "
    "to fit larger models"
)
SP_UNSUPPORTED = (
    "sp={sp}: sequence parallelism is not supported: ColossalAI 0.5.0's sequence-parallel attention forwards are "
    "written for transformers 4.51 and Relay runs transformers 5; use sp=1 (shorter sequences, gradient "
    "checkpointing, or tp>1 with '3d')"
)


def check_plugin_support(
    plugin: str,
    tp: int = 1,
    pp: int = 1,
    sp: int = 1,
    zero_stage: int = 0,
    precision: str = "fp32",
    lora_rank: int = 0,
    device: str = "cpu",
    num_ranks: int | None = None,
) -> list[str]:
    """Every reason this learner setup cannot run, as messages (empty list: supported).

    `zero_stage` applies to '3d' only (the 'zero2*' plugins are stage 2 by name, 'ddp' has none).
    """
    errors: list[str] = []
    if plugin not in PLUGINS:
        return [f"plugin {plugin!r} is unknown; choose one of {', '.join(PLUGINS)}"]
    if device not in DEVICES:
        errors.append(f"device {device!r} is unknown; choose 'cpu' or 'cuda'")
    if precision not in PRECISIONS:
        errors.append(f"precision {precision!r} is unknown; choose one of {', '.join(PRECISIONS)}")
    for name, value in (("tp", tp), ("pp", pp), ("sp", sp)):
        if not isinstance(value, int) or value < 1:
            errors.append(f"{name}={value!r} must be an integer >= 1")
    if pp != 1:
        errors.append(PP_UNSUPPORTED.format(pp=pp))
    if sp != 1:
        errors.append(SP_UNSUPPORTED.format(sp=sp))
    if zero_stage not in (0, 1, 2):
        errors.append(f"zero_stage={zero_stage!r} must be 0, 1 or 2")
    if lora_rank < 0:
        errors.append(f"lora_rank={lora_rank} must be >= 0 (0 disables LoRA)")

    if plugin.startswith("gemini"):
        if device == "cpu":
            errors.append(GEMINI_CPU.format(p=plugin))
        if precision == "fp32":
            errors.append(f"plugin {plugin!r} trains in fp16/bf16 only (it rejects fp32); set precision: bf16")
        if lora_rank > 0:
            errors.append(f"plugin {plugin!r} does not support LoRA (GeminiPlugin.support_lora is False); use 'zero2'")
    if plugin == "ddp" and precision != "fp32":
        errors.append(
            f"plugin 'ddp' trains in fp32 only (ColossalAI's bf16 mixed precision for DDP is an empty stub); "
            f"use plugin 'zero2' for precision {precision!r}"
        )
    if plugin == "3d" and zero_stage > 0 and precision == "fp32":
        errors.append(
            f"plugin '3d' with zero_stage={zero_stage} needs precision bf16 or fp16 (HybridParallelPlugin asserts "
            "it); use zero_stage=0 for fp32"
        )
    if device == "cpu" and precision == "fp16":
        errors.append("precision 'fp16' is not supported on CPU (its loss scaler is CUDA-oriented); use bf16")
    if isinstance(tp, int) and tp > 1:
        if plugin != "3d":
            errors.append(f"tp={tp} needs plugin '3d' (tensor parallelism is HybridParallelPlugin's); got {plugin!r}")
        if lora_rank > 0:
            errors.append(
                f"LoRA (lora_rank={lora_rank}) with tp={tp} is not supported: ColossalAI's booster.enable_lora "
                "asserts tp_size == 1; use tp=1 with 'zero2'/'ddp' for LoRA, or full fine-tuning with tp>1"
            )
        if num_ranks is not None and num_ranks % tp:
            errors.append(f"num_ranks={num_ranks} must be divisible by tp={tp}")
    if num_ranks is not None and num_ranks < 1:
        errors.append(f"num_ranks={num_ranks} must be >= 1")
    return errors
