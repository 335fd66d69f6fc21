"""Conversation template config (the seed's JSON file) and rendering conversations with it.

Fields, as in ColossalChat:
  chat_template     optional; a Jinja string, or a model/tokenizer folder whose template to use; default the
                    tokenizer's own
  system_message    optional; prepended as a system turn when a conversation has none
  end_of_assistant  the string that ends an assistant turn in the rendered text (e.g. "<|im_end|>")
  stop_ids          optional; token ids that end generation; default the tokenizer's eos id
If the config file does not exist, an auto-generated one (template, end marker and stop ids taken from the
tokenizer) is written there, as the seed does.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from relay.data.formats import Turn

FIELDS = ("chat_template", "system_message", "end_of_assistant", "stop_ids")
_MARK_USER, _MARK_ASSISTANT = "RELAYUSERMARK", "RELAYASSISTANTMARK"


class TemplateConfigError(ValueError):
    """A template config that cannot be used; names the config file and the field."""

    def __init__(self, path: str | Path | None, field_name: str, reason: str):
        self.path, self.field, self.reason = str(path) if path else "<template config>", field_name, reason
        super().__init__(f"{self.path}: field '{field_name}': {reason}")


@dataclass
class TemplateConfig:
    """A conversation template config; after `resolve_template_config` every field but system_message is set."""

    chat_template: str | None = None
    system_message: str | None = None
    end_of_assistant: str | None = None
    stop_ids: list[int] | None = field(default=None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, path: str | Path | None = None) -> "TemplateConfig":
        if not isinstance(data, dict):
            raise TemplateConfigError(path, "<config>", f"expected a JSON object, got {type(data).__name__}")
        for key in data:
            if key not in FIELDS:
                raise TemplateConfigError(path, key, f"unknown field (known: {', '.join(FIELDS)})")
        for key in ("chat_template", "system_message", "end_of_assistant"):
            if data.get(key) is not None and not isinstance(data[key], str):
                raise TemplateConfigError(path, key, f"expected a string, got {type(data[key]).__name__}")
        if data.get("end_of_assistant") == "":
            raise TemplateConfigError(path, "end_of_assistant", "empty string")
        stop = data.get("stop_ids")
        if stop is not None and (
            not isinstance(stop, list) or not stop or not all(isinstance(i, int) and i >= 0 for i in stop)
        ):
            raise TemplateConfigError(path, "stop_ids", f"expected a non-empty list of token ids, got {stop!r}")
        return cls(**{k: data.get(k) for k in FIELDS})


def is_jinja(text: str) -> bool:
    return "{%" in text or "{{" in text


def tokenizer_eos_ids(tokenizer) -> list[int]:
    eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return [int(i) for i in eos] if isinstance(eos, (list, tuple)) else [int(eos)]


def _template_from_model(spec: str, path: str | Path | None) -> str:
    from relay.data.tokenizers import load_tokenizer

    try:
        tok = load_tokenizer(spec)
    except Exception as e:  # noqa: BLE001 - any loading failure means the same thing to the user
        raise TemplateConfigError(path, "chat_template", f"not a Jinja template, and no tokenizer loads from it ({e})")
    if not tok.chat_template:
        raise TemplateConfigError(path, "chat_template", f"the tokenizer at {spec!r} has no chat template")
    return tok.chat_template


def render(tokenizer, chat_template: str, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=chat_template, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def infer_end_of_assistant(tokenizer, chat_template: str) -> str:
    """What the template writes right after an assistant reply, cut at the eos (or first special) token."""
    msgs = [{"role": "user", "content": _MARK_USER}, {"role": "assistant", "content": _MARK_ASSISTANT}]
    try:
        text = render(tokenizer, chat_template, msgs, add_generation_prompt=False)
    except Exception as e:  # noqa: BLE001 - a broken template fails in many ways
        raise TemplateConfigError(None, "chat_template", f"cannot render a conversation: {e}")
    if _MARK_ASSISTANT not in text:
        raise TemplateConfigError(None, "chat_template", "the template drops assistant replies")
    after = text[text.index(_MARK_ASSISTANT) + len(_MARK_ASSISTANT) :]
    stripped = after.lstrip()
    specials = [s for s in (tokenizer.eos_token, *tokenizer.all_special_tokens) if s]
    hits = sorted((stripped.find(s), -len(s), s) for s in specials if s in stripped)
    if hits:
        pos, _, tok = hits[0]
        return stripped[: pos + len(tok)]
    if stripped.strip():
        return stripped.rstrip()
    raise TemplateConfigError(
        None, "end_of_assistant", "the chat template writes nothing after an assistant reply: set it in the config"
    )


def resolve_template_config(cfg: TemplateConfig, tokenizer, path: str | Path | None = None) -> TemplateConfig:
    """Fill in the optional fields from the tokenizer and check that the result can mark assistant replies."""
    template = cfg.chat_template
    if template is None:
        template = tokenizer.chat_template
        if not template:
            raise TemplateConfigError(path, "chat_template", "not set, and the tokenizer has no chat template")
    elif not is_jinja(template):
        template = _template_from_model(template, path)
    try:
        eoa = cfg.end_of_assistant or infer_end_of_assistant(tokenizer, template)
    except TemplateConfigError as e:
        raise TemplateConfigError(path, e.field, e.reason) from None  # name the config file
    stop_ids = cfg.stop_ids or tokenizer_eos_ids(tokenizer)
    if not stop_ids:
        raise TemplateConfigError(path, "stop_ids", "not set, and the tokenizer has no eos token")
    out = TemplateConfig(template, cfg.system_message, eoa, list(stop_ids))
    check_template(out, tokenizer, path)
    return out


def check_template(cfg: TemplateConfig, tokenizer, path: str | Path | None = None) -> None:
    """Render a two-round conversation and require `end_of_assistant` after each reply."""
    fmt = ChatFormatter(tokenizer, cfg)
    turns = [Turn("user", _MARK_USER + "1"), Turn("assistant", _MARK_ASSISTANT + "1"),
             Turn("user", _MARK_USER + "2"), Turn("assistant", _MARK_ASSISTANT + "2")]
    try:
        text = fmt.render(turns)
    except Exception as e:  # noqa: BLE001 - a broken template fails in many ways
        raise TemplateConfigError(path, "chat_template", f"cannot render a conversation: {e}")
    for i in ("1", "2"):
        pos = text.find(_MARK_ASSISTANT + i)
        if pos < 0:
            raise TemplateConfigError(path, "chat_template", "the template drops assistant replies")
        if text.find(cfg.end_of_assistant, pos) < 0:
            raise TemplateConfigError(
                path, "end_of_assistant", f"{cfg.end_of_assistant!r} does not follow assistant replies in {text!r}"
            )


def load_template_config(
    path: str | Path | None, tokenizer, *, system_message: str | None = None
) -> tuple[TemplateConfig, bool]:
    """Load and resolve the config at `path`; if it does not exist, auto-generate one, write it there, and
    return created=True (the caller says so). `system_message` is used only when generating."""
    if path is not None and Path(path).exists():
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise TemplateConfigError(path, "<json>", f"malformed JSON: {e.msg} at line {e.lineno} column {e.colno}")
        return resolve_template_config(TemplateConfig.from_dict(data, path), tokenizer, path), False
    cfg = resolve_template_config(TemplateConfig(system_message=system_message), tokenizer, path)
    if path is not None:
        save_template_config(cfg, path)
    return cfg, path is not None


def save_template_config(cfg: TemplateConfig, path: str | Path) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(cfg.to_dict(), indent=4, ensure_ascii=False) + "\n", encoding="utf-8")


class ChatFormatter:
    """Renders Turn lists with a resolved template config (adds the config's system message if none given)."""

    def __init__(self, tokenizer, cfg: TemplateConfig):
        if cfg.chat_template is None or cfg.end_of_assistant is None:
            raise ValueError("ChatFormatter needs a resolved TemplateConfig (see resolve_template_config)")
        self.tokenizer, self.cfg = tokenizer, cfg

    def messages(self, turns: list[Turn]) -> list[dict[str, str]]:
        msgs = [{"role": t.role, "content": t.content} for t in turns]
        if self.cfg.system_message is not None and not (msgs and msgs[0]["role"] == "system"):
            msgs.insert(0, {"role": "system", "content": self.cfg.system_message})
        return msgs

    def render(self, turns: list[Turn], add_generation_prompt: bool = False) -> str:
        return self.render_messages(self.messages(turns), add_generation_prompt)

    def render_messages(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        """Render role/content dicts as they are (no system message added)."""
        return render(self.tokenizer, self.cfg.chat_template, messages, add_generation_prompt)
