"""Data-preparation benchmark: all 7,168 chitchat conversations as SFT data, SmolLM2 tokenizer,
`relay prepare sft --num-proc 1` against `--num-proc 2`.

Every conversation goes in whole (speakers alternate; the first plays the user). Conversations nobody answered
(a single turn) are invalid SFT records and are skipped and counted (--skip-invalid), long ones are cut to
--max-length at a reply boundary. Each setting runs `--repeats` times on a fresh output folder; the table gives
the median wall time of the whole command (reading, validation, tokenisation, writing) and of the tokenisation
phase alone, and checks that both settings wrote identical rows.

    python benchmarks/bench_data_prep.py [--repeats 3] [--max-length 2048] [--out runs/bench_data_prep]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

for _k, _v in {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)


def build_input(path: Path) -> int:
    from relay.data.demo import chitchat_conversations, sft_record, write_jsonl

    convs = chitchat_conversations()
    write_jsonl([sft_record(c) for c in convs], path)
    return len(convs)


def run_once(src: Path, out: Path, num_proc: int, max_length: int, tokenizer) -> dict:
    from relay.launch.prepare_cmd import PrepareOptions, prepare

    opts = PrepareOptions("sft", [str(src)], str(out), tokenizer="smollm2", max_length=max_length,
                          num_proc=num_proc, skip_invalid=True, overwrite=True, progress=False)
    load = os.getloadavg()[0]
    r0 = (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    t = time.perf_counter()
    s = prepare(opts, tokenizer=tokenizer)
    wall = time.perf_counter() - t
    r1 = (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    cpu = sum((b.ru_utime + b.ru_stime) - (a.ru_utime + a.ru_stime) for a, b in zip(r0, r1))
    return {"wall_s": wall, "tokenize_s": s.seconds["tokenize"], "cpu_s": cpu, "load_before": load,
            "read": s.records_read, "written": s.written, "counts": s.counts}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--out", default=None, help="where to write results.json (default: a temp folder)")
    args = ap.parse_args(argv)

    from relay.data.shards import load_prepared
    from relay.data.tokenizers import load_smollm2_tokenizer

    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_data_prep_"))
    work.mkdir(parents=True, exist_ok=True)
    src = work / "chitchat_sft.jsonl"
    n = build_input(src)
    tok = load_smollm2_tokenizer()
    results: dict[int, list[dict]] = {1: [], 2: []}
    for rep in range(args.repeats):
        for num_proc in (1, 2):  # interleaved, so background load hits both settings alike
            r = run_once(src, work / f"out_np{num_proc}", num_proc, args.max_length, tok)
            results[num_proc].append(r)
            print(f"repeat {rep} num_proc {num_proc}: {r['wall_s']:.2f} s (tokenize {r['tokenize_s']:.2f} s, "
                  f"CPU {r['cpu_s']:.2f} s, load average before {r['load_before']:.2f})", file=sys.stderr)
    same = load_prepared(work / "out_np1").to_list() == load_prepared(work / "out_np2").to_list()
    ds = load_prepared(work / "out_np1")
    tokens = sum(len(x) for x in ds["input_ids"])
    labelled = sum(sum(1 for v in x if v != -100) for x in ds["labels"])

    summary = {"conversations": n, "max_length": args.max_length, "rows_written": len(ds), "tokens": tokens,
               "labelled_tokens": labelled, "counts": results[1][0]["counts"], "identical_outputs": same,
               "cpus": os.cpu_count(), "python": platform.python_version(), "repeats": args.repeats, "settings": {}}
    print(f"\nchitchat SFT: {n} conversations -> {len(ds)} samples, {tokens} tokens ({labelled} labelled), "
          f"max_length {args.max_length}; {os.cpu_count()} CPUs")
    print(f"dropped/changed: {summary['counts']}")
    print(f"{'num_proc':>8} {'wall s median':>14} {'(min)':>7} {'tokenize s':>11} {'CPU s':>7} "
          f"{'conv/s':>7} {'tokens/s':>9}")
    for num_proc, rs in results.items():
        wall = statistics.median(r["wall_s"] for r in rs)
        tokz = statistics.median(r["tokenize_s"] for r in rs)
        cpu = statistics.median(r["cpu_s"] for r in rs)
        summary["settings"][num_proc] = {
            "wall_s": [round(r["wall_s"], 3) for r in rs], "median_wall_s": wall, "min_wall_s": min(r["wall_s"] for r in rs),
            "median_tokenize_s": tokz, "median_cpu_s": cpu, "load_before": [round(r["load_before"], 2) for r in rs]}
        print(f"{num_proc:>8} {wall:>14.2f} {min(r['wall_s'] for r in rs):>7.2f} {tokz:>11.2f} {cpu:>7.2f} "
              f"{n / wall:>7.0f} {tokens / wall:>9.0f}")
    speed = summary["settings"][1]["median_wall_s"] / summary["settings"][2]["median_wall_s"]
    summary["speedup_2_vs_1"] = speed
    print(f"speed-up of --num-proc 2: {speed:.2f}x (whole command); outputs identical: {same}")
    (work / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"results: {work / 'results.json'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
