"""Typed configs, one per pipeline (sft, rm, dpo, ppo): every field documented and ranged, YAML presets,
`--set a.b=v` overrides, and validation that names the field (and file) before any actor starts.

Modules: `fields` (doc, Range, ConfigError), `groups` / `train` / `ppo` (the dataclasses), `schema` (pydantic
field checks), `rules` (cross-field rules, `validate`), `plugin_rules`
(which learner plugin setups run where), `loading` (YAML, overrides), `reference` (field docs).
Imports nothing of Relay's outside this package and nothing heavy (pydantic, yaml).
"""
from relay.config.fields import PLUGINS, PRECISIONS, ConfigError, Range, doc
from relay.config.groups import ClusterConfig, LearnerConfig, LoggingConfig, LoraConfig, ModelConfig, OptimConfig
from relay.config.loading import PIPELINES, apply_overrides, build, load_config, save_config, to_dict
from relay.config.ppo import (
    PLAIN_FORWARD_PLUGINS, GenerationConfig, PPOAlgoConfig, PPOConfig, PPOEvalConfig, RewardConfig,
    actor_shares_prompts, forward_micro_batch, learner_temperature, needs_reference, old_logprobs_source,
    ppo_buffer_size,
)
from relay.config.reference import field_reference
from relay.config.rules import detect_device, validate
from relay.config.train import DPOConfig, RMConfig, SFTConfig, TrainConfig

__all__ = [
    "PIPELINES", "PLAIN_FORWARD_PLUGINS", "PLUGINS", "PRECISIONS", "ClusterConfig", "ConfigError", "DPOConfig",
    "GenerationConfig", "LearnerConfig", "LoggingConfig", "LoraConfig", "ModelConfig", "OptimConfig", "PPOAlgoConfig",
    "PPOConfig", "PPOEvalConfig", "RMConfig", "Range", "RewardConfig", "SFTConfig", "TrainConfig",
    "actor_shares_prompts", "apply_overrides", "build", "detect_device", "doc", "field_reference", "forward_micro_batch",
    "learner_temperature", "load_config", "needs_reference", "old_logprobs_source", "ppo_buffer_size",
    "save_config", "to_dict", "validate",
]
