"""Conversation template config: auto-generation, round trip through the file, model-path templates, errors."""
from __future__ import annotations

import json

import pytest

from relay.data.formats import Turn
from relay.data.templates import (
    ChatFormatter,
    TemplateConfig,
    TemplateConfigError,
    infer_end_of_assistant,
    load_template_config,
    save_template_config,
)
from relay.data.tokenizers import load_smollm2_tokenizer, load_tokenizer, tiny_tokenizer_dir

LLAMA2_LIKE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% elif m['role'] == 'system' %}{{ '<<SYS>>' + m['content'] + '<</SYS>>' }}"
    "{% else %}{{ ' ' + m['content'] + ' </s>' }}{% endif %}{% endfor %}"
)


@pytest.fixture(scope="module")
def tiny_tok():
    return load_tokenizer("tiny")


@pytest.fixture(scope="module")
def smol_tok():
    return load_smollm2_tokenizer()


def test_smollm2_gguf_tokenizer_has_chatml_and_im_end(smol_tok):
    assert smol_tok.eos_token == "<|im_end|>"
    assert "<|im_start|>" in smol_tok.chat_template
    assert smol_tok.convert_tokens_to_ids("<|im_end|>") == smol_tok.eos_token_id


@pytest.mark.parametrize("tok_name", ["tiny_tok", "smol_tok"])
def test_auto_generated_config_round_trip(tmp_path, tok_name, request):
    tok = request.getfixturevalue(tok_name)
    path = tmp_path / "cfg" / "template.json"
    cfg, created = load_template_config(path, tok)
    assert created and path.exists()
    assert cfg.chat_template == tok.chat_template
    assert cfg.end_of_assistant == "<|im_end|>"
    assert cfg.stop_ids == [tok.eos_token_id]
    assert cfg.system_message is None
    saved = json.loads(path.read_text())
    assert set(saved) == {"chat_template", "system_message", "end_of_assistant", "stop_ids"}
    again, created2 = load_template_config(path, tok)
    assert not created2 and again == cfg
    assert path.read_text() == json.dumps(saved, indent=4, ensure_ascii=False) + "\n"  # not rewritten


def test_user_config_fields_are_kept(tmp_path, tiny_tok):
    path = tmp_path / "t.json"
    save_template_config(TemplateConfig(LLAMA2_LIKE, "Be kind.", "</s>", [5, 6]), path)
    cfg, created = load_template_config(path, tiny_tok)
    assert not created and cfg == TemplateConfig(LLAMA2_LIKE, "Be kind.", "</s>", [5, 6])
    text = ChatFormatter(tiny_tok, cfg).render([Turn("user", "hi"), Turn("assistant", "yo")])
    assert text == "<<SYS>>Be kind.<</SYS>>[INST] hi [/INST] yo </s>"


def test_optional_fields_filled_from_tokenizer(tmp_path, tiny_tok):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"system_message": "S"}))
    cfg, created = load_template_config(path, tiny_tok)
    assert not created and cfg.chat_template == tiny_tok.chat_template and cfg.stop_ids == [tiny_tok.eos_token_id]
    assert cfg.end_of_assistant == "<|im_end|>" and cfg.system_message == "S"


def test_chat_template_from_a_model_path(tmp_path, smol_tok):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"chat_template": str(tiny_tokenizer_dir()), "end_of_assistant": "<|im_end|>"}))
    cfg, _ = load_template_config(path, smol_tok)
    assert cfg.chat_template == load_tokenizer("tiny").chat_template  # the tiny template, not SmolLM2's
    assert "SmolLM" not in ChatFormatter(smol_tok, cfg).render([Turn("user", "a"), Turn("assistant", "b")])


def test_infer_end_of_assistant_non_chatml(tiny_tok):
    assert infer_end_of_assistant(tiny_tok, LLAMA2_LIKE) == "</s>"


def test_system_message_not_added_twice(tiny_tok):
    cfg, _ = load_template_config(None, tiny_tok)
    cfg.system_message = "From config"
    fmt = ChatFormatter(tiny_tok, cfg)
    assert fmt.messages([Turn("user", "a")])[0] == {"role": "system", "content": "From config"}
    own = fmt.messages([Turn("system", "Own"), Turn("user", "a")])
    assert [m["content"] for m in own] == ["Own", "a"]


@pytest.mark.parametrize(
    "data,field,reason",
    [
        ({"chat_template": 3}, "chat_template", "expected a string"),
        ({"stop_ids": "2"}, "stop_ids", "list of token ids"),
        ({"stop_ids": []}, "stop_ids", "list of token ids"),
        ({"end_of_assistant": ""}, "end_of_assistant", "empty"),
        ({"end_of_asistant": "x"}, "end_of_asistant", "unknown field"),
        ({"end_of_assistant": "<END>"}, "end_of_assistant", "does not follow assistant replies"),
        ({"chat_template": "/no/such/model"}, "chat_template", "no tokenizer loads from it"),
        ({"chat_template": "{% for m in messages %}{{ m['content'] }}"}, "chat_template", "cannot render"),
    ],
)
def test_bad_config_names_file_and_field(tmp_path, tiny_tok, data, field, reason):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(TemplateConfigError) as ei:
        load_template_config(path, tiny_tok)
    msg = str(ei.value)
    assert str(path) in msg and f"'{field}'" in msg and reason in msg, msg


def test_malformed_config_json(tmp_path, tiny_tok):
    path = tmp_path / "bad.json"
    path.write_text("{")
    with pytest.raises(TemplateConfigError, match="malformed JSON"):
        load_template_config(path, tiny_tok)
