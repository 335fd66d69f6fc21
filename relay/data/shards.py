"""Writing prepared data as the seed does (`OUT/arrow/part-XXXXX` save_to_disk shards, `OUT/jsonl/part-XXXXX.jsonl`
for people to read) and loading it back for training.

Record schemas (one row per sample; sequences are unpadded, labels use -100 for masked positions):
  sft         input_ids, labels, attention_mask, text, label_text (decoded replies), meta
  preference  chosen_{input_ids,labels,attention_mask,text,label_text}, rejected_{...}, meta
  prompt      input_ids, attention_mask, text (ends with the generation prompt), messages (JSON), meta
  ptx         input_ids, labels, attention_mask, text, label_text, meta
`meta` is a JSON string of the raw record's extra fields ("" when none). `OUT/prepared.json` records the kind,
the tokenizer, the template config and the summary counts.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Iterable

INFO_FILE = "prepared.json"
SKIPPED_FILE = "skipped.jsonl"
_LABELED = ("input_ids", "labels", "attention_mask", "text", "label_text")
COLUMNS: dict[str, tuple[str, ...]] = {
    "sft": (*_LABELED, "meta"),
    "ptx": (*_LABELED, "meta"),
    "preference": (*(f"chosen_{c}" for c in _LABELED), *(f"rejected_{c}" for c in _LABELED), "meta"),
    "prompt": ("input_ids", "attention_mask", "text", "messages", "meta"),
}


def features(kind: str):
    """The datasets.Features of a kind's rows (int32 ids and labels, int8 masks)."""
    from datasets import Features, Sequence, Value

    def col(name: str):
        base = name.split("_", 1)[1] if name.startswith(("chosen_", "rejected_")) else name
        if base in ("input_ids", "labels"):
            return Sequence(Value("int32"))
        if base == "attention_mask":
            return Sequence(Value("int8"))
        if base == "label_text":
            return Sequence(Value("string"))
        return Value("string")

    return Features({c: col(c) for c in COLUMNS[kind]})


def write_prepared(
    rows: list[dict[str, Any]], out: str | Path, kind: str, num_shards: int = 1, info: dict[str, Any] | None = None
) -> list[Path]:
    """Write rows as arrow + jsonl shards under `out`; returns the arrow part folders."""
    import datasets
    from datasets import Dataset

    datasets.disable_progress_bars()  # one bar per shard is noise; `relay prepare` shows its own
    out = Path(out)
    for sub in ("arrow", "jsonl"):
        shutil.rmtree(out / sub, ignore_errors=True)
        (out / sub).mkdir(parents=True)
    ds = Dataset.from_list(rows, features=features(kind)) if rows else Dataset.from_dict(
        {c: [] for c in COLUMNS[kind]}, features=features(kind)
    )
    n = max(1, min(num_shards, len(ds)))  # no empty shards (the seed skips those too)
    parts = []
    for i in range(n):
        part = ds.shard(num_shards=n, index=i, contiguous=True)
        name = f"part-{i:05d}"
        part.save_to_disk(str(out / "arrow" / name))
        with open(out / "jsonl" / f"{name}.jsonl", "w", encoding="utf-8") as fh:
            for row in part:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        parts.append(out / "arrow" / name)
    meta = {"kind": kind, "num_rows": len(ds), "num_shards": n, "columns": list(COLUMNS[kind]), **(info or {})}
    (out / INFO_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return parts


def write_skipped(entries: Iterable[dict[str, Any]], out: str | Path) -> Path:
    """The report of every record that was skipped or dropped, one JSON object per line."""
    path = Path(out) / SKIPPED_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for e in entries:
            fh.write(json.dumps(e, ensure_ascii=False) + "\n")
    return path


def _part_dirs(p: Path) -> list[Path]:
    if (p / "state.json").exists():
        return [p]
    if (p / "arrow").is_dir():
        p = p / "arrow"
    parts = sorted(d for d in p.glob("part-*") if (d / "state.json").exists())
    if not parts:
        raise FileNotFoundError(f"{p}: no prepared data here (expected OUT, OUT/arrow or OUT/arrow/part-XXXXX)")
    return parts


def read_info(path: str | Path) -> dict[str, Any] | None:
    """OUT/prepared.json for a prepared folder (or one of its arrow parts), if there is one."""
    p = Path(path)
    for cand in (p, p.parent, p.parent.parent):
        if (cand / INFO_FILE).exists():
            return json.loads((cand / INFO_FILE).read_text(encoding="utf-8"))
    return None


def infer_kind(columns: Iterable[str]) -> str | None:
    cols = set(columns)
    for kind in ("preference", "prompt", "sft"):
        if set(COLUMNS[kind]) <= cols:
            return kind
    return None


def load_prepared(paths: str | Path | list[str | Path], kind: str | None = None):
    """Load prepared data as one datasets.Dataset.

    `paths`: an OUT folder, its `arrow` folder, single `part-XXXXX` folders, or a list of any of these
    (concatenated in order). With `kind`, every input must be of that kind (checked against prepared.json
    when present, else against the columns); sft and ptx rows share one schema, so either loads as the other.
    """
    from datasets import concatenate_datasets, load_from_disk

    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not items:
        raise ValueError("load_prepared: no paths given")
    parts = []
    for item in items:
        info = read_info(item)
        found = info.get("kind") if info else None
        for d in _part_dirs(Path(item)):
            ds = load_from_disk(str(d))
            found = found or infer_kind(ds.column_names)
            if kind is not None and found != kind and {found, kind} != {"sft", "ptx"}:
                raise ValueError(f"load_prepared: {d} holds {found!r} data, expected {kind!r}")
            parts.append(ds)
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)
