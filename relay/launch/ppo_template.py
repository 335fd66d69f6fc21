"""PPO's conversation template: the token ids that end a response (vLLM stop ids, EOS for rewards), and a
check that the prompt folders were prepared with the template the run uses (as ColossalChat's PPO loads its
template config beside the prompts).

The template comes from `conversation_template_config` when set, else from the prompt folders' prepared.json
(`relay prepare prompt` records the template it rendered with), else the tokenizer's eos alone.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class StopIds:
    """Where a response ends."""

    stop_ids: list[int]  # generation stops here (`SamplingConfig.stop_token_ids`; vLLM also stops at eos)
    eos_ids: list[int]  # what rewards count as a finished response: the stop ids, then the tokenizer's eos
    source: str  # the template file (or prepared.json) they came from, for the log


def _resolve(data: Any, tokenizer: Any, where: str) -> Any:
    from relay.data.templates import TemplateConfig, resolve_template_config

    return resolve_template_config(TemplateConfig.from_dict(data, where), tokenizer, where)


def prompt_templates(paths: list[str], tokenizer: Any) -> list[tuple[str, Any]]:
    """(prepared.json path, resolved TemplateConfig) of every prompt folder that records its template."""
    from relay.data.shards import read_info

    out = []
    for path in paths:
        info = read_info(path)
        if info and info.get("template_config") is not None:
            out.append((f"{path}/prepared.json", _resolve(info["template_config"], tokenizer, f"{path}/prepared.json")))
    return out


def resolve_stop_ids(cfg: Any, tokenizer: Any) -> StopIds:
    """The run's stop/EOS ids (see the module doc); raises ValueError when a prompt folder was rendered with
    another chat template or system message than the one the run uses."""
    from relay.data.templates import tokenizer_eos_ids

    eos = tokenizer_eos_ids(tokenizer)
    prepared = prompt_templates(list(cfg.prompt_dataset), tokenizer)
    chosen, source = None, "the tokenizer's eos"
    if cfg.conversation_template_config:
        source = str(cfg.conversation_template_config)
        chosen = _resolve(json.loads(Path(source).read_text(encoding="utf-8")), tokenizer, source)
    elif prepared:
        source, chosen = prepared[0]
    for where, tmpl in prepared:
        if (tmpl.chat_template, tmpl.system_message) != (chosen.chat_template, chosen.system_message):
            raise ValueError(
                f"conversation_template_config: the prompts in {where} were rendered with another chat template "
                f"or system message than {source}; prepare them again with `relay prepare prompt "
                f"--template-config {source}` or use the template they were prepared with"
            )
    stop = [int(i) for i in chosen.stop_ids] if chosen is not None else list(eos)
    return StopIds(stop, stop + [i for i in eos if i not in stop], source)
