"""ColossalAI plugin factory with the CPU-safe options, and the support rules the config validator shares.

| plugin        | what it is                                        | CPU (gloo) here  | GPU                       |
|---------------|---------------------------------------------------|------------------|---------------------------|
| ddp           | TorchDDPPlugin, fp32                              | yes              | expected yes              |
| zero2         | LowLevelZeroPlugin stage 2                        | yes (fp32/bf16)  | expected yes (+fp16)      |
| zero2_cpu     | LowLevelZeroPlugin stage 2, optimizer on the host | yes (fp32/bf16)  | expected yes (+fp16)      |
| 3d            | HybridParallelPlugin: tp (+ZeRO 1/2), pp=sp=1     | yes              | expected yes, pp=sp=1     |
| gemini(_auto) | GeminiPlugin, static / auto placement             | no (CUDA chunks) | passed through, untested  |

Tests: tests/test_learner_group.py (real Ray + ColossalAI) and tests/test_colossal_support.py (these rules).

`check_plugin_support` is pure (no ColossalAI import) so `relay.config` can reject a bad combination before any
actor starts; `make_plugin` runs the same checks and builds the plugin (call it inside a learner process, after
torch.distributed is initialised and `colossal_compat.apply()` ran).
"""
from __future__ import annotations

from typing import Any

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


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


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


def make_plugin(
    plugin: str,
    tp: int = 1,
    pp: int = 1,
    sp: int = 1,
    zero_stage: int = 0,
    precision: str = "fp32",
    max_norm: float = 0.0,
    *,
    kind: str = "causal_lm",
    lora_rank: int = 0,
    num_ranks: int | None = None,
    device: str | None = None,
    policy: Any = None,
    **extra: Any,
) -> Any:
    """Build the ColossalAI plugin; raises ValueError with every reason when the combination is unsupported.

    `kind` ('causal_lm' | 'critic') picks Relay's transformers-5 shard policy for '3d' (override with `policy`).
    `extra` goes to the plugin constructor as is (e.g. `initial_scale`).
    """
    device = device or default_device()
    errors = check_plugin_support(plugin, tp, pp, sp, zero_stage, precision, lora_rank, device, num_ranks)
    if errors:
        raise ValueError("unsupported learner setup:\n- " + "\n- ".join(errors))

    from relay.learners import colossal_compat

    colossal_compat.apply()
    on_cpu = device == "cpu"
    if plugin == "ddp":
        from colossalai.booster.plugin import TorchDDPPlugin

        return TorchDDPPlugin(**extra)
    if plugin in ("zero2", "zero2_cpu"):
        from colossalai.booster.plugin import LowLevelZeroPlugin

        return LowLevelZeroPlugin(
            stage=2,
            precision=precision,
            max_norm=max_norm,
            cpu_offload=plugin == "zero2_cpu",
            # Overlap needs CUDA streams and Tensor.record_stream, which CPU tensors lack.
            overlap_communication=not on_cpu,
            **extra,
        )
    if plugin == "3d":
        from colossalai.booster.plugin import HybridParallelPlugin

        from relay.learners.policies import policy_for

        return HybridParallelPlugin(
            tp_size=tp,
            pp_size=1,
            precision=precision,
            zero_stage=zero_stage,
            max_norm=max_norm,
            parallel_output=False,  # full-vocabulary logits: losses and logprobs need no tp-aware code
            custom_policy=policy if policy is not None else policy_for(kind),
            enable_all_optimization=False,
            overlap_communication=not on_cpu,
            broadcast_buffers=False,
            **extra,
        )
    # gemini / gemini_auto on CUDA: ColossalAI's own plugin, unchanged (not exercised on this machine).
    from colossalai.booster.plugin import GeminiPlugin

    return GeminiPlugin(
        placement_policy="auto" if plugin == "gemini_auto" else "static",
        precision=precision,
        max_norm=max_norm,
        **extra,
    )


def plugin_clips_gradients(plugin: str) -> bool:
    """Whether the plugin applies `max_norm` itself; TorchDDPPlugin does not (the learner clips instead)."""
    return plugin != "ddp"


def plugin_needs_hybrid_adam(plugin: str) -> bool:
    """Gemini rejects plain torch optimizers and needs ColossalAI's HybridAdam (CUDA only)."""
    return plugin.startswith("gemini")
