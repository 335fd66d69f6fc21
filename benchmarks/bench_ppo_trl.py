"""PPO benchmark: Relay's PPO system in PPO mode (GAE, critic, reference, reward model) against TRL 1.12's
PPOTrainer (the last TRL that has one: `trl.experimental.ppo`), samples/s on SmolLM2-135M.

Matched on both sides: the same prompt token ids (the demo prompt set, last `--max-prompt-tokens` tokens), one
sample per prompt, `--prompts-per-step` prompts per PPO update in micro-batches of `--micro-batch` with
gradient accumulation, at most `--max-new-tokens` new tokens (temperature 1, stop at EOS), one PPO epoch over
one mini-batch, KL penalty `--kl-coef` in the reward, policy and reference from SmolLM2, reward and value models
= SmolLM2 with a fresh one-output head, fp32 everywhere, AdamW at the same learning rate.

TRL runs first, alone, once per thread count of `--trl-threads` (a subprocess with .venv-bench's python and
`.venv-bench/trl-ppo` on its path; its first update is a warm-up); Relay is compared with TRL at its best. Then
Relay starts its system (1 vLLM generator, 1-rank ddp actor and critic groups, reference and reward actors)
once per placement of `--placements` and runs `--steps` episodes in sync mode (the first is a warm-up): with
`separate` every process keeps 1 thread; with `timeshare` (what `placement: auto` picks on CPU) the engine and
the learner groups take the machine's cores in turn. The critic's steps run beside the actor's
(`algo.overlap_critic`, the default; `--critic overlap,serial` also runs each placement with the critic after
the actor). With `--precisions fp32,bf16` TRL also runs with `bf16=True` (its autocast) at each thread count and
Relay with bf16 generation, reference and reward and the update under bf16 autocast (`BF16_SETS`), where the
CPU computes bf16 natively. samples/s = samples per update / update seconds, medians.

    make bench-env && python -m benchmarks.bench_ppo_trl [--steps 3] [--trl-threads 1,2]
        [--placements separate,timeshare] [--critic overlap,serial] [--precisions fp32,bf16] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks.common import int_list, name_list, set_bench_env, write_results

set_bench_env()

REPO = Path(__file__).resolve().parents[1]


# Relay in bf16: generation, reference and reward models in bf16, the actor's and critic's update under bf16
# autocast (fp32 weights and optimizer, as TRL's bf16=True).
BF16_SETS = ["generation.dtype=bfloat16", "reference.dtype=bfloat16", "reward.dtype=bfloat16",
             "algo.update_autocast=bf16"]


def run_trl(args, model_dir: Path, prompts_json: Path, out: Path, threads: int, bf16: bool = False) -> dict:
    venv = REPO / args.bench_venv
    if not (venv / "bin" / "python").exists() or not (venv / "trl-ppo").is_dir():
        raise SystemExit(f"{venv} (with trl-ppo/) missing: run `make bench-env` first")
    cmd = [str(venv / "bin" / "python"), str(REPO / "benchmarks" / "trl_ppo_worker.py"), "--model", str(model_dir),
           "--reward", str(model_dir), "--prompts", str(prompts_json), "--out", str(out), "--steps", str(args.steps),
           "--prompts-per-step", str(args.prompts_per_step), "--max-new-tokens", str(args.max_new_tokens),
           "--micro-batch", str(args.micro_batch), "--lr", str(args.lr), "--kl-coef", str(args.kl_coef),
           "--threads", str(threads)] + (["--bf16"] if bf16 else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(venv / "trl-ppo"))
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=3600)
    if proc.returncode:
        print(proc.stderr[-4000:], file=sys.stderr)
        raise RuntimeError(f"TRL PPO worker failed ({proc.returncode})")
    res = json.loads(out.read_text())
    for s in res["steps"]:
        print(f"  trl {threads}t{' bf16' if bf16 else ''} step {s['step']}: {s['wall_s']:.2f} s, load {s['load']:.2f}", file=sys.stderr, flush=True)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3, help="PPO updates per side (first = warm-up)")
    ap.add_argument("--prompts-per-step", type=int, default=16)
    ap.add_argument("--micro-batch", type=int, default=4, help="8 runs a 24 GB machine out of memory (two learners)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--max-prompt-tokens", type=int, default=256)
    ap.add_argument("--kl-coef", type=float, default=0.05)
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--bench-venv", default=".venv-bench")
    ap.add_argument("--trl-threads", type=int_list, default="1,2",
                    help="comma-separated thread counts TRL runs at (each printed; Relay is compared with the best)")
    ap.add_argument("--placements", type=name_list, default="separate,timeshare",
                    help="comma-separated Relay placements to run")
    ap.add_argument("--critic", type=name_list, default="overlap",
                    help="comma-separated: 'overlap' (critic steps beside the actor's, the default) and/or "
                         "'serial' (after it)")
    ap.add_argument("--precisions", type=name_list, default="fp32",
                    help="comma-separated: fp32 and/or bf16 (TRL with bf16=True, its autocast; Relay with bf16 "
                         "generation, reference and reward and the update under bf16 autocast; skipped where the "
                         "CPU lacks native bf16)")
    ap.add_argument("--trl-result", default=None, help="reuse a trl.json from an earlier run instead of running TRL "
                                                       "(its thread count is the one it was run at)")
    ap.add_argument("--out", default="runs/bench_ppo_trl")
    args = ap.parse_args(argv)

    from relay.config import load_config, validate
    from relay.data.shards import load_prepared
    from relay.launch.cluster import init_ray
    from relay.launch.ppo import PPOSystem
    from relay.models.smollm2 import prepare_smollm2

    from benchmarks.bench_ppo import demo_prompts
    from benchmarks.matmul_rate import bf16_skip_reason

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model_dir = prepare_smollm2()
    prompt_dir = demo_prompts(out / "data" / "demo", "smollm2")
    prompts = [list(map(int, r["input_ids"]))[-args.max_prompt_tokens:] for r in load_prepared(prompt_dir, "prompt")]
    prompts_json = out / "prompts.json"
    prompts_json.write_text(json.dumps(prompts))

    precisions = args.precisions
    if "bf16" in precisions and (reason := bf16_skip_reason()):
        print(f"bf16 skipped: {reason}", file=sys.stderr)
        precisions.remove("bf16")
    trl_runs = []
    if args.trl_result:
        trl_runs.append(json.loads(Path(args.trl_result).read_text()))
    else:
        for precision in precisions:
            for threads in args.trl_threads:
                suffix = "" if precision == "fp32" else f"_{precision}"
                trl_runs.append(run_trl(args, model_dir, prompts_json, out / f"trl_t{threads}{suffix}.json", threads,
                                        bf16=precision == "bf16"))

    sets = [f"prompt_dataset={prompt_dir}", "logging.use_tensorboard=false",
            "cluster.timeout_s=1800", "actor.pretrain=smollm2", "critic.pretrain=smollm2", "reward.kind=model",
            "reward.model=smollm2", "actor_learner.plugin=ddp", "actor_learner.num_ranks=1", "actor_learner.tp=1",
            "critic_learner.plugin=ddp", "critic_learner.num_ranks=1", "generation.num_generators=1",
            "generation.dtype=float32", f"generation.max_new_tokens={args.max_new_tokens}",
            "generation.n_samples_per_prompt=1", "generation.temperature=1.0", "generation.top_p=1.0",
            f"generation.max_prompt_length={args.max_prompt_tokens}", "algo.advantage_estimator=gae",
            f"algo.experience_batch_size={args.prompts_per_step}", f"algo.train_batch_size={args.micro_batch}",
            f"algo.accumulation_steps={args.prompts_per_step // args.micro_batch}", "algo.num_update_steps=1",
            "algo.num_collect_steps=1", f"algo.kl_coef={args.kl_coef}", f"algo.num_episodes={args.steps}",
            f"actor_optim.lr={args.lr}", f"critic_optim.lr={args.lr}", "actor_optim.warmup_steps=0",
            "critic_optim.warmup_steps=0", "save_interval=0"]
    init_ray(address="local", num_cpus=16, include_dashboard=False)
    records: dict[str, list[dict]] = {}
    systems = [(pr, p, c) for pr in precisions for p in args.placements for c in args.critic]
    for precision, placement, critic in systems:
        name = placement + ("" if critic == "overlap" else ", serial critic") + ("" if precision == "fp32" else " bf16")
        cfg = load_config("ppo", REPO / "configs/ppo_tiny.yaml",
                          sets + [f"placement={placement}", f"algo.overlap_critic={str(critic == 'overlap').lower()}",
                                  f"save_dir={out / f'relay_{placement}_{critic}_{precision}'}"]
                          + (BF16_SETS if precision == "bf16" else []))
        validate(cfg, "cpu")
        system = PPOSystem(cfg)
        try:  # one system at a time: its idle processes stay out of the next one's timings
            system.start()
            records[name] = system.run_episodes()
        finally:
            system.close()
        for i, r in enumerate(records[name]):
            print(f"  relay {name} ep {r['episode']}: {r['episode_s']:.2f} s (gen {r['gen_s']:.2f}, score "
                  f"{r['score_s']:.2f}, update {r['update_s']:.2f} of which actor and critic together "
                  f"{r.get('update_overlap_s', 0.0):.2f}, sync {r['sync_s']:.3f})"
                  f"{' [warm-up]' if i == 0 else ''}", file=sys.stderr, flush=True)

    n = args.prompts_per_step
    rows = []
    for trl in trl_runs:
        steps = trl["steps"][1:]
        trl_s = statistics.median(s["wall_s"] for s in steps)
        rows.append({"side": f"TRL PPOTrainer 1.12 {trl.get('threads', 1)}t{' bf16' if trl.get('bf16') else ''}",
                     "threads": trl.get("threads", 1), "bf16": trl.get("bf16", False),
                     "step_s": trl_s, "samples_per_s": n / trl_s, "load": statistics.median(s["load"] for s in steps)})
    trl_best = max(rows, key=lambda r: r["samples_per_s"])
    for placement, recs in records.items():
        steps = recs[1:]
        relay_s = statistics.median(r["episode_s"] for r in steps)
        rows.append({"side": f"Relay PPO sync {placement}", "step_s": relay_s, "samples_per_s": n / relay_s,
                     "gen_s": statistics.median(r["gen_s"] for r in steps),
                     "score_s": statistics.median(r["score_s"] for r in steps),
                     "update_s": statistics.median(r["update_s"] for r in steps),
                     "sync_s": statistics.median(r["sync_s"] for r in steps), "load": os.getloadavg()[0]})
    print(f"\nPPO (GAE), SmolLM2-135M {'/'.join(precisions)}, {n} prompts x 1 sample x <= {args.max_new_tokens} tokens per update, "
          f"micro-batch {args.micro_batch} (medians); ratios against TRL at its best "
          f"({trl_best['threads']} threads{', bf16' if trl_best['bf16'] else ', fp32'})")
    print(f"{'side':44s} {'s/step':>8s} {'samples/s':>10s} {'vs best TRL':>11s}")
    for r in rows:
        r["ratio"] = r["samples_per_s"] / trl_best["samples_per_s"]
        extra = (f"  (gen {r['gen_s']:.1f} s, score {r['score_s']:.1f} s, update {r['update_s']:.1f} s, "
                 f"sync {r['sync_s']:.1f} s)"
                 if "update_s" in r else "")
        print(f"{r['side']:44s} {r['step_s']:8.2f} {r['samples_per_s']:10.3f} {r['ratio']:10.2f}x{extra}")
    write_results(out, {"benchmark": "ppo_vs_trl", "args": vars(args), "rows": rows, "trl_runs": trl_runs,
                        "trl_best_threads": trl_best["threads"], "trl_best_bf16": trl_best["bf16"], "relay_episodes": records})
    return 0


if __name__ == "__main__":
    sys.exit(main())
