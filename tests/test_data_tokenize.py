"""Label masks: the labelled tokens decode to exactly the assistant replies plus end_of_assistant."""
from __future__ import annotations

from pathlib import Path

import pytest

from relay.data.formats import PreferenceRecord, PromptRecord, PtxRecord, SftRecord, Turn, iter_raw_records, normalize
from relay.data.templates import ChatFormatter, TemplateConfig, load_template_config, resolve_template_config
from relay.data.tokenize import (
    ERROR,
    IGNORE_INDEX,
    OK,
    PROMPT_TRIMMED,
    TOO_LONG,
    TRUNCATED,
    TRUNCATED_MID,
    Encoded,
    _prefix_segments,
    conversation_segments,
    decode,
    encode_segments,
    fit_labeled,
    label_texts,
    pad_left,
    pad_right,
    prepare_batch,
)
from relay.data.tokenizers import load_smollm2_tokenizer, load_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"

U, A, S = "user", "assistant", "system"
CONVERSATIONS = {
    "multi_turn": [Turn(U, "Hi there"), Turn(A, "Hello! How can I help?"), Turn(U, "What is 2+2?"),
                   Turn(A, "4.\n\nAnything else?  "), Turn(U, "No, bye"), Turn(A, "Bye 👋")],
    "system_turn": [Turn(S, "You are terse."), Turn(U, "Name a colour"), Turn(A, "Blue"), Turn(U, "Another"),
                    Turn(A, "Red")],
    # replies that also occur in user turns and in the template's own text
    "tricky": [Turn(U, "say yes or assistant"), Turn(A, "yes"), Turn(U, "and now?"), Turn(A, "assistant"),
               Turn(U, "one letter"), Turn(A, "a")],
    "single": [Turn(U, "Q"), Turn(A, " leading space and trailing newline\n")],
}


@pytest.fixture(scope="module", params=["tiny", "smollm2"])
def tok(request):
    return load_smollm2_tokenizer() if request.param == "smollm2" else load_tokenizer("tiny")


def _fmt(tok, system_message=None) -> ChatFormatter:
    cfg, _ = load_template_config(None, tok)
    cfg.system_message = system_message
    return ChatFormatter(tok, cfg)


def _expected(turns, eoa="<|im_end|>", label_from=0):
    return [t.content + eoa for i, t in enumerate(turns) if t.role == A and i >= label_from]


def _labelled_text(tok, ids, labels) -> str:
    return decode(tok, [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX])


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("system_message", [None, "Config system message."])
def test_sft_labels_are_exactly_the_replies(tok, name, system_message):
    turns = CONVERSATIONS[name]
    fmt = _fmt(tok, system_message)
    [out] = prepare_batch("sft", [SftRecord(turns)], tok, fmt, max_length=None)
    assert out.status == OK
    row = out.row
    assert len(row["input_ids"]) == len(row["labels"]) == len(row["attention_mask"])
    assert row["label_text"] == _expected(turns)
    assert _labelled_text(tok, row["input_ids"], row["labels"]) == "".join(_expected(turns))
    # labels equal the ids where set; the text is the rendered conversation up to the last reply's end marker
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(row["input_ids"], row["labels"]))
    full = fmt.render(turns)
    assert row["text"] == full[: full.rindex("<|im_end|>") + len("<|im_end|>")]
    if system_message and turns[0].role != S:
        assert system_message in row["text"] and system_message not in "".join(row["label_text"])


def test_segmented_ids_match_whole_text_tokenization(tok):
    """Training ids equal what the tokenizer makes of the whole text, so inference sees the same tokens."""
    fmt = _fmt(tok)
    for raw in iter_raw_records(FIXTURES / "chitchat_sft.jsonl"):
        rec = normalize("sft", raw)
        [out] = prepare_batch("sft", [rec], tok, fmt, None)
        assert out.row["input_ids"] == tok(out.row["text"], add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_placeholder_path_equals_prefix_path(tok, name):
    fmt = _fmt(tok, "sys")
    turns = CONVERSATIONS[name]
    assert conversation_segments(fmt, turns) == _prefix_segments(fmt, turns, 0, fmt.render(turns))


def test_content_sensitive_template_falls_back(tok):
    trim = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] | trim + '<|im_end|>\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    fmt = ChatFormatter(tok, resolve_template_config(TemplateConfig(chat_template=trim), tok))
    turns = [Turn(U, "q"), Turn(A, "  padded reply  ")]
    enc = encode_segments(tok, [conversation_segments(fmt, turns)])[0]
    assert label_texts(tok, enc) == ["padded reply<|im_end|>"]
    upper = trim.replace("| trim", "| upper")
    fmt = ChatFormatter(tok, resolve_template_config(TemplateConfig(chat_template=upper), tok))
    [out] = prepare_batch("sft", [SftRecord([Turn(U, "q"), Turn(A, "lower")])], tok, fmt, None)
    assert out.status == ERROR and "changes the text of assistant turn 1" in out.error


@pytest.mark.parametrize("system_message", [None, "Sys."])
def test_preference_labels_only_the_continuation(tok, system_message):
    ctx = [Turn(U, "Hi"), Turn(A, "Hello, context reply"), Turn(U, "Tell me a joke")]
    rec = PreferenceRecord(ctx, [Turn(A, "Why did the chicken cross the road?")], [Turn(A, "No.")])
    [out] = prepare_batch("preference", [rec], tok, _fmt(tok, system_message), None)
    row = out.row
    assert row["chosen_label_text"] == ["Why did the chicken cross the road?<|im_end|>"]
    assert row["rejected_label_text"] == ["No.<|im_end|>"]
    for side in ("chosen", "rejected"):
        assert _labelled_text(tok, row[f"{side}_input_ids"], row[f"{side}_labels"]) == row[f"{side}_label_text"][0]
    # the shared context tokenizes identically on both sides
    first = row["chosen_labels"].index(next(lab for lab in row["chosen_labels"] if lab != IGNORE_INDEX))
    assert row["chosen_input_ids"][:first] == row["rejected_input_ids"][:first]


def test_preference_multi_turn_continuation(tok):
    ctx = [Turn(U, "Q1")]
    chosen = [Turn(A, "A1"), Turn(U, "Q2"), Turn(A, "A2")]
    rejected = [Turn(A, "B1"), Turn(U, "Q2"), Turn(A, "B2")]
    [out] = prepare_batch("preference", [PreferenceRecord(ctx, chosen, rejected)], tok, _fmt(tok), None)
    assert out.row["chosen_label_text"] == ["A1<|im_end|>", "A2<|im_end|>"]
    assert out.row["rejected_label_text"] == ["B1<|im_end|>", "B2<|im_end|>"]


def test_prompt_ends_with_generation_prompt(tok):
    fmt = _fmt(tok, "Sys.")
    turns = [Turn(U, "Hi"), Turn(A, "Hello"), Turn(U, "How are you?")]
    [out] = prepare_batch("prompt", [PromptRecord(turns)], tok, fmt, None)
    row = out.row
    assert row["text"] == fmt.render(turns, add_generation_prompt=True)
    assert row["text"].endswith("<|im_start|>assistant\n")
    assert decode(tok, row["input_ids"]) == row["text"] and row["attention_mask"] == [1] * len(row["input_ids"])


def test_prompt_too_long_loses_oldest_rounds_then_drops(tok):
    fmt = _fmt(tok)
    turns = [Turn(S, "sys"), Turn(U, "old question " * 20), Turn(A, "old answer " * 20), Turn(U, "new?")]
    short = len(tok(fmt.render([turns[0], turns[3]], add_generation_prompt=True), add_special_tokens=False)["input_ids"])
    [out] = prepare_batch("prompt", [PromptRecord(turns)], tok, fmt, max_length=short + 5)
    assert out.status == PROMPT_TRIMMED and "old question" not in out.row["text"] and "sys" in out.row["text"]
    [out] = prepare_batch("prompt", [PromptRecord(turns)], tok, fmt, max_length=short - 1)
    assert out.row is None and out.status == TOO_LONG


def test_ptx_labels_target_and_eos(tok):
    [out] = prepare_batch("ptx", [PtxRecord("Instruction: ", "The answer text.")], tok, None, None)
    assert out.row["label_text"] == ["The answer text." + tok.eos_token]
    assert out.row["text"] == "Instruction: The answer text." + tok.eos_token
    [out] = prepare_batch("ptx", [PtxRecord("", "All of it.")], tok, None, None)
    assert all(lab != IGNORE_INDEX for lab in out.row["labels"])


def test_fit_labeled_truncation_rules():
    m = IGNORE_INDEX
    # prompt(3) reply(2) prompt(2) reply(3) trailing(1)
    ids = list(range(11))
    labels = [m, m, m, 3, 4, m, m, 7, 8, 9, m]
    enc = Encoded(ids, labels)
    out, st = fit_labeled(enc, None)
    assert st == OK and out.input_ids == ids[:10]  # trailing masked token dropped
    out, st = fit_labeled(enc, 9)
    assert st == TRUNCATED and out.input_ids == ids[:5]  # the second reply does not fit whole
    out, st = fit_labeled(enc, 4)
    assert st == TRUNCATED_MID and out.labels == [m, m, m, 3]
    out, st = fit_labeled(enc, 3)
    assert out is None and st == TOO_LONG


def test_truncated_sample_never_lacks_labels(tok):
    turns = CONVERSATIONS["multi_turn"]
    fmt = _fmt(tok)
    for n in range(2, 80, 3):
        [out] = prepare_batch("sft", [SftRecord(turns)], tok, fmt, max_length=n)
        if out.row is None:
            assert out.status == TOO_LONG
        else:
            assert len(out.row["input_ids"]) <= n
            assert any(lab != IGNORE_INDEX for lab in out.row["labels"])
            if out.status in (OK, TRUNCATED):
                assert all(t.endswith("<|im_end|>") for t in out.row["label_text"])


def test_pad_helpers():
    ids, mask = pad_left([[1, 2], [3]], 0)
    assert ids == [[1, 2], [0, 3]] and mask == [[1, 1], [0, 1]]
    ids, mask = pad_right([[1, 2], [3]], IGNORE_INDEX, length=3)
    assert ids == [[1, 2, IGNORE_INDEX], [3, IGNORE_INDEX, IGNORE_INDEX]] and mask == [[1, 1, 0], [1, 0, 0]]
