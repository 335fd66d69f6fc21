"""`relay prepare sft|preference|prompt|ptx` and `relay data demo`: the data step of every pipeline.

`prepare(PrepareOptions)` reads and validates the raw records, drops exact duplicates (--dedup), shuffles with
--seed, tokenises with assistant-only labels (--num-proc worker processes), writes arrow + jsonl shards and a
report of every skipped record, and returns a summary in which every dropped record is counted.
Pipelines call `prepare_cached`, which reuses OUT when its inputs and options have not changed.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import multiprocessing
import os
import random
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from relay.data.formats import KINDS, DataFormatError, iter_raw_records, normalize, record_key

DEFAULT_TEMPLATE_NAME = "conversation_template.json"
DROP_PREFIXES = ("invalid", "duplicate", "dropped", "error")  # summary counts of records not written
SHOW_SKIPPED = 20  # skipped records printed at the end; the report file has all of them
CHUNK = 64  # records per worker task: large enough to batch the tokenizer, small enough to balance 2 workers


@dataclass
class PrepareOptions:
    """Options of `relay prepare` (see `relay prepare --help`)."""

    kind: str
    inputs: list[str]
    output: str
    tokenizer: str = "smollm2"
    template_config: str | None = None  # default OUT/conversation_template.json
    max_length: int | None = 2048
    num_proc: int = 1
    dedup: bool = False
    num_shards: int = 1
    seed: int = 42
    shuffle: bool = True
    skip_invalid: bool = False
    overwrite: bool = False
    split: str = "train"
    system_message: str | None = None  # only used when the template config is generated
    limit: int | None = None  # keep the first N valid records (after dedup, before shuffling)
    progress: bool = True


@dataclass
class PrepareSummary:
    kind: str
    output: str
    records_read: int = 0
    written: int = 0
    counts: dict[str, int] = field(default_factory=dict)  # every reason a record was dropped or changed
    template_config: str | None = None
    template_created: bool = False
    seconds: dict[str, float] = field(default_factory=dict)

    def dropped(self) -> int:
        return sum(v for k, v in self.counts.items() if k.startswith(DROP_PREFIXES))

    def format(self) -> str:
        lines = [f"relay prepare {self.kind}: {self.records_read} records read, {self.written} written to {self.output}"]
        drops = {k: v for k, v in self.counts.items() if k.startswith(DROP_PREFIXES)}
        changes = {k: v for k, v in self.counts.items() if k not in drops}
        lines.append(f"  dropped: {self.dropped()} (read = written + dropped)")
        lines += [f"    {k:<28} {v}" for k, v in sorted(drops.items())]
        if changes:
            lines.append("  kept, but changed:")
            lines += [f"    {k:<28} {v}" for k, v in sorted(changes.items())]
        if self.template_config:
            note = " (auto-generated now)" if self.template_created else ""
            lines.append(f"  template config: {self.template_config}{note}")
        lines.append("  time: " + ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items()))
        return "\n".join(lines)


def _progress(iterable, total: int | None, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="rec", leave=False, file=sys.stderr)


def _prepare_output(opts: PrepareOptions, template_path: Path, default_template: bool) -> Path:
    out = Path(opts.output)
    # A template config the user put into OUT does not make OUT "used".
    if out.exists() and any(p.resolve() != template_path.resolve() for p in out.iterdir()):
        if not opts.overwrite:
            raise FileExistsError(f"{out} exists and is not empty (use --overwrite)")
        for sub in ("arrow", "jsonl"):
            shutil.rmtree(out / sub, ignore_errors=True)
        for name in ("prepared.json", "skipped.jsonl", "summary.json"):
            (out / name).unlink(missing_ok=True)
        if default_template:
            template_path.unlink(missing_ok=True)  # regenerate for the (maybe new) tokenizer
    out.mkdir(parents=True, exist_ok=True)
    return out


# Worker state: set before the fork so workers inherit the tokenizer instead of unpickling it per task.
_STATE: tuple[Any, ...] = ()


def _work(chunk):
    from relay.data.tokenize import prepare_batch

    kind, tokenizer, fmt, max_length = _STATE
    return prepare_batch(kind, chunk, tokenizer, fmt, max_length)


def prepare(opts: PrepareOptions, tokenizer=None) -> PrepareSummary:
    """Run the whole data step; raises DataFormatError on the first bad record unless skip_invalid."""
    global _STATE
    from relay.data.shards import write_prepared, write_skipped
    from relay.data.templates import ChatFormatter, load_template_config
    from relay.data.tokenize import ERROR, OK
    from relay.data.tokenizers import load_tokenizer

    if opts.kind not in KINDS:
        raise ValueError(f"kind: unknown data kind {opts.kind!r} (use one of {', '.join(KINDS)})")
    if opts.max_length is not None and opts.max_length < 2:
        raise ValueError(f"--max-length must be at least 2, got {opts.max_length}")
    if opts.num_proc < 1 or opts.num_shards < 1:
        raise ValueError("--num-proc and --num-shards must be at least 1")
    t0 = time.perf_counter()
    # first: a tokenizer that is not local (a hub id) fails in one line before OUT is touched
    tok = tokenizer if tokenizer is not None else load_tokenizer(opts.tokenizer, "--tokenizer")
    fp = fingerprint(opts)  # before OUT changes (a default template config there is regenerated)
    default_template = opts.template_config is None
    template_path = Path(opts.template_config or Path(opts.output) / DEFAULT_TEMPLATE_NAME)
    out = _prepare_output(opts, template_path, default_template)
    summary = PrepareSummary(opts.kind, str(out))
    counts: Counter[str] = Counter()
    skipped: list[dict[str, Any]] = []

    fmt = None
    if opts.kind != "ptx":  # ptx is plain text: no chat template
        cfg, created = load_template_config(template_path, tok, system_message=opts.system_message)
        fmt = ChatFormatter(tok, cfg)
        summary.template_config, summary.template_created = str(template_path), created
        if created:
            print(f"relay prepare: no template config at {template_path}: wrote an auto-generated one there",
                  file=sys.stderr)
    t1 = time.perf_counter()

    # Read and validate.
    items: list[tuple[dict[str, Any], Any]] = []  # (provenance, record)
    seen: dict[str, dict[str, Any]] = {}
    for path in opts.inputs:
        for raw in _progress(iter_raw_records(path, opts.split), None, f"reading {path}", opts.progress):
            summary.records_read += 1
            where = {"file": raw.file, "record": raw.index, "line": raw.line}
            try:
                rec = normalize(opts.kind, raw)
            except DataFormatError as e:
                if not opts.skip_invalid:
                    raise
                counts["invalid"] += 1
                skipped.append({"category": "invalid", **e.to_dict()})
                continue
            if rec.trimmed_turns:
                counts["trailing_turn_dropped" if opts.kind == "sft" else "trailing_answer_dropped"] += 1
            if opts.dedup:
                key = record_key(rec)
                if key in seen:
                    counts["duplicate"] += 1
                    first = seen[key]
                    skipped.append({"category": "duplicate", **where,
                                    "reason": f"exact duplicate of {first['file']} record {first['record']}"})
                    continue
                seen[key] = where
            items.append((where, rec))
    if opts.limit is not None and len(items) > opts.limit:
        counts["dropped_by_limit"] += len(items) - opts.limit
        items = items[: opts.limit]
    if opts.shuffle:
        random.Random(opts.seed).shuffle(items)
    t2 = time.perf_counter()

    # Tokenise: worker processes get chunks; results come back in order, so the output is the same for any
    # --num-proc.
    chunks = [items[i : i + CHUNK] for i in range(0, len(items), CHUNK)]
    _STATE = (opts.kind, tok, fmt, opts.max_length)
    results = []
    bar = _progress(None, len(items), "tokenizing", opts.progress) if opts.progress else None
    try:
        if opts.num_proc == 1 or len(chunks) <= 1:
            stream = map(_work, ([r for _, r in c] for c in chunks))
            pool = None
        else:
            # fork: workers inherit the loaded tokenizer; TOKENIZERS_PARALLELISM=false keeps that safe.
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            gc.freeze()  # keep the workers' garbage collector off the inherited pages (copy-on-write)
            pool = multiprocessing.get_context("fork").Pool(opts.num_proc)
            gc.unfreeze()
            stream = pool.imap(_work, ([r for _, r in c] for c in chunks))
        for chunk, outcomes in zip(chunks, stream):
            results.extend(zip((w for w, _ in chunk), outcomes))
            if bar is not None:
                bar.update(len(chunk))
        if pool is not None:
            pool.close()
            pool.join()
    finally:
        _STATE = ()
        if bar is not None:
            bar.close()
    t3 = time.perf_counter()

    rows = []
    for where, oc in results:
        if oc.status == ERROR:
            err = DataFormatError(where["file"], where["record"], "<template>", oc.error or "", where["line"])
            if not opts.skip_invalid:
                raise err
            counts["error_template"] += 1
            skipped.append({"category": "template", **err.to_dict()})
            continue
        if oc.row is None:
            counts[oc.status] += 1
            reason = {"dropped_too_long": f"longer than --max-length {opts.max_length} with no reply left",
                      "dropped_no_labels": "no assistant tokens"}.get(oc.status, oc.status)
            skipped.append({"category": oc.status, **where, "reason": reason})
            continue
        if oc.status != OK:
            counts[oc.status] += 1
        rows.append(oc.row)
    summary.written = len(rows)
    summary.counts = dict(counts)
    info = {
        "tokenizer": str(opts.tokenizer),
        "vocab_size": len(tok),
        "eos_token": tok.eos_token,
        "pad_token": tok.pad_token,
        "template_config": json.loads(template_path.read_text()) if fmt is not None else None,
        "max_length": opts.max_length,
        "seed": opts.seed,
        "inputs": [str(p) for p in opts.inputs],
        "fingerprint": fp,
        "summary": {"records_read": summary.records_read, "written": summary.written, "counts": summary.counts},
    }
    write_prepared(rows, out, opts.kind, opts.num_shards, info)
    write_skipped(skipped, out)
    t4 = time.perf_counter()
    summary.seconds = {"setup": t1 - t0, "read": t2 - t1, "tokenize": t3 - t2, "write": t4 - t3, "total": t4 - t0}
    (out / "summary.json").write_text(json.dumps(asdict(summary), indent=2) + "\n", encoding="utf-8")
    return summary


def fingerprint(opts: PrepareOptions) -> dict[str, Any]:
    """What a prepared folder depends on: the options that change its content, and each input file's size and
    modification time (and the template config's text when the user gave one)."""
    files = []
    for path in opts.inputs:
        p = Path(path)
        found = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else []
        files += [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in found] or [[str(path), None, None]]
    template = None
    if opts.template_config and Path(opts.template_config).exists():
        template = Path(opts.template_config).read_text(encoding="utf-8")
    keep = {k: v for k, v in asdict(opts).items() if k not in ("progress", "overwrite", "num_proc", "num_shards")}
    return {"options": keep, "files": files, "template_config": template}


def prepare_cached(opts: PrepareOptions, tokenizer=None) -> tuple[PrepareSummary, bool]:
    """`prepare` for pipelines: reuse OUT when it was prepared from the same inputs and options; returns
    (summary, reused). Otherwise (re)builds OUT, replacing what was there."""
    from relay.data.shards import read_info

    fp = fingerprint(opts)
    info = read_info(opts.output) if Path(opts.output).is_dir() else None
    summary_file = Path(opts.output) / "summary.json"
    if info and info.get("fingerprint") == json.loads(json.dumps(fp)) and summary_file.exists():
        return PrepareSummary(**json.loads(summary_file.read_text(encoding="utf-8"))), True
    return prepare(dataclasses.replace(opts, overwrite=True), tokenizer=tokenizer), False


# ------------------------------------------------------------------------------------------------ CLI


def _inputs(values: list[str]) -> list[str]:
    # The seed takes a comma-separated list; accept that and repeated/space-separated paths.
    return [p for v in values for p in v.split(",") if p]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="relay prepare",
        description="Prepare raw data (JSON/JSONL files or folders, HF datasets) into arrow + jsonl shards.",
    )
    p.add_argument("kind", choices=KINDS, help="sft | preference (RM, DPO) | prompt (PPO) | ptx (pretraining mix-in)")
    p.add_argument("-i", "--input", dest="inputs", nargs="+", action="extend", required=True,
                   help="files, folders, save_to_disk folders or `hf:NAME`; repeat or separate with commas")
    p.add_argument("-o", "--output", required=True, help="output folder OUT (gets arrow/, jsonl/, skipped.jsonl)")
    p.add_argument("-t", "--tokenizer", default="smollm2",
                   help="tokenizer folder, or `smollm2` / `tiny` / `gpt2` (default smollm2); hub ids are refused")
    p.add_argument("-c", "--template-config", default=None,
                   help=f"conversation template config JSON; written there if missing (default OUT/{DEFAULT_TEMPLATE_NAME})")
    p.add_argument("--system-message", default=None, help="system message of an auto-generated template config")
    p.add_argument("--max-length", type=int, default=2048, help="maximum tokens per sample (default 2048; 0 = none)")
    p.add_argument("--num-proc", type=int, default=1, help="tokenizer worker processes (default 1)")
    p.add_argument("--dedup", action="store_true", help="drop exact duplicate records (counted)")
    p.add_argument("--num-shards", type=int, default=1, help="number of arrow/jsonl parts (default 1)")
    p.add_argument("--seed", type=int, default=42, help="shuffle seed (default 42)")
    p.add_argument("--no-shuffle", action="store_true", help="keep the input order")
    p.add_argument("--skip-invalid", action="store_true",
                   help="skip bad records (reported in OUT/skipped.jsonl) instead of stopping at the first")
    p.add_argument("--overwrite", action="store_true", help="replace earlier output in OUT")
    p.add_argument("--split", default="train", help="split of a Hugging Face dataset input (default train)")
    p.add_argument("--limit", type=int, default=None, help="keep only the first N valid records")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    opts = PrepareOptions(
        kind=args.kind, inputs=_inputs(args.inputs), output=args.output, tokenizer=args.tokenizer,
        template_config=args.template_config, max_length=args.max_length or None, num_proc=args.num_proc,
        dedup=args.dedup, num_shards=args.num_shards, seed=args.seed, shuffle=not args.no_shuffle,
        skip_invalid=args.skip_invalid, overwrite=args.overwrite, split=args.split,
        system_message=args.system_message, limit=args.limit, progress=not args.quiet,
    )
    from relay.data.templates import TemplateConfigError

    try:
        summary = prepare(opts)
    except (DataFormatError, TemplateConfigError) as e:
        print(f"relay prepare: error: {e}", file=sys.stderr)
        if not opts.skip_invalid and isinstance(e, DataFormatError):
            print("  (use --skip-invalid to skip such records and get a report)", file=sys.stderr)
        return 2
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"relay prepare: error: {e}", file=sys.stderr)
        return 2
    print(summary.format())
    report = Path(summary.output) / "skipped.jsonl"
    entries = report.read_text(encoding="utf-8").splitlines() if report.exists() else []
    if entries:
        print(f"skipped records ({len(entries)}; all of them in {report}):")
        for line in entries[:SHOW_SKIPPED]:
            e = json.loads(line)
            where = DataFormatError(e["file"], e["record"], e.get("field") or "-", e["reason"], e["line"]).where()
            field_part = f" field '{e['field']}':" if e.get("field") else ""
            print(f"  [{e['category']}] {where}:{field_part} {e['reason']}")
        if len(entries) > SHOW_SKIPPED:
            print(f"  ... and {len(entries) - SHOW_SKIPPED} more")
    return 0


def build_data_parser() -> argparse.ArgumentParser:
    from relay.data.demo import REJECTED_STYLES, DemoSizes

    p = argparse.ArgumentParser(prog="relay data", description="Demo data sets.")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="build SFT, preference, prompt and ptx data (+ held-out splits) from chitchat-dataset")
    d.add_argument("output", help="output folder: raw/<kind>.jsonl, and <kind>/ prepared shards with --tokenizer")
    dflt = DemoSizes()
    for kind, what in (("sft", "SFT conversations"), ("preference", "preference pairs"), ("prompt", "prompts"),
                       ("ptx", "ptx texts")):
        d.add_argument(f"--{kind}", type=int, default=getattr(dflt, kind), help=f"{what} (default %(default)s)")
    for kind in ("sft", "preference", "prompt"):
        d.add_argument(f"--{kind}-heldout", type=int, default=getattr(dflt, f"{kind}_heldout"),
                       help=f"held-out {kind} records, from conversations no training split uses (default %(default)s)")
    d.add_argument("--rejected", choices=REJECTED_STYLES, default=dflt.rejected,
                   help="how rejected replies are made: garbled (the chosen reply's words shuffled), off-topic (a "
                        "reply from another conversation of similar length) or mixed (default %(default)s)")
    d.add_argument("--max-turns", type=int, default=dflt.max_turns, help="turns kept per conversation (default %(default)s)")
    d.add_argument("--context-turns", type=int, default=dflt.context_turns,
                   help="turns of context before a reply in prompts and pairs (default %(default)s)")
    d.add_argument("--seed", type=int, default=0, help="seed for splitting and pairing (default 0)")
    _prepare_options(d)
    t = sub.add_parser("task", help="prompts of a verifiable task (relay/tasks/NAME.py): train and held-out splits")
    t.add_argument("name", help="task name, e.g. arithmetic")
    t.add_argument("output", help="output folder: raw/<split>.jsonl, and prompt/ + prompt_heldout/ with --tokenizer")
    t.add_argument("--train", type=int, default=1024, help="training prompts (default %(default)s)")
    t.add_argument("--heldout", type=int, default=64, help="held-out prompts (default %(default)s)")
    t.add_argument("--seed", type=int, default=0)
    _prepare_options(t)
    return p


def _prepare_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-t", "--tokenizer", default=None, help="also prepare each kind with this tokenizer")
    p.add_argument("--max-length", type=int, default=512, help="with --tokenizer: maximum tokens (default 512)")
    p.add_argument("--num-proc", type=int, default=1, help="with --tokenizer: worker processes (default 1)")


def data_main(argv: list[str] | None = None) -> int:
    args = build_data_parser().parse_args(argv)
    from relay.data.demo import DemoSizes, base_kind, write_demo, write_jsonl

    out = Path(args.output)
    if args.command == "task":
        from relay.tasks import find_task

        try:
            task = find_task(args.name)
        except ValueError as err:
            print(f"relay data task: {err}", file=sys.stderr)
            return 2
        files = {"prompt": write_jsonl(task.make_records(args.train, "train", args.seed), out / "raw" / "prompt.jsonl"),
                 "prompt_heldout": write_jsonl(task.make_records(args.heldout, "heldout", args.seed),
                                               out / "raw" / "prompt_heldout.jsonl")}
    else:
        sizes = DemoSizes(sft=args.sft, preference=args.preference, prompt=args.prompt, ptx=args.ptx,
                          max_turns=args.max_turns, sft_heldout=args.sft_heldout,
                          preference_heldout=args.preference_heldout, prompt_heldout=args.prompt_heldout,
                          context_turns=args.context_turns, rejected=args.rejected)
        try:
            files = write_demo(out / "raw", sizes, seed=args.seed)
        except ValueError as err:
            print(f"relay data demo: {err}", file=sys.stderr)
            return 2
    for kind, path in files.items():
        print(f"relay data {args.command}: {kind:<18} {path}")
    if args.tokenizer:
        from relay.data.tokenizers import load_tokenizer

        tok = load_tokenizer(args.tokenizer, "--tokenizer")
        template = out / DEFAULT_TEMPLATE_NAME
        template.unlink(missing_ok=True)  # one config for all kinds, generated for this tokenizer
        for kind, path in files.items():
            opts = PrepareOptions(base_kind(kind), [str(path)], str(out / kind), tokenizer=args.tokenizer,
                                  template_config=str(template), max_length=args.max_length,
                                  num_proc=args.num_proc, seed=args.seed, progress=False)
            print(prepare_cached(opts, tokenizer=tok)[0].format())
    return 0
