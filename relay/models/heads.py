"""Value-head models for critics and reward models: a Hugging Face decoder backbone plus one Linear(hidden, 1).

Checkpoint format (one folder, the same shape as a causal LM folder, so tools that read HF folders work):

- `config.json`: the backbone's config, with `"relay_head": "value"` added;
- safetensors weights (`model.safetensors`, or shards + `model.safetensors.index.json`) holding the backbone
  under the causal-LM names (`model.embed_tokens.weight`, `model.layers.0...`) and the head as
  `value_head.weight` / `value_head.bias`; tokenizer files when they were copied beside it.

This is exactly what `CriticModel.state_dict()` gives, so a ColossalAI `booster.save_model` of a boosted
critic, `CriticModel.save_pretrained` and the learner group's `save_checkpoint` all write the same layout.
`CriticModel.from_pretrained` also accepts a plain causal-LM folder (e.g. an SFT output): its `lm_head` is
ignored and the value head starts fresh. `AutoModel.from_pretrained(folder)` loads the backbone alone.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

HEAD_PREFIX = "value_head."
BACKBONE_PREFIX = "model."
CONFIG_MARKER = "relay_head"


def init_value_head(head: nn.Linear) -> nn.Linear:
    """ColossalChat's reward-model init: weight ~ N(0, std = 1/(d_model+1)). The bias starts at 0 (the seed
    left nn.Linear's uniform default) so that a fresh head predicts values centred on 0."""
    with torch.no_grad():
        head.weight.normal_(mean=0.0, std=1.0 / (head.in_features + 1))
        if head.bias is not None:
            head.bias.zero_()
    return head


class CriticModel(nn.Module):
    """Backbone (`AutoModel`, no LM head) + value head. `forward` returns per-token values, shape (B, T)."""

    def __init__(self, backbone: nn.Module, value_head: nn.Linear | None = None) -> None:
        super().__init__()
        self.model = backbone  # named `model` so that state-dict keys match the causal LM's `model.*`
        self.config = backbone.config
        hidden = int(backbone.config.hidden_size)
        if value_head is None:
            value_head = init_value_head(nn.Linear(hidden, 1, dtype=_param_dtype(backbone)))
        self.value_head = value_head

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, **kwargs
        )
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        # the head in the weights' dtype even under autocast: bf16 values would round returns at ~1e-2
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)

    # HF-like helpers used by ColossalAI policies, LoRA and gradient checkpointing.
    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def get_output_embeddings(self) -> None:
        return None

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)

    def enable_input_require_grads(self) -> None:
        self.model.enable_input_require_grads()

    @classmethod
    def from_pretrained(
        cls, path: str | Path, dtype: torch.dtype = torch.float32, seed: int | None = None, **kwargs: Any
    ) -> "CriticModel":
        """Load a critic folder, or a causal-LM / backbone folder with a freshly initialised head.

        `seed` makes a fresh head identical on every rank (ZeRO does not broadcast initial weights)."""
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        path = Path(path)
        # The folder also holds `value_head.*` (and maybe `lm_head.*`): transformers lists them as UNEXPECTED,
        # which is expected here, so keep its load report quiet.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            backbone = AutoModel.from_pretrained(path, dtype=dtype, **kwargs)
        finally:
            hf_logging.set_verbosity(verbosity)
        head_state = load_prefixed(path, HEAD_PREFIX)
        head = nn.Linear(int(backbone.config.hidden_size), 1, bias=True, dtype=dtype)
        if head_state:
            head.load_state_dict({k: v.to(dtype) for k, v in head_state.items()}, strict=False)
        else:
            if seed is not None:
                gen_state = torch.get_rng_state()
                torch.manual_seed(seed)
            init_value_head(head)
            if seed is not None:
                torch.set_rng_state(gen_state)
        return cls(backbone, head)

    def save_pretrained(self, path: str | Path, max_shard_size: str = "5GB") -> None:
        """Write the folder described in the module docstring."""
        save_critic_folder(self.state_dict(), self.config, path, max_shard_size=max_shard_size)


def save_critic_folder(
    state_dict: dict[str, torch.Tensor], config: Any, path: str | Path, max_shard_size: str = "5GB"
) -> None:
    """Save a critic's (full, unsharded) state dict and config as a critic folder."""
    from huggingface_hub import save_torch_state_dict

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    save_torch_state_dict(state, path, max_shard_size=max_shard_size, safe_serialization=True)
    write_critic_config(config, path)


def write_critic_config(config: Any, path: str | Path) -> None:
    """config.json of the backbone, marked as a value-head model."""
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    data[CONFIG_MARKER] = "value"
    (Path(path) / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def is_critic_folder(path: str | Path) -> bool:
    cfg = Path(path) / "config.json"
    return cfg.exists() and json.loads(cfg.read_text()).get(CONFIG_MARKER) == "value"


def load_prefixed(path: str | Path, prefix: str) -> dict[str, torch.Tensor]:
    """Tensors whose name starts with `prefix` from a safetensors folder (single file or sharded), with the
    prefix stripped; reads only the needed entries."""
    from safetensors import safe_open

    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files: dict[str, list[str]] = {}
        for key, fname in weight_map.items():
            if key.startswith(prefix):
                files.setdefault(fname, []).append(key)
    elif (path / "model.safetensors").exists():
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            files = {"model.safetensors": [k for k in f.keys() if k.startswith(prefix)]}
    else:
        return {}
    out: dict[str, torch.Tensor] = {}
    for fname, keys in files.items():
        with safe_open(str(path / fname), framework="pt") as f:
            for key in keys:
                out[key[len(prefix):]] = f.get_tensor(key)
    return out


def _param_dtype(module: nn.Module) -> torch.dtype:
    for p in module.parameters():
        return p.dtype
    return torch.float32
