"""Reading and validating raw data: every input kind, name variant and container, and every bad-input case."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from relay.data.formats import (
    DataFormatError,
    PreferenceRecord,
    PromptRecord,
    PtxRecord,
    RawRecord,
    SftRecord,
    Turn,
    iter_raw_records,
    normalize,
    record_to_raw,
)

FIXTURES = Path(__file__).parent / "fixtures"


def _read(path, kind, split="train"):
    return [normalize(kind, raw) for raw in iter_raw_records(path, split)]


def _raw(data, file="mem.jsonl", index=3, line=4):
    return RawRecord(file, index, line, data)


# ----------------------------------------------------------------------------------------------- good input


@pytest.mark.parametrize("kind", ["sft", "preference", "prompt", "ptx"])
def test_fixtures_read(kind):
    recs = _read(FIXTURES / f"chitchat_{kind}.jsonl", kind)
    assert len(recs) >= 4
    cls = {"sft": SftRecord, "preference": PreferenceRecord, "prompt": PromptRecord, "ptx": PtxRecord}[kind]
    assert all(isinstance(r, cls) for r in recs)


@pytest.mark.parametrize(
    "role_key,user_name", [("from", "human"), ("role", "user"), ("from", "user"), ("role", "human"), ("from", "Human")]
)
def test_sft_name_variants(role_key, user_name):
    data = {"messages": [
        {role_key: "system", "content": "Be brief."},
        {role_key: user_name, "content": "Hi"},
        {role_key: "assistant", "content": "Hello"},
    ]}
    rec = normalize("sft", _raw(data))
    assert rec.messages == [Turn("system", "Be brief."), Turn("user", "Hi"), Turn("assistant", "Hello")]


def test_sft_trailing_user_turn_dropped_and_counted():
    rec = normalize("sft", _raw({"messages": [{"from": "human", "content": "a"}, {"from": "assistant", "content": "b"},
                                             {"from": "human", "content": "c"}]}))
    assert [t.role for t in rec.messages] == ["user", "assistant"] and rec.trimmed_turns == 1


def test_prompt_trailing_assistant_dropped():
    rec = normalize("prompt", _raw({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}))
    assert rec.messages == [Turn("user", "q")] and rec.trimmed_turns == 1


def test_preference_variants_and_single_turn_object():
    rec = normalize("preference", _raw({
        "context": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
        "chosen": {"role": "assistant", "content": "good"},  # the seed's code also takes one object
        "rejected": [{"from": "assistant", "content": "bad"}],
    }))
    assert rec.chosen == [Turn("assistant", "good")] and rec.rejected == [Turn("assistant", "bad")]
    assert rec.context[0].role == "system"


def test_ptx_target_spellings_and_meta():
    assert normalize("ptx", _raw({"source": "", "Target": "text"})).target == "text"
    rec = normalize("ptx", _raw({"target": "t2", "category": "x"}))
    assert rec.source == "" and rec.target == "t2" and rec.meta == {"category": "x"}


def test_extra_fields_kept_as_meta_not_flagged():
    rec = normalize("sft", _raw({"messages": [{"from": "human", "content": "a"}, {"from": "assistant", "content": "b"}],
                                 "message_id": 7, "category": "chat"}))
    assert rec.meta == {"message_id": 7, "category": "chat"}


def test_json_array_jsonl_folder_and_roundtrip(tmp_path):
    recs = _read(FIXTURES / "chitchat_sft.jsonl", "sft")
    raws = [record_to_raw(r) for r in recs]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.json").write_text(json.dumps(raws[:3], indent=2))
    (tmp_path / "d" / "sub").mkdir()
    (tmp_path / "d" / "sub" / "b.jsonl").write_text("\n".join(json.dumps(r) for r in raws[3:]) + "\n\n")
    (tmp_path / "d" / ".hidden.json").write_text("not json")  # hidden files are not data
    got = _read(tmp_path / "d", "sft")
    assert [r.messages for r in got] == [r.messages for r in recs]
    # JSON array records know their line
    lines = [raw.line for raw in iter_raw_records(tmp_path / "d" / "a.json")]
    assert lines[0] == 2 and lines == sorted(lines) and len(set(lines)) == 3


def test_hf_datasets_save_to_disk_and_load_dataset(tmp_path):
    import datasets

    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "saveddict"))
    (tmp_path / "pq").mkdir()
    ds.to_parquet(str(tmp_path / "pq" / "train.parquet"))
    for path, split, n in ((tmp_path / "saved", "train", 2), (tmp_path / "saveddict", "test", 1),
                           (tmp_path / "pq", "train", 2), (tmp_path / "pq" / "train.parquet", "train", 2)):
        recs = _read(path, "sft", split)
        assert len(recs) == n and recs[0].messages[1] == Turn("assistant", "yo")
    with pytest.raises(DataFormatError, match="no split 'validation'"):
        _read(tmp_path / "saveddict", "sft", "validation")


def test_hf_struct_with_mixed_keys_is_fine(tmp_path):
    import datasets

    # arrow fills the missing key of each struct with None: 'from' in one turn, 'role' in another
    rows = [{"messages": [{"from": "human", "content": "a"}, {"role": "assistant", "content": "b"}]}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "s"))
    assert _read(tmp_path / "s", "sft")[0].messages == [Turn("user", "a"), Turn("assistant", "b")]


# ----------------------------------------------------------------------------------------------- bad input


def _error_of(tmp_path, kind, text, name="bad.jsonl") -> DataFormatError:
    f = tmp_path / name
    f.write_text(text)
    with pytest.raises(DataFormatError) as ei:
        _read(f, kind)
    return ei.value


GOOD_SFT = {"messages": [{"from": "human", "content": "hi"}, {"from": "assistant", "content": "yo"}]}
GOOD_PREF = {"context": [{"from": "human", "content": "q"}], "chosen": [{"from": "assistant", "content": "a"}],
             "rejected": [{"from": "assistant", "content": "b"}]}


def _jsonl(bad: dict | str, kind_good=GOOD_SFT) -> str:
    """Two good lines, then the bad record on line 3 (record 2)."""
    bad_line = bad if isinstance(bad, str) else json.dumps(bad)
    return "\n".join([json.dumps(kind_good), json.dumps(kind_good), bad_line]) + "\n"


def _check(err: DataFormatError, file: str, field: str, reason: str, record=2, line=3):
    msg = str(err)
    assert file in msg and f"record {record}" in msg and f"'{field}'" in msg and reason in msg, msg
    assert (err.record, err.field) == (record, field)
    if line is not None:
        assert f"line {line}" in msg and err.line == line


BAD_CASES = [
    # (id, kind, bad record, field, reason fragment)
    ("malformed_json", "sft", '{"messages": [', "<json>", "malformed JSON"),
    ("not_an_object", "sft", "[1, 2]", "<record>", "expected a JSON object"),
    ("missing_messages", "sft", {"conversation": []}, "messages", "missing field"),
    ("misspelled_messages", "sft", {"mesages": GOOD_SFT["messages"]}, "mesages", "did you mean 'messages'"),
    ("missing_role", "sft", {"messages": [{"content": "hi"}]}, "messages[0].from", "missing field"),
    ("misspelled_role_key", "sft", {"messages": [{"form": "human", "content": "hi"}]}, "messages[0].from", "'form'"),
    ("missing_content", "sft", {"messages": [{"from": "human", "contnet": "x"}]}, "messages[0].content", "'contnet'"),
    ("unknown_role", "sft", {"messages": [{"from": "human", "content": "a"}, {"from": "bot", "content": "b"}]},
     "messages[1].from", "unknown role 'bot'"),
    ("unknown_role_role_key", "prompt", {"messages": [{"role": "gpt", "content": "a"}]}, "messages[0].role",
     "unknown role 'gpt'"),
    ("empty_content", "sft", {"messages": [{"from": "human", "content": "  "}, {"from": "assistant", "content": "b"}]},
     "messages[0].content", "empty content"),
    ("content_not_string", "sft", {"messages": [{"from": "human", "content": 5}]}, "messages[0].content",
     "expected a string"),
    ("not_alternating", "sft", {"messages": [{"from": "human", "content": "a"}, {"from": "human", "content": "b"},
                                             {"from": "assistant", "content": "c"}]},
     "messages[1]", "turns do not alternate"),
    ("assistant_first", "sft", {"messages": [{"from": "assistant", "content": "a"}]}, "messages[0]",
     "turns do not alternate"),
    ("system_in_middle", "sft", {"messages": [{"from": "human", "content": "a"}, {"from": "system", "content": "s"}]},
     "messages[1]", "system turn"),
    ("no_reply", "sft", {"messages": [{"from": "human", "content": "a"}]}, "messages", "no assistant turn"),
    ("empty_messages", "prompt", {"messages": []}, "messages", "empty list"),
    ("chosen_equals_rejected", "preference", {**GOOD_PREF, "rejected": GOOD_PREF["chosen"]}, "rejected",
     "identical to chosen"),
    ("missing_rejected", "preference", {k: v for k, v in GOOD_PREF.items() if k != "rejected"}, "rejected",
     "missing field"),
    ("misspelled_chosen", "preference", {"context": GOOD_PREF["context"], "choosen": GOOD_PREF["chosen"],
                                         "rejected": GOOD_PREF["rejected"]}, "choosen", "did you mean 'chosen'"),
    ("context_ends_with_assistant", "preference",
     {**GOOD_PREF, "context": [{"from": "human", "content": "q"}, {"from": "assistant", "content": "a"}]},
     "context[1]", "must end with a user turn"),
    ("chosen_from_user", "preference", {**GOOD_PREF, "chosen": [{"from": "human", "content": "x"}]}, "chosen[0]",
     "turns do not alternate"),
    ("ptx_missing_target", "ptx", {"source": "s"}, "Target", "missing field"),
    ("ptx_misspelled_target", "ptx", {"source": "", "Traget": "t"}, "Traget", "did you mean 'Target'"),
    ("ptx_empty_target", "ptx", {"source": "", "Target": ""}, "Target", "empty content"),
    ("ptx_both_targets", "ptx", {"Target": "a", "target": "b"}, "target", "use one"),
]


@pytest.mark.parametrize("case", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_jsonl_record_names_file_line_record_field(tmp_path, case):
    _, kind, bad, field, reason = case
    good = {"sft": GOOD_SFT, "prompt": GOOD_SFT, "preference": GOOD_PREF,
            "ptx": {"source": "", "Target": "t"}}[kind]
    err = _error_of(tmp_path, kind, _jsonl(bad, good))
    _check(err, "bad.jsonl", field, reason)


@pytest.mark.parametrize("case", [c for c in BAD_CASES if c[0] != "malformed_json"],
                         ids=[c[0] for c in BAD_CASES if c[0] != "malformed_json"])
def test_bad_json_array_record_names_record_and_field(tmp_path, case):
    _, kind, bad, field, reason = case
    good = {"sft": GOOD_SFT, "prompt": GOOD_SFT, "preference": GOOD_PREF,
            "ptx": {"source": "", "Target": "t"}}[kind]
    bad_obj = json.loads(bad) if isinstance(bad, str) else bad
    err = _error_of(tmp_path, kind, json.dumps([good, good, bad_obj], indent=1), name="bad.json")
    _check(err, "bad.json", field, reason, line=None)
    assert err.line is not None and err.line > 2


def test_malformed_json_array_names_the_record(tmp_path):
    text = "[\n" + json.dumps(GOOD_SFT) + ",\n" + json.dumps(GOOD_SFT) + ",\n{\"messages\": [}\n]"
    err = _error_of(tmp_path, "sft", text, name="broken.json")
    _check(err, "broken.json", "<json>", "malformed JSON", record=2, line=4)


LATIN1_SFT = json.dumps({"messages": [{"from": "human", "content": "café"},
                                     {"from": "assistant", "content": "oui"}]}, ensure_ascii=False).encode("latin-1")


@pytest.mark.parametrize("layout", ["jsonl", "json_array"])
def test_non_utf8_record_names_file_line_and_byte_and_the_rest_reads(tmp_path, layout):
    good = json.dumps(GOOD_SFT).encode()
    if layout == "jsonl":
        f, body = tmp_path / "latin.jsonl", b"\n".join([good, good, LATIN1_SFT, good]) + b"\n"
    else:
        f, body = tmp_path / "latin.json", b"[\n" + b",\n".join([good, good, LATIN1_SFT, good]) + b"\n]"
    f.write_bytes(body)
    raws = list(iter_raw_records(f))
    assert len(raws) == 4 and [r.error is None for r in raws] == [True, True, False, True]
    with pytest.raises(DataFormatError) as ei:
        normalize("sft", raws[2])
    _check(ei.value, "latin.json", "<encoding>", "not valid UTF-8: byte 0xe9", line=3 if layout == "jsonl" else 4)
    assert normalize("sft", raws[3]).messages[0].content == "hi"


def test_hf_dataset_error_names_dataset_and_row(tmp_path):
    import datasets

    rows = [GOOD_SFT, {"messages": [{"from": "human", "content": "a"}, {"from": "robot", "content": "b"}]}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    with pytest.raises(DataFormatError) as ei:
        _read(tmp_path / "hf", "sft")
    assert "hf[train]: record 1" in str(ei.value) and "messages[1].from" in str(ei.value)


def test_missing_input_path():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(iter_raw_records("/nonexistent/data.jsonl"))
