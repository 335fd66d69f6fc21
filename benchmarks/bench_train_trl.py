"""SFT and DPO benchmark: Relay's trainers (`relay.launch.train.train`, a 1-rank ddp learner group) against TRL's
SFTTrainer / DPOTrainer on SmolLM2-135M, samples/s (SFT) and pairs/s (DPO).

Matched: the same rows (demo SFT conversations / preference pairs prepared with the SmolLM2 tokenizer, only rows
that fit `--max-length` so neither side truncates; TRL gets Relay's token ids and loss masks), batch size,
steps, lr (constant), fp32. Each side runs at every count of `--threads` (default 1 and 2: all printed) and
is compared at its best. TRL at its best settings: no gradient checkpointing, DPO
with precomputed reference logprobs (Relay: `precompute_ref_logprobs: true`); the reference pass is outside the
timed steps on both sides. The first step of each side is a warm-up. TRL runs with .venv-bench's python
(`make bench-env`) as a subprocess; the sides alternate `--repeats` times.

    make bench-env && python -m benchmarks.bench_train_trl [--stages sft,dpo] [--steps 5] [--repeats 2] [--threads 1,2]

Where Relay's DPO lead comes from: each pair's shared prompt runs once (`shared_prompt_forward`; prompts are
~75% of the demo pairs' tokens), logits only where a label is predicted, and trailing padding trimmed per
micro-batch. SFT differs only in those last two, so it is close to TRL.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks.common import int_list, set_bench_env, write_results

set_bench_env()

REPO = Path(__file__).resolve().parents[1]


def first_label(labels) -> int:
    return next(i for i, v in enumerate(labels) if v != -100)


def select_rows(stage: str, data_dir: Path, n: int, max_length: int, tok=None) -> tuple[list[dict], list[dict]]:
    """Relay rows (prepared schema) and the same rows for TRL, all within max_length. TRL 1.16's DPOTrainer
    always tokenizes text itself, so DPO rows go to it as the decoded prompt/chosen/rejected of Relay's ids."""
    from relay.data.shards import load_prepared

    kind = "sft" if stage == "sft" else "preference"
    relay_rows, trl_rows = [], []
    for r in load_prepared(data_dir / kind, kind):
        if stage == "sft":
            if len(r["input_ids"]) > max_length or all(v == -100 for v in r["labels"]):
                continue
            trl_rows.append({"input_ids": list(r["input_ids"]), "labels": list(r["labels"])})
        else:
            c, j = list(r["chosen_input_ids"]), list(r["rejected_input_ids"])
            if max(len(c), len(j)) > max_length:
                continue
            pc, pr = first_label(r["chosen_labels"]), first_label(r["rejected_labels"])
            if pc != pr or c[:pc] != j[:pr]:
                continue  # TRL's format needs one shared prompt
            dec = lambda ids: tok.decode(ids, skip_special_tokens=False)  # noqa: E731
            trl_rows.append({"prompt": dec(c[:pc]), "chosen": dec(c[pc:]), "rejected": dec(j[pr:])})
        relay_rows.append(r)
        if len(relay_rows) == n:
            break
    return relay_rows, trl_rows


def run_trl(args, stage: str, model_dir: Path, rows_json: Path, out: Path, threads: int) -> dict:
    py = REPO / args.bench_venv / "bin" / "python"
    if not py.exists():
        raise SystemExit(f"{py} missing: run `make bench-env` first")
    cmd = [str(py), str(REPO / "benchmarks" / "trl_train_worker.py"), stage, "--model", str(model_dir), "--data",
           str(rows_json), "--out", str(out), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--max-length", str(args.max_length), "--lr", str(args.lr), "--threads", str(threads)]
    proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS=str(threads)), cwd=REPO, capture_output=True, text=True,
                          timeout=3600)
    if proc.returncode:
        print(proc.stderr[-4000:], file=sys.stderr)
        raise RuntimeError(f"TRL {stage} worker failed ({proc.returncode})")
    return json.loads(out.read_text())


def run_relay(args, stage: str, data: Path, save_dir: Path, threads: int) -> list[dict]:
    from relay.config import load_config, validate
    from relay.launch.train import train

    preset = {"sft": "configs/sft_tiny.yaml", "dpo": "configs/dpo_tiny.yaml"}[stage]
    sets = ["model.pretrain=smollm2", "learner.plugin=ddp", "learner.num_ranks=1", "learner.mixed_precision=fp32",
            "learner.grad_checkpoint=false", f"dataset=[{data}]", f"save_dir={save_dir}", "save_interval=0",
            f"batch_size={args.batch_size}", f"max_length={args.max_length}", f"max_steps={args.steps}",
            "accumulation_steps=1", f"optim.lr={args.lr}", "optim.warmup_steps=0", "optim.min_lr_ratio=1.0",
            "logging.use_tensorboard=false", "cluster.timeout_s=1800", f"learner.num_threads={threads}"]
    if stage == "dpo":
        sets += ["precompute_ref_logprobs=true", "loss_type=sigmoid", "beta=0.1"]
    cfg = load_config(stage, REPO / preset, sets)
    validate(cfg, "cpu")
    res = train(cfg, stage)
    return [{"step": h["step"], "wall_s": h["step_time"], "load": os.getloadavg()[0]} for h in res.history]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stages", default="sft,dpo")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="optimizer steps per side and block (first = warm-up)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--threads", type=int_list, default="1,2",
                    help="comma-separated torch thread counts each side runs at")
    ap.add_argument("--bench-venv", default=".venv-bench")
    ap.add_argument("--out", default="runs/bench_train_trl")
    args = ap.parse_args(argv)

    from relay.data.shards import write_prepared
    from relay.launch.cluster import init_ray
    from relay.models.smollm2 import prepare_smollm2

    from benchmarks.bench_ppo import demo_prompts

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model_dir = prepare_smollm2()
    demo = demo_prompts(out / "data" / "demo", "smollm2").parent
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    init_ray(address="local", num_cpus=16, include_dashboard=False)
    n = args.batch_size * args.steps
    thread_counts = args.threads
    times: dict[str, list[dict]] = {}
    for stage in [s for s in args.stages.split(",") if s]:
        relay_rows, trl_rows = select_rows(stage, demo, n, args.max_length, tok)
        if len(relay_rows) < n:
            raise SystemExit(f"{stage}: only {len(relay_rows)} rows fit max_length {args.max_length}")
        data = out / f"{stage}_rows"
        write_prepared(relay_rows, data, "sft" if stage == "sft" else "preference")
        rows_json = out / f"{stage}_trl_rows.json"
        rows_json.write_text(json.dumps(trl_rows))
        for rep in range(args.repeats):
            for threads in thread_counts:
                t = run_trl(args, stage, model_dir, rows_json, out / f"trl_{stage}_rep{rep}_t{threads}.json",
                            threads)["steps"]
                r = run_relay(args, stage, data, out / f"relay_{stage}_rep{rep}_t{threads}", threads)
                for side, steps in (("trl", t), ("relay", r)):
                    for s in steps:
                        print(f"  {side:5s} {stage} {threads}t step {s['step']}: {s['wall_s']:.2f} s, load "
                              f"{s['load']:.2f}{' [warm-up]' if s is steps[0] else ''}", file=sys.stderr, flush=True)
                    times.setdefault(f"{side}/{stage}/{threads}", []).extend(steps[1:])

    rows = []
    print(f"\nSFT/DPO, SmolLM2-135M fp32, batch {args.batch_size}, max length {args.max_length}, {args.steps} steps "
          f"(first = warm-up), medians; each side at its best thread count")
    print(f"{'stage':5s} {'threads':>7s} {'Relay s/step':>12s} {'TRL s/step':>11s} {'load':>6s}")
    for stage in [s for s in args.stages.split(",") if s]:
        med = {(side, th): statistics.median(s["wall_s"] for s in times[f"{side}/{stage}/{th}"])
               for side in ("relay", "trl") for th in thread_counts}
        for th in thread_counts:
            ld = statistics.median(s["load"] for side in ("relay", "trl") for s in times[f"{side}/{stage}/{th}"])
            print(f"{stage:5s} {th:7d} {med['relay', th]:12.2f} {med['trl', th]:11.2f} {ld:6.2f}")
        r_th = min(thread_counts, key=lambda th: med["relay", th])
        t_th = min(thread_counts, key=lambda th: med["trl", th])
        r, t = med["relay", r_th], med["trl", t_th]
        row = {"stage": stage, "relay_threads": r_th, "trl_threads": t_th, "relay_step_s": r, "trl_step_s": t,
               "relay_per_s": args.batch_size / r, "trl_per_s": args.batch_size / t, "ratio": t / r,
               "by_threads": {f"{side}/{th}": v for (side, th), v in med.items()}}
        rows.append(row)
        print(f"{stage:5s} best: Relay {r_th}t {row['relay_per_s']:.3f}/s, TRL {t_th}t {row['trl_per_s']:.3f}/s: "
              f"{row['ratio']:.2f}x")
    print("(SFT: samples/s; DPO: pairs/s; goals: DPO >= 1.5x, SFT >= 1.3x)")
    write_results(out, {"benchmark": "train_vs_trl", "args": vars(args), "rows": rows, "steps": times})
    return 0


if __name__ == "__main__":
    sys.exit(main())
