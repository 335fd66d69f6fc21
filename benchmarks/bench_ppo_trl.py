"""PPO benchmark: Relay's PPO system in PPO mode (GAE, critic, reference, reward model) against TRL 1.12's
PPOTrainer (the last TRL that has one: `trl.experimental.ppo`), samples/s on SmolLM2-135M.

Matched on both sides: the same prompt token ids (the demo prompt set, last `--max-prompt-tokens` tokens), one
sample per prompt, `--prompts-per-step` prompts per PPO update in micro-batches of `--micro-batch` with
gradient accumulation, at most `--max-new-tokens` new tokens (temperature 1, stop at EOS), one PPO epoch over
one mini-batch, KL penalty `--kl-coef` in the reward, policy and reference from SmolLM2, reward and value models
= SmolLM2 with a fresh one-output head, fp32 everywhere, AdamW at the same learning rate, 1 thread per process.

TRL runs first, alone (a subprocess with .venv-bench's python and `.venv-bench/trl-ppo` on its path; its first
update is a warm-up); then Relay starts its system (1 vLLM generator, 1-rank ddp actor and critic groups,
reference and reward actors) and runs `--steps` episodes in sync mode (the first is a warm-up). samples/s =
samples per update / update seconds, medians.

    make bench-env && python -m benchmarks.bench_ppo_trl [--steps 3] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks.common import set_bench_env, write_results

set_bench_env()

REPO = Path(__file__).resolve().parents[1]


def run_trl(args, model_dir: Path, prompts_json: Path, out: Path) -> dict:
    venv = REPO / args.bench_venv
    if not (venv / "bin" / "python").exists() or not (venv / "trl-ppo").is_dir():
        raise SystemExit(f"{venv} (with trl-ppo/) missing: run `make bench-env` first")
    cmd = [str(venv / "bin" / "python"), str(REPO / "benchmarks" / "trl_ppo_worker.py"), "--model", str(model_dir),
           "--reward", str(model_dir), "--prompts", str(prompts_json), "--out", str(out), "--steps", str(args.steps),
           "--prompts-per-step", str(args.prompts_per_step), "--max-new-tokens", str(args.max_new_tokens),
           "--micro-batch", str(args.micro_batch), "--lr", str(args.lr), "--kl-coef", str(args.kl_coef)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(venv / "trl-ppo"))
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=3600)
    if proc.returncode:
        print(proc.stderr[-4000:], file=sys.stderr)
        raise RuntimeError(f"TRL PPO worker failed ({proc.returncode})")
    res = json.loads(out.read_text())
    for s in res["steps"]:
        print(f"  trl   step {s['step']}: {s['wall_s']:.2f} s, load {s['load']:.2f}", file=sys.stderr, flush=True)
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
    ap.add_argument("--trl-result", default=None, help="reuse a trl.json from an earlier run instead of running TRL")
    ap.add_argument("--out", default="runs/bench_ppo_trl")
    args = ap.parse_args(argv)

    from relay.config import load_config, validate
    from relay.data.shards import load_prepared
    from relay.launch.cluster import init_ray
    from relay.launch.ppo import PPOSystem
    from relay.models.smollm2 import prepare_smollm2

    from benchmarks.bench_ppo import demo_prompts

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model_dir = prepare_smollm2()
    prompt_dir = demo_prompts(out / "data" / "demo", "smollm2")
    prompts = [list(map(int, r["input_ids"]))[-args.max_prompt_tokens:] for r in load_prepared(prompt_dir, "prompt")]
    prompts_json = out / "prompts.json"
    prompts_json.write_text(json.dumps(prompts))

    if args.trl_result:
        trl = json.loads(Path(args.trl_result).read_text())
    else:
        trl = run_trl(args, model_dir, prompts_json, out / "trl.json")
    trl_steps = trl["steps"][1:]

    sets = [f"prompt_dataset={prompt_dir}", f"save_dir={out / 'relay_run'}", "logging.use_tensorboard=false",
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
            "critic_optim.warmup_steps=0", "save_interval=0", "placement=separate"]
    cfg = load_config("ppo", REPO / "configs/ppo_tiny.yaml", sets)
    validate(cfg, "cpu")
    init_ray(address="local", num_cpus=16, include_dashboard=False)
    system = PPOSystem(cfg)
    try:
        system.start()
        records = system.run_episodes()
    finally:
        system.close()
    for i, r in enumerate(records):
        print(f"  relay ep {r['episode']}: {r['episode_s']:.2f} s (gen {r['gen_s']:.2f}, score {r['score_s']:.2f}, "
              f"update {r['update_s']:.2f}, sync {r['sync_s']:.3f}){' [warm-up]' if i == 0 else ''}",
              file=sys.stderr, flush=True)
    relay_steps = records[1:]

    n = args.prompts_per_step
    trl_s = statistics.median(s["wall_s"] for s in trl_steps)
    relay_s = statistics.median(r["episode_s"] for r in relay_steps)
    rows = [{"side": "TRL PPOTrainer 1.12", "step_s": trl_s, "samples_per_s": n / trl_s,
             "load": statistics.median(s["load"] for s in trl_steps)},
            {"side": "Relay PPO sync", "step_s": relay_s, "samples_per_s": n / relay_s,
             "gen_s": statistics.median(r["gen_s"] for r in relay_steps),
             "score_s": statistics.median(r["score_s"] for r in relay_steps),
             "update_s": statistics.median(r["update_s"] for r in relay_steps), "load": os.getloadavg()[0]}]
    print(f"\nPPO (GAE), SmolLM2-135M fp32, {n} prompts x 1 sample x <= {args.max_new_tokens} tokens per update, "
          f"micro-batch {args.micro_batch}, 1 thread/process (medians)")
    print(f"{'side':20s} {'s/step':>8s} {'samples/s':>10s} {'vs TRL':>7s}")
    for r in rows:
        r["ratio"] = r["samples_per_s"] / rows[0]["samples_per_s"]
        print(f"{r['side']:20s} {r['step_s']:8.2f} {r['samples_per_s']:10.3f} {r['ratio']:6.2f}x")
    write_results(out, {"benchmark": "ppo_vs_trl", "args": vars(args), "rows": rows, "trl": trl,
                        "relay_episodes": records})
    return 0


if __name__ == "__main__":
    sys.exit(main())
