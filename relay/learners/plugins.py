"""ColossalAI plugin factory with the CPU-safe options.

| plugin        | what it is                                        | CPU (gloo) here  | GPU                       |
|---------------|---------------------------------------------------|------------------|---------------------------|
| ddp           | TorchDDPPlugin, fp32                              | yes              | expected yes              |
| zero2         | LowLevelZeroPlugin stage 2                        | yes (fp32/bf16)  | expected yes (+fp16)      |
| zero2_cpu     | LowLevelZeroPlugin stage 2, optimizer on the host | yes (fp32/bf16)  | expected yes (+fp16)      |
| 3d            | HybridParallelPlugin: tp (+ZeRO 1/2), pp=sp=1     | yes              | expected yes, pp=sp=1     |
| gemini(_auto) | GeminiPlugin, static / auto placement             | no (CUDA chunks) | passed through, untested  |

Tests: tests/test_learner_group.py (real Ray + ColossalAI) and tests/test_colossal_support.py (these rules).

`check_plugin_support` (in `relay.config.plugin_rules`: pure, no ColossalAI import) lets `relay.config` reject a
bad combination before any actor starts; `make_plugin` runs the same checks and builds the plugin (call it inside
a learner process, after torch.distributed is initialised and `colossal_compat.apply()` ran).
"""
from __future__ import annotations

from typing import Any

from relay.config.plugin_rules import check_plugin_support


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


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
