"""Tensor-parallel shard policies for Llama and Qwen2 under transformers 5 (HybridParallelPlugin `custom_policy`).

ColossalAI 0.5.0's stock policies also replace the model forwards with versions written for transformers 4.51
(`StaticCache` import, `_update_causal_mask`, `layer_outputs[0]`, which in 5.x would silently take batch element
0). These policies keep only the module substitutions and leave every forward to transformers:

- attention q/k/v -> Linear1D_Col, o -> Linear1D_Row; MLP gate/up -> Linear1D_Col, down -> Linear1D_Row;
- input embedding -> VocabParallelEmbedding1D; LM head -> VocabParallelLMHead1D with `gather_output=True`
  (full-vocabulary logits on every rank, i.e. `parallel_output=False`), so any loss works unchanged;
- critic / reward model (`relay.models.heads.CriticModel`): the same backbone substitutions; the value head
  Linear(hidden, 1) stays replicated (its input is already complete on every rank after the row-parallel
  all-reduce, so its gradient is identical on all tp ranks).

Per-rank heads: transformers 5 attention reshapes projections with `view(*shape, -1, head_dim)` and keeps
only `head_dim` and `num_key_value_groups` (a ratio tp leaves unchanged) on the module, so a column-sharded
q/k/v automatically yields `heads / tp` local heads. Older layouts that store `num_heads` /
`num_key_value_heads` / `hidden_size` on the attention module get those attributes divided by tp here.

Pipeline and sequence parallelism need the replaced forwards and are rejected (`config_sanity_check`).
"""
from __future__ import annotations

from typing import Any

from colossalai.shardformer.layer import (
    Linear1D_Col,
    Linear1D_Row,
    VocabParallelEmbedding1D,
    VocabParallelLMHead1D,
)
from colossalai.shardformer.policies.base_policy import (
    ModulePolicyDescription,
    Policy,
    SubModuleReplacementDescription,
)
from torch import nn

SUPPORTED_FAMILIES = ("llama", "qwen2")
_COL = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
_ROW = ("self_attn.o_proj", "mlp.down_proj")
# Attributes some attention implementations keep (transformers 4.x); transformers 5 has none of them.
_LEGACY_HEAD_ATTRS = ("num_heads", "num_key_value_heads", "hidden_size")


class DecoderTPPolicy(Policy):
    """Module-substitution-only tensor parallelism for Llama-layout decoders (base for the two policies below)."""

    kind = "causal_lm"

    def config_sanity_check(self) -> None:
        sc = self.shard_config
        if sc.pipeline_stage_manager is not None:
            raise ValueError("Relay's tp policies do not support pipeline parallelism (pp=1 only)")
        if sc.enable_sequence_parallelism:
            raise ValueError("Relay's tp policies do not support sequence parallelism (sp=1 only)")
        if sc.enable_flash_attention or sc.enable_fused_normalization or sc.enable_jit_fused:
            raise ValueError("Relay's tp policies replace no kernels: leave the plugin's optimizations off")

    def preprocess(self) -> nn.Module:
        family = getattr(self.model.config, "model_type", None)
        if family not in SUPPORTED_FAMILIES:
            raise ValueError(f"tensor parallelism: model_type {family!r} is not supported ({SUPPORTED_FAMILIES})")
        return self.model

    def postprocess(self) -> nn.Module:
        return self.model

    def module_policy(self) -> dict[Any, ModulePolicyDescription]:
        if not self.shard_config.enable_tensor_parallelism:
            return {}  # tp=1: plain data parallelism, nothing to substitute
        tp = self.shard_config.tensor_parallel_size
        config = self.model.config
        heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None)
        kv_heads = kv_heads or heads
        if heads % tp or kv_heads % tp:
            raise ValueError(
                f"tp={tp} must divide num_attention_heads ({heads}) and num_key_value_heads ({kv_heads})"
            )
        layer_cls, attn = self._decoder_layer()
        fp8 = self.shard_config.fp8_communication
        subs = [SubModuleReplacementDescription(s, Linear1D_Col, kwargs={"fp8_communication": fp8}) for s in _COL]
        subs += [SubModuleReplacementDescription(s, Linear1D_Row, kwargs={"fp8_communication": fp8}) for s in _ROW]
        legacy = {
            f"self_attn.{name}": getattr(attn, name) // tp for name in _LEGACY_HEAD_ATTRS if hasattr(attn, name)
        }
        policy: dict[Any, ModulePolicyDescription] = {
            layer_cls: ModulePolicyDescription(attribute_replacement=legacy or None, sub_module_replacement=subs)
        }
        root_subs = [
            SubModuleReplacementDescription(
                self._path_of(self.model.get_input_embeddings()),
                VocabParallelEmbedding1D,
                kwargs={
                    "make_vocab_size_divisible_by": self.shard_config.make_vocab_size_divisible_by,
                    "fp8_communication": fp8,
                },
            )
        ]
        root_subs += self._head_substitutions()
        policy[type(self.model)] = ModulePolicyDescription(sub_module_replacement=root_subs)
        return policy

    def _head_substitutions(self) -> list[SubModuleReplacementDescription]:
        return []

    def _decoder_layer(self) -> tuple[type, nn.Module]:
        """The decoder-layer class (keyed by class: every layer gets the same substitutions) and one attention."""
        for module in self.model.modules():
            if type(module).__name__.endswith("DecoderLayer") and hasattr(module, "self_attn"):
                return type(module), module.self_attn
        raise ValueError(f"{type(self.model).__name__}: no decoder layer with `self_attn` found")

    def _path_of(self, target: nn.Module) -> str:
        for name, module in self.model.named_modules():
            if module is target:
                return name
        raise ValueError(f"{type(target).__name__} is not a submodule of {type(self.model).__name__}")


class CausalLMTPPolicy(DecoderTPPolicy):
    """LlamaForCausalLM / Qwen2ForCausalLM: backbone + vocab-parallel LM head gathering full logits."""

    kind = "causal_lm"

    def _head_substitutions(self) -> list[SubModuleReplacementDescription]:
        head = self.model.get_output_embeddings()
        if head is None:
            raise ValueError(f"{type(self.model).__name__} has no LM head")
        return [
            SubModuleReplacementDescription(
                self._path_of(head),
                VocabParallelLMHead1D,
                kwargs={
                    # gather_output=True is parallel_output=False: callers get (B, T, vocab) logits.
                    "gather_output": True,
                    "make_vocab_size_divisible_by": self.shard_config.make_vocab_size_divisible_by,
                    "fp8_communication": self.shard_config.fp8_communication,
                },
            )
        ]


class CriticTPPolicy(DecoderTPPolicy):
    """CriticModel (backbone + value head): backbone substitutions only; the value head stays replicated."""

    kind = "critic"


def policy_for(kind: str) -> DecoderTPPolicy:
    """A fresh policy for a learner kind ('causal_lm' or 'critic'); the family is checked when sharding."""
    if kind == "causal_lm":
        return CausalLMTPPolicy()
    if kind == "critic":
        return CriticTPPolicy()
    raise ValueError(f"unknown model kind {kind!r} (use 'causal_lm' or 'critic')")
