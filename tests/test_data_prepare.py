"""`relay prepare` / `relay data demo` end to end: shards, jsonl, load_prepared, counting, reports, CLI errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from relay.data.formats import DataFormatError
from relay.data.shards import COLUMNS, load_prepared, read_info
from relay.data.tokenize import IGNORE_INDEX
from relay.data.tokenizers import load_tokenizer
from relay.launch.prepare_cmd import PrepareOptions, data_main, main, prepare

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def tiny_tok():
    return load_tokenizer("tiny")


def _opts(kind, out, inputs=None, **kw) -> PrepareOptions:
    inputs = inputs or [str(FIXTURES / f"chitchat_{kind}.jsonl")]
    return PrepareOptions(kind, [str(p) for p in inputs], str(out), tokenizer="tiny", progress=False, **kw)


@pytest.mark.parametrize("kind", ["sft", "preference", "prompt", "ptx"])
def test_prepare_each_kind_writes_arrow_jsonl_and_loads(tmp_path, tiny_tok, kind):
    out = tmp_path / kind
    summary = prepare(_opts(kind, out, num_shards=2), tokenizer=tiny_tok)
    n_raw = sum(1 for line in (FIXTURES / f"chitchat_{kind}.jsonl").read_text().splitlines() if line.strip())
    assert summary.records_read == n_raw and summary.written == n_raw - summary.dropped()
    assert sorted(p.name for p in (out / "arrow").iterdir()) == ["part-00000", "part-00001"]
    assert sorted(p.name for p in (out / "jsonl").iterdir()) == ["part-00000.jsonl", "part-00001.jsonl"]
    ds = load_prepared(out, kind=kind)
    assert len(ds) == summary.written and set(ds.column_names) == set(COLUMNS[kind])
    jsonl_rows = [json.loads(line) for f in sorted((out / "jsonl").iterdir()) for line in f.read_text().splitlines()]
    assert jsonl_rows == ds.to_list()
    info = read_info(out)
    assert info["kind"] == kind and info["num_rows"] == summary.written
    if kind != "ptx":
        assert summary.template_created and (out / "conversation_template.json").exists()
        assert info["template_config"]["end_of_assistant"] == "<|im_end|>"
    # the same data through each loader entry point
    assert len(load_prepared(out / "arrow")) == len(load_prepared([out / "arrow" / "part-00000",
                                                                    out / "arrow" / "part-00001"]))


def test_sft_rows_have_assistant_only_labels(tmp_path, tiny_tok):
    out = tmp_path / "sft"
    prepare(_opts("sft", out), tokenizer=tiny_tok)
    for row in load_prepared(out):
        labelled = [i for i, lab in zip(row["input_ids"], row["labels"]) if lab != IGNORE_INDEX]
        text = tiny_tok.decode(labelled, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        assert text == "".join(row["label_text"]) and text.endswith("<|im_end|>")


def test_load_prepared_kind_mismatch(tmp_path, tiny_tok):
    prepare(_opts("prompt", tmp_path / "p"), tokenizer=tiny_tok)
    with pytest.raises(ValueError, match="holds 'prompt' data, expected 'sft'"):
        load_prepared(tmp_path / "p", kind="sft")
    with pytest.raises(FileNotFoundError, match="no prepared data"):
        load_prepared(tmp_path)


def test_num_proc_2_gives_the_same_output(tmp_path, tiny_tok):
    # enough records for several worker chunks
    line = (FIXTURES / "chitchat_sft.jsonl").read_text().splitlines()
    src = tmp_path / "many.jsonl"
    src.write_text("\n".join(json.dumps({**json.loads(x), "copy": i}) for i in range(40) for x in line) + "\n")
    a = prepare(_opts("sft", tmp_path / "a", [src]), tokenizer=tiny_tok)
    b = prepare(_opts("sft", tmp_path / "b", [src], num_proc=2), tokenizer=tiny_tok)
    assert a.written == b.written == 240
    assert load_prepared(tmp_path / "a").to_list() == load_prepared(tmp_path / "b").to_list()


def test_dedup_counts_and_reports(tmp_path, tiny_tok):
    lines = (FIXTURES / "chitchat_sft.jsonl").read_text().splitlines()
    src = tmp_path / "dup.jsonl"
    src.write_text("\n".join(lines + lines[:2]) + "\n")
    s = prepare(_opts("sft", tmp_path / "o", [src], dedup=True), tokenizer=tiny_tok)
    assert s.counts["duplicate"] == 2 and s.written == len(lines)
    report = [json.loads(x) for x in (tmp_path / "o" / "skipped.jsonl").read_text().splitlines()]
    assert [r["category"] for r in report] == ["duplicate", "duplicate"]
    assert report[0]["line"] == len(lines) + 1 and "record 0" in report[0]["reason"]


def test_bad_record_stops_with_file_record_field(tmp_path, tiny_tok):
    src = tmp_path / "bad.jsonl"
    good = (FIXTURES / "chitchat_sft.jsonl").read_text().splitlines()[0]
    src.write_text(good + "\n" + '{"messages": [{"from": "robot", "content": "x"}]}\n')
    with pytest.raises(DataFormatError, match=r"bad.jsonl: line 2 \(record 1\): field 'messages\[0\].from'"):
        prepare(_opts("sft", tmp_path / "o", [src]), tokenizer=tiny_tok)


def test_skip_invalid_reports_every_skipped_record(tmp_path, tiny_tok):
    good = (FIXTURES / "chitchat_sft.jsonl").read_text().splitlines()
    bad = [
        '{"messages": [',  # malformed
        '{"messages": [{"from": "human", "content": ""}]}',  # empty content
        '{"mesages": []}',  # misspelled
        '{"messages": [{"from": "human", "content": "a"}, {"from": "human", "content": "b"}]}',  # not alternating
    ]
    src = tmp_path / "mixed.jsonl"
    src.write_text("\n".join(good[:2] + bad + good[2:]) + "\n")
    s = prepare(_opts("sft", tmp_path / "o", [src], skip_invalid=True, max_length=24), tokenizer=tiny_tok)
    assert s.counts["invalid"] == 4
    assert s.records_read == len(good) + 4 == s.written + s.dropped()
    report = [json.loads(x) for x in (tmp_path / "o" / "skipped.jsonl").read_text().splitlines()]
    invalid = [r for r in report if r["category"] == "invalid"]
    assert [(r["line"], r["field"]) for r in invalid] == [
        (3, "<json>"), (4, "messages[0].content"), (5, "mesages"), (6, "messages[1]")]
    assert all(r["file"].endswith("mixed.jsonl") and r["reason"] for r in report)
    # every drop is in the report, and the summary counts each of them
    assert len(report) == s.dropped()
    summary_file = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary_file["counts"] == s.counts


def test_non_utf8_record_stops_or_is_skipped(tmp_path, tiny_tok, capsys):
    good = (FIXTURES / "chitchat_sft.jsonl").read_bytes().splitlines()
    latin = json.dumps({"messages": [{"from": "human", "content": "déjà"}, {"from": "assistant", "content": "vu"}]},
                       ensure_ascii=False).encode("latin-1")
    src = tmp_path / "latin.jsonl"
    src.write_bytes(b"\n".join(good[:1] + [latin] + good[1:]) + b"\n")
    with pytest.raises(DataFormatError, match=r"latin.jsonl: line 2 \(record 1\): field '<encoding>': not valid UTF-8"):
        prepare(_opts("sft", tmp_path / "o", [src]), tokenizer=tiny_tok)
    s = prepare(_opts("sft", tmp_path / "skip", [src], skip_invalid=True), tokenizer=tiny_tok)
    assert s.counts["invalid"] == 1 and s.records_read == len(good) + 1
    report = [json.loads(x) for x in (tmp_path / "skip" / "skipped.jsonl").read_text().splitlines()]
    assert [(r["line"], r["field"]) for r in report if r["category"] == "invalid"] == [(2, "<encoding>")]
    code = main(["sft", "-i", str(src), "-o", str(tmp_path / "cli"), "-t", "tiny", "-q"])
    err = capsys.readouterr().err
    assert code != 0 and "latin.jsonl: line 2" in err and "UTF-8" in err and "Traceback" not in err


def test_cli_prepare_and_errors(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["sft", "-i", str(FIXTURES / "chitchat_sft.jsonl"), "-o", str(out), "-t", "tiny", "-q",
            "--max-length", "64", "--num-shards", "3"]
    assert main(args) == 0
    printed = capsys.readouterr()
    assert "records read" in printed.out and "auto-generated" in printed.err
    assert len(list((out / "arrow").iterdir())) == 3
    assert main(args) == 2 and "not empty (use --overwrite)" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"context": [{"from": "human", "content": "q"}],
                                "chosen": [{"from": "assistant", "content": "same"}],
                                "rejected": [{"from": "assistant", "content": "same"}]}]))
    code = main(["preference", "-i", str(bad), "-o", str(tmp_path / "p"), "-t", "tiny", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "bad.json" in err and "record 0" in err and "'rejected'" in err and "--skip-invalid" in err


def test_cli_template_config_given_and_comma_inputs(tmp_path, capsys):
    cfg = tmp_path / "tpl.json"
    cfg.write_text(json.dumps({"system_message": "You are a demo.", "end_of_assistant": "<|im_end|>"}))
    inputs = f"{FIXTURES / 'chitchat_sft.jsonl'},{FIXTURES / 'chitchat_sft.jsonl'}"
    assert main(["sft", "-i", inputs, "-o", str(tmp_path / "o"), "-t", "tiny", "-c", str(cfg), "-q", "--dedup"]) == 0
    ds = load_prepared(tmp_path / "o")
    assert all(r.startswith("<|im_start|>system\nYou are a demo.") for r in ds["text"])
    assert "duplicate" in capsys.readouterr().out


def test_data_demo_small(tmp_path, capsys):
    code = data_main(["demo", str(tmp_path / "demo"), "--sft", "12", "--preference", "12", "--prompt", "8",
                      "--ptx", "4", "-t", "tiny", "--max-length", "256"])
    assert code == 0
    for kind in ("sft", "preference", "prompt", "ptx"):
        assert (tmp_path / "demo" / "raw" / f"{kind}.jsonl").exists()
        assert len(load_prepared(tmp_path / "demo" / kind, kind=kind)) > 0
    pref = [json.loads(x) for x in (tmp_path / "demo" / "raw" / "preference.jsonl").read_text().splitlines()]
    assert all(p["chosen"] != p["rejected"] and p["context"][-1]["from"] == "human" for p in pref)


def test_prepare_cached_reuses_until_inputs_change(tmp_path, tiny_tok):
    from relay.launch.prepare_cmd import prepare_cached

    src = tmp_path / "in.jsonl"
    src.write_text((FIXTURES / "chitchat_sft.jsonl").read_text())
    opts = _opts("sft", tmp_path / "o", [src])
    first, reused = prepare_cached(opts, tokenizer=tiny_tok)
    assert not reused and first.written == 6
    again, reused = prepare_cached(opts, tokenizer=tiny_tok)
    assert reused and again.written == 6 and again.counts == first.counts
    src.write_text("\n".join(src.read_text().splitlines()[:3]) + "\n")
    changed, reused = prepare_cached(opts, tokenizer=tiny_tok)
    assert not reused and changed.written == 3 and len(load_prepared(tmp_path / "o")) == 3


def test_cli_prints_skipped_records(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    good = (FIXTURES / "chitchat_sft.jsonl").read_text().splitlines()[0]
    src.write_text("\n".join([good, good, '{"messages": [{"from": "bot", "content": "a"}]}']) + "\n")
    assert main(["sft", "-i", str(src), "-o", str(tmp_path / "o"), "-t", "tiny", "-q", "--skip-invalid",
                 "--dedup"]) == 0
    out = capsys.readouterr().out
    assert "skipped records (2;" in out
    assert "[duplicate] " in out and "line 2 (record 1)" in out
    assert "[invalid] " in out and "line 3 (record 2): field 'messages[0].from': unknown role 'bot'" in out
