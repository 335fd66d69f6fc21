"""GRPO benchmark: Relay's PPO system in GRPO mode against TRL's GRPOTrainer, samples/s, SmolLM2-135M.

Matched settings on both sides: the same prompts (the demo prompt set, chat template applied; TRL gets them as
text and re-tokenizes), `--prompts-per-step` prompts x `--generations` samples per optimizer step, at most
`--max-new-tokens` new tokens (temperature 1), the same rule reward (share of response tokens with id < 512,
EOS excluded: `relay.actors.scorers:low_token_share`, copied into the TRL worker), no KL term (TRL beta=0,
Relay kl_coef=0), micro-batch `--micro-batch` with gradient accumulation to one optimizer step per batch, fp32
training and fp32 generation, AdamW at the same learning rate, 1 thread per Relay process.

TRL runs in the peer environment (`make bench-env`) as a subprocess (`benchmarks/trl_grpo_worker.py`) at each
of `--trl-threads` (default 1 and 2: both are printed, Relay is compared with the best); its first step is a
warm-up. Then Relay runs one `PPOSystem` (advantage_estimator=grpo, 1 vLLM generator, 1-rank ddp actor group,
`placement=separate`) in sync mode, then async mode (generation of the next batch overlaps the update), and
closes it before the next system starts (one Relay system at a time, none while TRL runs); the first episode of
each block is a warm-up. The sides alternate `--repeats` times; samples/s = completions per
optimizer step / step seconds, medians over counted steps.

`--learner-ranks 1,2` runs every Relay block once per rank count of the actor group (ddp, a process per rank;
the blocks at N > 1 are named '... dpN' and run on systems of their own, with accumulation steps scaled so that
an optimizer step still takes every sample of the batch): on a 2-core CPU two 1-thread ranks update faster than
one rank with both cores' threads, whose small matmuls and elementwise kernels gain little from a second thread.

Relay's update is also reported against the hardware: its matmul FLOPs (`relay.models.flops.update_flops` over
the episode's `update_*tokens` metrics) / `update_s`, as a fraction of this machine's matmul rate at each rank's
thread count times the ranks (`benchmarks.matmul_rate`, measured just before Relay's first block and after its
last, averaged; the bf16 rate when algo.update_autocast puts the update in bf16).

With `--bf16-block` a further sync block runs the update under bf16 autocast (`algo.update_autocast=bf16`), and
TRL runs again at each thread count with `bf16=True` (its autocast), only where the CPU computes bf16 natively.
With `--timeshare-block` a further sync block runs on a second system started with `placement=timeshare` (what
`placement: auto` picks on CPU): its engine starts with every core of the machine and its update takes every
core while the engine waits; its update is compared with the matmul rate at that thread count. With both, a
last sync block runs a third system in timeshare with bf16 generation and the update under bf16 autocast.
Relay is compared with TRL at its best, over thread counts and (with `--bf16-block`) precisions.

    make bench-env && python -m benchmarks.bench_grpo_trl [--repeats 1] [--steps 3] [--trl-threads 1,2] [--bf16-block]
        [--timeshare-block] [--no-async] [--learner-ranks 1,2] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import int_list, set_bench_env, write_results

set_bench_env()

REPO = Path(__file__).resolve().parents[1]


def run_trl(args, model_dir: Path, prompts_json: Path, out: Path, threads: int, bf16: bool = False) -> dict:
    py = REPO / args.bench_venv / "bin" / "python"
    if not py.exists():
        raise SystemExit(f"{py} missing: run `make bench-env` first")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    cmd = [str(py), str(REPO / "benchmarks" / "trl_grpo_worker.py"), "--model", str(model_dir), "--prompts",
           str(prompts_json), "--out", str(out), "--steps", str(args.steps), "--prompts-per-step",
           str(args.prompts_per_step), "--generations", str(args.generations), "--max-new-tokens",
           str(args.max_new_tokens), "--micro-batch", str(args.micro_batch), "--lr", str(args.lr), "--threads",
           str(threads)] + (["--bf16"] if bf16 else [])
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=3600)
    if proc.returncode:
        print(proc.stderr[-4000:], file=sys.stderr)
        raise RuntimeError(f"TRL worker failed ({proc.returncode})")
    res = json.loads(out.read_text())
    res["process_s"] = time.perf_counter() - t
    for s in res["steps"]:
        print(f"  trl   {threads} thread(s){' bf16' if bf16 else ''} step {s['step']}: {s['wall_s']:.2f} s, load {s['load']:.2f}", file=sys.stderr,
              flush=True)
    return res


def block_ranks(mode: str) -> int:
    """Actor-group ranks of a block: N for a block named '... dpN', else 1."""
    last = mode.split()[-1]
    return int(last[2:]) if last.startswith("dp") else 1


def block_bf16(mode: str) -> bool:
    return "bf16" in mode.split()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per block and side (first = warm-up)")
    ap.add_argument("--prompts-per-step", type=int, default=8)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--max-prompt-tokens", type=int, default=256, help="prompts keep their last N tokens")
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--learner-ranks", type=int_list, default="1,2",
                    help="comma-separated data-parallel rank counts of Relay's actor group (ddp, a process per "
                         "rank: 1 thread each in separate placement, the node's cores shared out in timeshare); "
                         "every block runs at each count (blocks at N > 1 are named '... dpN')")
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--trl-threads", type=int_list, default="1,2",
                    help="comma-separated thread counts TRL runs at (each printed; Relay is compared with the best)")
    ap.add_argument("--no-async", action="store_true", help="skip Relay's async block")
    ap.add_argument("--timeshare-block", action="store_true", help="also a sync block with placement=timeshare (the "
                    "update takes every core)")
    ap.add_argument("--trl-result", default=None, help="reuse a trl_rep*.json from an earlier run instead of running "
                                                        "TRL (the two sides are then not interleaved: say so)")
    ap.add_argument("--no-matmul-rate", action="store_true", help="skip measuring the machine's matmul rate")
    ap.add_argument("--bf16-block", action="store_true", help="also a sync block with algo.update_autocast=bf16 "
                                                              "(skipped where the CPU lacks native bf16)")
    ap.add_argument("--bench-venv", default=".venv-bench")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra Relay config override")
    ap.add_argument("--out", default="runs/bench_grpo_trl")
    args = ap.parse_args(argv)

    from relay.config import load_config, validate
    from relay.data.shards import load_prepared
    from relay.launch.cluster import init_ray
    from relay.launch.ppo import PPOSystem
    from relay.launch.role_memory import peak_memory_by_role
    from relay.models.smollm2 import prepare_smollm2
    from transformers import AutoTokenizer

    from benchmarks.bench_ppo import demo_prompts
    from benchmarks.matmul_rate import bf16_skip_reason, matmul_rate, model_config, rate_line
    from relay.learners.autocast import resolve_autocast
    from relay.models.flops import achieved_gflops, param_split, update_flops

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model_dir = prepare_smollm2()
    prompt_dir = demo_prompts(out / "data" / "demo", "smollm2")
    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = [tok.decode(list(r["input_ids"])[-args.max_prompt_tokens:], skip_special_tokens=False) for r in load_prepared(prompt_dir, "prompt")]
    prompts_json = out / "prompts.json"
    prompts_json.write_text(json.dumps(texts))

    n = args.prompts_per_step * args.generations
    sets = [f"prompt_dataset={prompt_dir}", "logging.use_tensorboard=false",
            "cluster.timeout_s=1800", "actor.pretrain=smollm2", "actor_learner.plugin=ddp",
            "generation.num_generators=1", "generation.dtype=float32",
            f"generation.max_new_tokens={args.max_new_tokens}", f"generation.n_samples_per_prompt={args.generations}",
            "generation.temperature=1.0", f"generation.max_prompt_length={args.max_prompt_tokens}", "generation.top_p=1.0",
            "reward.kind=rule", "reward.rule=relay.actors.scorers:low_token_share",
            "algo.advantage_estimator=grpo", f"algo.experience_batch_size={args.prompts_per_step}",
            f"algo.train_batch_size={args.micro_batch}",
            "algo.num_update_steps=1", "algo.num_collect_steps=1", "algo.kl_coef=0.0", "algo.num_episodes=100000",
            f"actor_optim.lr={args.lr}", "actor_optim.warmup_steps=0", "save_interval=0",
            "placement=separate"] + args.sets  # the timeshare blocks have systems of their own
    rank_counts = args.learner_ranks

    def rank_sets(ranks: int) -> list[str]:  # accumulation keeps n samples per optimizer step at any dp size
        return [f"actor_learner.num_ranks={ranks}", f"algo.accumulation_steps={n // (args.micro_batch * ranks)}"]

    cfg = load_config("ppo", REPO / "configs/ppo_tiny_grpo.yaml", rank_sets(rank_counts[0]) + sets)
    validate(cfg, "cpu")

    thread_counts = args.trl_threads
    if args.trl_result:
        thread_counts = thread_counts[:1]
    learner_threads = cfg.actor_learner.num_threads
    from relay.cpu import usable_cores

    cores = usable_cores()
    rates: dict[int, list[dict]] = {}
    init_ray(address="local", num_cpus=16, include_dashboard=False)
    cfg_autocast = cfg.algo.update_autocast
    base_blocks = (["sync"] + (["sync bf16"] if args.bf16_block else []) + ([] if args.no_async else ["async"])
                   + (["sync timeshare"] if args.timeshare_block else [])
                   + (["sync timeshare bf16"] if args.timeshare_block and args.bf16_block else []))
    blocks = [b if r == 1 else f"{b} dp{r}" for r in rank_counts for b in base_blocks]
    # torch threads of each update rank: in timeshare the node's cores are shared out over the ranks
    block_threads = {b: max(1, cores // block_ranks(b)) if "timeshare" in b else learner_threads for b in blocks}
    bf16_reason = bf16_skip_reason() if args.bf16_block else None
    if bf16_reason:
        print(f"bf16 blocks {bf16_reason}", file=sys.stderr)
        blocks = [b for b in blocks if not block_bf16(b)]
    trl_sides = [(t, False) for t in thread_counts] + [(t, True) for t in thread_counts
                                                        if args.bf16_block and not bf16_reason and not args.trl_result]
    trl_steps: dict[tuple[int, bool], list[dict]] = {side: [] for side in trl_sides}
    relay: dict[str, list[dict]] = {b: [] for b in blocks}
    trl_runs = []
    # One Relay system is up at a time (none while TRL runs): the idle processes and memory of another would
    # weigh on the timings. Timeshare blocks run on systems started in timeshare (the engine gets every core too:
    # its threads are fixed at start); "sync timeshare bf16" also generates in bf16 (a dtype fixed at start).
    kinds = {"separate": [], "timeshare": ["placement=timeshare"],
             "timeshare bf16": ["placement=timeshare", "generation.dtype=bfloat16"]}
    systems: dict[str, PPOSystem] = {}
    memory: dict[str, float] = {}

    def close(kind: str) -> None:
        if kind.split()[0] == "separate" and not memory:  # the memory figures: the first separate system's
            try:
                memory.update(peak_memory_by_role(systems[kind]))
            except Exception as err:  # noqa: BLE001 - a broken system must still close (and not hide the error)
                print(f"peak memory not read: {err!r}", file=sys.stderr)
        systems.pop(kind).close()

    def system_for(mode: str, rep: int) -> PPOSystem:
        ranks = block_ranks(mode)
        kind = ("timeshare bf16" if block_bf16(mode) else "timeshare") if "timeshare" in mode.split() else "separate"
        key = kind if ranks == 1 else f"{kind} dp{ranks}"
        for other in [k for k in systems if k != key]:
            close(other)
        if key not in systems:
            run_cfg = load_config("ppo", REPO / "configs/ppo_tiny_grpo.yaml", rank_sets(ranks) + sets + kinds[kind] + [
                f"save_dir={out / ('relay_' + key.replace(' ', '_') + f'_rep{rep}')}"])
            validate(run_cfg, "cpu")
            t = time.monotonic()
            systems[key] = PPOSystem(run_cfg).start()
            print(f"relay {key} system up in {time.monotonic() - t:.1f} s", file=sys.stderr, flush=True)
        return systems[key]

    try:
        for rep in range(args.repeats):
            for kind in list(systems):
                close(kind)
            for threads, bf16 in trl_sides:
                if args.trl_result:
                    res = json.loads(Path(args.trl_result).read_text()) if rep == 0 else {"steps": [{}]}
                else:
                    res = run_trl(args, model_dir, prompts_json,
                                  out / f"trl_rep{rep}_t{threads}{'_bf16' if bf16 else ''}.json", threads, bf16)
                trl_runs.append(dict(res, threads=threads, bf16=bf16))
                trl_steps[threads, bf16] += [dict(s, samples=res.get("samples_per_step", n)) for s in res["steps"][1:] if s]
            if not args.no_matmul_rate and not rates:  # next to Relay's blocks: under the load its update sees
                for t in sorted(set(block_threads.values())):
                    rates[t] = [matmul_rate(model_config(str(model_dir)), t)]
            for mode in blocks:
                runner = system_for(mode, rep)
                runner.cfg.algo.mode = mode.split()[0]
                runner.cfg.algo.update_autocast = "bf16" if block_bf16(mode) else cfg_autocast
                block = runner.run_episodes(until=runner.state.episode + args.steps)
                for i, r in enumerate(block):
                    r["load"] = round(os.getloadavg()[0], 2)
                    print(f"  relay {mode:23s} ep {r['episode']}: {r['episode_s']:.2f} s (gen {r['gen_s']:.2f}, score "
                          f"{r['score_s']:.2f}, update {r['update_s']:.2f}, sync {r['sync_s']:.3f}: push {r['sync_push_s']:.2f}: "
                          f"write {r['sync_write_s']:.2f} (serialize {r['sync_serialize_s']:.2f}, file {r['sync_file_s']:.2f}, put "
                          f"{r['sync_put_s']:.2f} while the generators load), load {r['sync_load_s']:.2f}, "
                          f"{r['sync_overwritten']} bucket(s) overwritten in place), "
                          f"{r['samples_per_s']:.3f} samples/s, load {r['load']}{' [warm-up]' if i == 0 else ''}",
                          file=sys.stderr, flush=True)
                    if i > 0:
                        relay[mode].append(r)
    finally:
        for kind in list(systems):
            close(kind)
    for t, measured in rates.items():
        measured.append(matmul_rate(model_config(str(model_dir)), t))

    rows = []
    for (threads, bf16), steps in trl_steps.items():
        if steps:
            rows.append({"side": f"TRL GRPOTrainer {threads}t{' bf16' if bf16 else ''}", "threads": threads, "bf16": bf16,
                         "samples_per_s": statistics.median(s["samples"] / s["wall_s"] for s in steps),
                         "step_s": statistics.median(s["wall_s"] for s in steps),
                         "load": statistics.median(s["load"] for s in steps), "steps": len(steps)})
    trl_best = max(rows, key=lambda r: r["samples_per_s"])
    trl_sps = trl_best["samples_per_s"]
    split = param_split(model_config(str(model_dir)))
    for mode, recs in relay.items():
        if recs:
            compute = "bf16" if block_bf16(mode) or resolve_autocast(cfg_autocast) else "fp32"
            ranks = block_ranks(mode)
            measured = rates.get(block_threads[mode])
            # ranks compute side by side: their ceiling is the sum of each rank's rate (memory bandwidth shared)
            ceiling = (ranks * statistics.mean(r[compute]["gflops"] for r in measured)
                       if measured and "gflops" in measured[0][compute] else None)
            for r in recs:
                r["update_gflops"] = achieved_gflops(update_flops(
                    split, int(r["update_tokens"]), int(r["update_logit_tokens"]), int(r["update_forward_tokens"]),
                    int(r["update_forward_logit_tokens"])), r["update_s"])
            row = {"side": f"Relay GRPO {mode}", "samples_per_s": statistics.median(r["samples_per_s"] for r in recs),
                   "step_s": statistics.median(r["episode_s"] for r in recs),
                   "load": statistics.median(r["load"] for r in recs), "steps": len(recs),
                   "gen_s": statistics.median(r["gen_s"] for r in recs),
                   "update_s": statistics.median(r["update_s"] for r in recs),
                   "sync_share": statistics.median(r["sync_share"] for r in recs),
                   "update_gflops": statistics.median(r["update_gflops"] for r in recs)}
            if ceiling:
                row.update(update_vs_matmul=row["update_gflops"] / ceiling, matmul_gflops=ceiling, matmul_dtype=compute,
                           update_threads=block_threads[mode], update_ranks=ranks)
            rows.append(row)
    print(f"\nGRPO, SmolLM2-135M fp32, {args.prompts_per_step} prompts x {args.generations} generations x <= "
          f"{args.max_new_tokens} tokens per step, micro-batch {args.micro_batch}, Relay's actor group of 1 rank "
          f"unless the block says dpN (medians)")
    for measured in rates.values():
        print(rate_line(measured[0]) + " before Relay's blocks; " + rate_line(measured[-1]).split(": ", 1)[1] + " after")
    print(f"{'side':34s} {'steps':>5s} {'s/step':>8s} {'samples/s':>10s} {'vs best TRL':>11s} {'load':>6s}")
    for r in rows:
        r["ratio"] = r["samples_per_s"] / trl_sps
        print(f"{r['side']:34s} {r['steps']:5d} {r['step_s']:8.2f} {r['samples_per_s']:10.3f} {r['ratio']:10.2f}x "
              f"{r['load']:6.2f}")
    for r in rows:
        if "update_vs_matmul" in r:
            print(f"{r['side']} update: {r['update_gflops']:.1f} GFLOP/s achieved = {r['update_vs_matmul']:.0%} of the "
                  f"measured {r['matmul_dtype']} matmul rate ({r['matmul_gflops']:.1f} GFLOP/s: {r['update_ranks']} "
                  f"rank(s) x {r['update_threads']} thread{'s' if r['update_threads'] != 1 else ''}) (goal >= 50%)")
    by_side = {r["side"]: r for r in rows}
    for suffix in [""] + [f" dp{r}" for r in rank_counts if r != 1]:
        sync, asyn = by_side.get(f"Relay GRPO sync{suffix}"), by_side.get(f"Relay GRPO async{suffix}")
        if sync and asyn:  # overlap can at best hide the shorter phase behind the longer one
            g, u = sync["gen_s"], sync["update_s"]
            limit = (g + u) / max(g, u)
            gain = asyn["samples_per_s"] / sync["samples_per_s"]
            asyn.update(overlap_limit=limit, async_vs_sync=gain)
            print(f"async vs sync{suffix}: {gain:.2f}x; overlap limit (g + u) / max(g, u) = ({g:.1f} + {u:.1f}) / "
                  f"{max(g, u):.1f} = {limit:.2f}x (g, u: generation and update seconds of the sync block, each on the "
                  f"core it has in async mode too); async reaches {gain / limit:.0%} of the limit (goal >= 90%)")
    best = max((r for r in rows if r["side"].startswith("Relay")), key=lambda r: r["samples_per_s"])
    print(f"Relay best ({best['side']}) / TRL at its best ({trl_best['side']}): {best['ratio']:.2f}x (goal >= 3x)")
    print("Relay peak resident memory per role (MiB): " + ", ".join(f"{k} {v:.0f}" for k, v in memory.items()))
    trl_peaks = {f"{r['threads']} thread(s){' bf16' if r.get('bf16') else ''}": r.get("peak_rss_mib") for r in trl_runs
                 if r.get("peak_rss_mib")}
    if trl_peaks:
        print("TRL peak resident memory (MiB, one process): " + ", ".join(f"{t} {v:.0f}" for t, v in trl_peaks.items()))
    write_results(out, {"benchmark": "grpo_vs_trl", "peak_rss_mib": memory, "model": "SmolLM2-135M-Instruct", "args": vars(args),
                        "rows": rows, "trl_best": trl_best["side"], "matmul_rates": rates,
                        "trl_runs": trl_runs, "relay_episodes": relay})
    return 0


if __name__ == "__main__":
    sys.exit(main())
