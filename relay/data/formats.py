"""Reading the seed's raw data formats and normalising them into typed records.

Accepted record shapes (field names as in ColossalChat's README):
  sft         {"messages": [turn, ...]}                      at least one assistant turn
  preference  {"context": [turn, ...], "chosen": [turn, ...], "rejected": [turn, ...]}
  prompt      {"messages": [turn, ...]}                      a trailing assistant turn is dropped (and counted)
  ptx         {"source": str, "Target": str}                 `target` is accepted too; `source` may be empty
A turn is {"from" | "role": "human" | "user" | "assistant" | "system", "content": str}. Other top-level keys are
kept as metadata (`meta`), unless they look like a misspelling of a known field.

Inputs: JSON arrays, JSONL files, folders of them, `save_to_disk` folders, and what `datasets.load_dataset`
opens locally (a parquet/csv/arrow file, a folder of such files, or `hf:NAME`). Records are numbered from 0 in
each file, lines from 1.
Every problem raises `DataFormatError`, whose message names the file, the record (and line) and the field.
"""
from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

KINDS = ("sft", "preference", "prompt", "ptx")
ROLE_NAMES = {"human": "user", "user": "user", "assistant": "assistant", "system": "system"}
# Top-level fields each kind knows; used for "did you mean" checks on unknown keys.
KNOWN_FIELDS = {
    "sft": ("messages",),
    "prompt": ("messages",),
    "preference": ("context", "chosen", "rejected"),
    "ptx": ("source", "Target", "target"),
}
DATA_SUFFIXES = (".json", ".jsonl")
# Bytes that are not UTF-8 survive decoding with errors="surrogateescape" as these code points, so one bad
# record is named (and skippable) instead of the whole file failing with a bare UnicodeDecodeError.
_UNDECODABLE = re.compile("[\udc80-\udcff]")
HF_FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}  # single files `datasets` reads


class DataFormatError(ValueError):
    """A raw record that cannot be used: names the file, the record index (and line) and the field."""

    def __init__(self, file: str, record: int | None, field: str, reason: str, line: int | None = None):
        self.file, self.record, self.field, self.reason, self.line = str(file), record, field, reason, line
        super().__init__(f"{self.where()}: field '{field}': {reason}")

    def where(self) -> str:
        rec = "record ?" if self.record is None else f"record {self.record}"
        if self.line is None:
            return f"{self.file}: {rec}"
        return f"{self.file}: line {self.line} ({rec})"

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "record": self.record, "line": self.line, "field": self.field, "reason": self.reason}


@dataclass(frozen=True)
class Turn:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass
class SftRecord:
    messages: list[Turn]
    meta: dict[str, Any] = field(default_factory=dict)
    trimmed_turns: int = 0  # trailing user turns dropped (nothing to learn from them)


@dataclass
class PromptRecord:
    messages: list[Turn]
    meta: dict[str, Any] = field(default_factory=dict)
    trimmed_turns: int = 0  # trailing assistant turn dropped, as the seed does


@dataclass
class PreferenceRecord:
    context: list[Turn]
    chosen: list[Turn]
    rejected: list[Turn]
    meta: dict[str, Any] = field(default_factory=dict)
    trimmed_turns: int = 0


@dataclass
class PtxRecord:
    source: str
    target: str
    meta: dict[str, Any] = field(default_factory=dict)
    trimmed_turns: int = 0


Record = SftRecord | PromptRecord | PreferenceRecord | PtxRecord


@dataclass
class RawRecord:
    """One undecoded record and where it came from; `error` is set when the JSON itself was malformed."""

    file: str
    index: int | None
    line: int | None
    data: Any = None
    error: DataFormatError | None = None

    def fail(self, field_name: str, reason: str) -> DataFormatError:
        return DataFormatError(self.file, self.index, field_name, reason, self.line)


# ----------------------------------------------------------------------------------------------- reading


def list_input_files(path: str | Path) -> list[Path]:
    """The JSON/JSONL files a path stands for (a file, or every such file below a folder, sorted)."""
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        return sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in DATA_SUFFIXES and not _hidden(f, p))
    raise FileNotFoundError(f"input {str(path)!r} does not exist")


def _hidden(f: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in f.relative_to(root).parts)


def _is_saved_dataset(p: Path) -> bool:
    return (p / "dataset_dict.json").exists() or ((p / "state.json").exists() and (p / "dataset_info.json").exists())


def iter_raw_records(path: str | Path, split: str = "train") -> Iterator[RawRecord]:
    """Yield raw records from a file, a folder, a `save_to_disk` folder, or a `datasets.load_dataset` path."""
    spath = str(path)
    if spath.startswith("hf:"):
        yield from _iter_hf(spath[3:], split, saved=False)
        return
    p = Path(path)
    if p.is_dir() and _is_saved_dataset(p):
        yield from _iter_hf(spath, split, saved=True)
        return
    if p.is_file() and p.suffix in HF_FILE_BUILDERS:  # a single parquet/csv/arrow file
        yield from _iter_hf(spath, split, saved=False, builder=HF_FILE_BUILDERS[p.suffix])
        return
    files = list_input_files(p)
    if p.is_dir() and not files:
        # A folder of parquet/csv/arrow files: let `datasets` read it.
        yield from _iter_hf(spath, split, saved=False)
        return
    for f in files:
        yield from iter_file_records(f)


def _iter_hf(path: str, split: str, saved: bool, builder: str | None = None) -> Iterator[RawRecord]:
    import datasets

    if saved:
        ds = datasets.load_from_disk(path)
    elif builder:
        ds = datasets.load_dataset(builder, data_files={split: path}, split=split)
    else:
        ds = datasets.load_dataset(path, split=split)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataFormatError(path, None, "<split>", f"no split {split!r} (has {sorted(ds)})")
        ds = ds[split]
    name = f"{path}[{split}]"
    for i, row in enumerate(ds):
        yield RawRecord(name, i, None, row)


def iter_file_records(f: Path) -> Iterator[RawRecord]:
    """JSONL (one record a line) or a JSON array/object; a .json file holding JSON lines is read as JSONL.
    A record holding bytes that are not UTF-8 comes back with an error naming its line."""
    text = f.read_bytes().decode("utf-8", errors="surrogateescape")
    if f.suffix == ".jsonl" or not text.lstrip().startswith("["):
        stripped = text.strip()
        if f.suffix == ".json" and stripped.startswith("{") and _single_json_value(stripped):
            line = text[: text.index("{")].count("\n") + 1
            yield _encoding_error(f, 0, line, stripped) or RawRecord(str(f), 0, line, json.loads(stripped))
            return
        yield from _iter_jsonl(f, text)
        return
    yield from _iter_json_array(f, text)


def _encoding_error(file: Path, index: int, line: int, source: str) -> RawRecord | None:
    """A failed record when `source` (the record's text, starting on `line`) holds bytes that are not UTF-8."""
    bad = _UNDECODABLE.search(source)
    if bad is None:
        return None
    before = source[: bad.start()]
    line += before.count("\n")
    column = bad.start() - before.rfind("\n")  # 1-based; on the record's first line, from the record's start
    reason = f"not valid UTF-8: byte 0x{ord(bad.group()) - 0xDC00:02x} at column {column} (save the file as UTF-8)"
    return RawRecord(str(file), index, line, None, DataFormatError(str(file), index, "<encoding>", reason, line))


def _single_json_value(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except json.JSONDecodeError:
        return False


def _iter_jsonl(f: Path, text: str) -> Iterator[RawRecord]:
    index = 0
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue  # blank lines are not records
        try:
            rec = _encoding_error(f, index, lineno, line) or RawRecord(str(f), index, lineno, json.loads(line))
        except json.JSONDecodeError as e:
            err = DataFormatError(str(f), index, "<json>", f"malformed JSON: {e.msg} at column {e.colno}", lineno)
            rec = RawRecord(str(f), index, lineno, None, err)
        yield rec
        index += 1


def _iter_json_array(f: Path, text: str) -> Iterator[RawRecord]:
    """Decode a JSON array element by element, so each record has an index and a line, and a syntax error
    names the record it is in (the rest of such a file cannot be read reliably and is reported as one skip)."""
    dec = json.JSONDecoder()
    pos = text.index("[") + 1
    index, line, line_pos = 0, 1, 0

    def line_at(p: int) -> int:
        nonlocal line, line_pos
        line += text.count("\n", line_pos, p)
        line_pos = p
        return line

    def skip_ws(p: int) -> int:
        while p < len(text) and text[p] in " \t\r\n":
            p += 1
        return p

    pos = skip_ws(pos)
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        pos = skip_ws(pos)
        start_line = line_at(pos)
        start = pos
        try:
            value, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            reason = f"malformed JSON: {e.msg} at line {e.lineno} column {e.colno} (rest of file not read)"
            yield RawRecord(str(f), index, start_line, None, DataFormatError(str(f), index, "<json>", reason, start_line))
            return
        yield _encoding_error(f, index, start_line, text[start:pos]) or RawRecord(str(f), index, start_line, value)
        index += 1
        pos = skip_ws(pos)
        if pos < len(text) and text[pos] == ",":
            pos += 1
            continue
        if pos < len(text) and text[pos] == "]":
            if text[pos + 1 :].strip():
                lno = line_at(pos)
                reason = "malformed JSON: extra data after the closing ']'"
                yield RawRecord(str(f), index, lno, None, DataFormatError(str(f), index, "<json>", reason, lno))
            return
        lno = line_at(pos)
        reason = "malformed JSON: expected ',' or ']' after a record (rest of file not read)"
        yield RawRecord(str(f), index, lno, None, DataFormatError(str(f), index, "<json>", reason, lno))
        return


# ----------------------------------------------------------------------------------------------- normalising


def normalize(kind: str, raw: RawRecord) -> Record:
    """Validate one raw record of the given kind and return its typed form; raises DataFormatError."""
    if raw.error is not None:
        raise raw.error
    if kind not in KINDS:
        raise ValueError(f"kind: unknown data kind {kind!r} (use one of {', '.join(KINDS)})")
    data = raw.data
    if not isinstance(data, dict):
        raise raw.fail("<record>", f"expected a JSON object, got {type(data).__name__}")
    data = {k: v for k, v in data.items() if v is not None}  # arrow fills absent struct keys with None
    meta = _meta(kind, raw, data)
    if kind in ("sft", "prompt"):
        msgs = _turns(raw, data, "messages")
        _check_alternation(raw, "messages", msgs, first="user", allow_system=True)
        if kind == "sft":
            trimmed = 1 if msgs[-1].role == "user" else 0  # the seed drops an unanswered last question
            msgs = msgs[: len(msgs) - trimmed]
            if not any(t.role == "assistant" for t in msgs):
                raise raw.fail("messages", "no assistant turn: nothing to learn from")
            return SftRecord(msgs, meta, trimmed)
        trimmed = 1 if msgs[-1].role == "assistant" else 0  # the seed drops a trailing answer from prompts
        msgs = msgs[: len(msgs) - trimmed]
        if not any(t.role == "user" for t in msgs):
            raise raw.fail("messages", "no user turn to answer")
        return PromptRecord(msgs, meta, trimmed)
    if kind == "preference":
        ctx = _turns(raw, data, "context")
        _check_alternation(raw, "context", ctx, first="user", allow_system=True)
        if ctx[-1].role != "user":
            raise raw.fail(f"context[{len(ctx) - 1}]", "context must end with a user turn")
        chosen = _turns(raw, data, "chosen", allow_single=True)
        rejected = _turns(raw, data, "rejected", allow_single=True)
        for name, turns in (("chosen", chosen), ("rejected", rejected)):
            _check_alternation(raw, name, turns, first="assistant", allow_system=False)
            if turns[-1].role != "assistant":
                raise raw.fail(f"{name}[{len(turns) - 1}]", f"{name} must end with an assistant turn")
        if chosen == rejected:
            raise raw.fail("rejected", "rejected is identical to chosen: the pair teaches nothing")
        return PreferenceRecord(ctx, chosen, rejected, meta)
    # ptx
    tkey = _one_of(raw, data, ("Target", "target"))
    target = data[tkey]
    if not isinstance(target, str):
        raise raw.fail(tkey, f"expected a string, got {type(target).__name__}")
    if not target.strip():
        raise raw.fail(tkey, "empty content")
    source = data.get("source", "")
    if not isinstance(source, str):
        raise raw.fail("source", f"expected a string, got {type(source).__name__}")
    return PtxRecord(source, target, meta)


def _meta(kind: str, raw: RawRecord, data: dict[str, Any]) -> dict[str, Any]:
    """Unknown keys are kept as metadata (e.g. `category`, ground-truth answers), unless they look misspelled."""
    known = KNOWN_FIELDS[kind]
    # Only a field that is absent can be misspelled: `message_id` beside `messages` is metadata.
    absent = [f for f in known if f not in data]
    if kind == "ptx" and ("Target" in data or "target" in data):
        absent = [f for f in absent if f.lower() != "target"]
    meta = {}
    for key, value in data.items():
        if key in known:
            continue
        close = difflib.get_close_matches(str(key), absent, n=1, cutoff=0.7)
        if close:
            raise raw.fail(key, f"unknown field {key!r} (did you mean {close[0]!r}?)")
        meta[key] = value
    return meta


def _one_of(raw: RawRecord, data: dict[str, Any], names: tuple[str, ...]) -> str:
    present = [n for n in names if n in data]
    if len(present) > 1:
        raise raw.fail(present[1], f"both {present[0]!r} and {present[1]!r} given: use one")
    if not present:
        raise raw.fail(names[0], "missing field" + _hint(names[0], data))
    return present[0]


def _hint(name: str, data: dict[str, Any]) -> str:
    close = difflib.get_close_matches(name, [str(k) for k in data], n=1, cutoff=0.6)
    return f" (found {close[0]!r}: misspelled?)" if close else f" (fields present: {sorted(map(str, data))})"


def _turns(raw: RawRecord, data: dict[str, Any], name: str, allow_single: bool = False) -> list[Turn]:
    if name not in data:
        raise raw.fail(name, "missing field" + _hint(name, data))
    value = data[name]
    if allow_single and isinstance(value, dict):
        value = [value]  # the seed's code also accepts a single turn object here
    if not isinstance(value, list):
        raise raw.fail(name, f"expected a list of turns, got {type(value).__name__}")
    if not value:
        raise raw.fail(name, "empty list of turns")
    return [_turn(raw, f"{name}[{i}]", t) for i, t in enumerate(value)]


def _turn(raw: RawRecord, where: str, t: Any) -> Turn:
    if not isinstance(t, dict):
        raise raw.fail(where, f"expected an object with 'from' (or 'role') and 'content', got {type(t).__name__}")
    t = {k: v for k, v in t.items() if v is not None}
    role_key = _one_of_turn(raw, where, t)
    role_value = t[role_key]
    if not isinstance(role_value, str) or role_value.strip().lower() not in ROLE_NAMES:
        raise raw.fail(
            f"{where}.{role_key}", f"unknown role {role_value!r} (use one of: {', '.join(ROLE_NAMES)})"
        )
    if "content" not in t:
        raise raw.fail(f"{where}.content", "missing field" + _hint("content", t))
    content = t["content"]
    if not isinstance(content, str):
        raise raw.fail(f"{where}.content", f"expected a string, got {type(content).__name__}")
    if not content.strip():
        raise raw.fail(f"{where}.content", "empty content")
    return Turn(ROLE_NAMES[role_value.strip().lower()], content)


def _one_of_turn(raw: RawRecord, where: str, t: dict[str, Any]) -> str:
    present = [k for k in ("from", "role") if k in t]
    if len(present) == 2 and str(t["from"]).strip().lower() != str(t["role"]).strip().lower():
        raise raw.fail(f"{where}.role", f"'from' ({t['from']!r}) and 'role' ({t['role']!r}) disagree")
    if not present:
        role_like = [k for k in t if difflib.get_close_matches(str(k), ["from", "role"], n=1, cutoff=0.6)]
        hint = f" (found {role_like[0]!r}: misspelled?)" if role_like else f" (fields present: {sorted(map(str, t))})"
        raise raw.fail(f"{where}.from", "missing field 'from' (or 'role')" + hint)
    return present[0]


def _check_alternation(raw: RawRecord, name: str, turns: list[Turn], first: str, allow_system: bool) -> None:
    """Roles must alternate user/assistant (a system turn may only open a conversation), as chat templates need."""
    expect = first
    for i, t in enumerate(turns):
        if t.role == "system":
            if not (allow_system and i == 0):
                where = "only as the first turn of the conversation" if allow_system else "not here"
                raise raw.fail(f"{name}[{i}]", f"turns do not alternate: a system turn is allowed {where}")
            continue
        if t.role != expect:
            prev = f"after a {turns[i - 1].role} turn" if i else "as the first turn"
            raise raw.fail(f"{name}[{i}]", f"turns do not alternate: expected a {expect} turn {prev}, got {t.role}")
        expect = "assistant" if expect == "user" else "user"
    if all(t.role == "system" for t in turns):
        raise raw.fail(name, "only a system turn: no conversation")


def record_key(rec: Record) -> str:
    """A canonical string of a record's content, for exact-duplicate detection (metadata ignored)."""
    def turns(ts: list[Turn]) -> list[list[str]]:
        return [[t.role, t.content] for t in ts]

    if isinstance(rec, (SftRecord, PromptRecord)):
        body: Any = turns(rec.messages)
    elif isinstance(rec, PreferenceRecord):
        body = [turns(rec.context), turns(rec.chosen), turns(rec.rejected)]
    else:
        body = [rec.source, rec.target]
    return json.dumps(body, ensure_ascii=False)


def record_to_raw(rec: Record) -> dict[str, Any]:
    """The seed's JSON form of a normalised record (`from`: human/assistant/system), e.g. for fixtures."""
    def turns(ts: list[Turn]) -> list[dict[str, str]]:
        return [{"from": "human" if t.role == "user" else t.role, "content": t.content} for t in ts]

    if isinstance(rec, (SftRecord, PromptRecord)):
        out: dict[str, Any] = {"messages": turns(rec.messages)}
    elif isinstance(rec, PreferenceRecord):
        out = {"context": turns(rec.context), "chosen": turns(rec.chosen), "rejected": turns(rec.rejected)}
    else:
        out = {"source": rec.source, "Target": rec.target}
    return {**out, **rec.meta}
