"""PPO system benchmark: weight-sync seconds as a share of an episode, and async against sync samples/s.

Runs Relay's own PPO driver (`relay.launch.ppo.PPOSystem`) on a preset (default `configs/ppo_tiny.yaml`: tiny
random Llama, 2 vLLM generators, tp=2 actor group, critic, rule reward) with demo prompts. One set of actors
serves both modes: blocks of `--sync-episodes` sync episodes and `--async-episodes` async episodes alternate
`--repeats` times. In async mode the first episode of each block has nothing generated ahead (it is a sync
episode in disguise) and is not counted; every other async episode trains on the batch generated while the
previous one trained. The first sync block is a warm-up and is not counted either.

Reported: median samples/s and episode seconds per mode, their ratio (goal >= 1.5x), and sync_s / episode_s
(goal <= 5%) per mode, with the load average at each episode's end.

    python -m benchmarks.bench_ppo [--preset configs/ppo_tiny.yaml] [--repeats 3] [--set key=value ...] [--out DIR]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import set_bench_env, write_results

set_bench_env()

REPO = Path(__file__).resolve().parents[1]


def demo_prompts(out: Path, tokenizer: str) -> Path:
    """`relay data demo OUT -t TOKENIZER` once; returns the prepared prompt folder."""
    folder = out / "prompt"
    if not (folder.exists() and any(folder.iterdir())):
        subprocess.run([sys.executable, "-m", "relay.launch.cli", "data", "demo", str(out), "-t", tokenizer],
                       check=True, cwd=REPO, capture_output=True, timeout=600)
    return folder


def build_cfg(preset: str, prompt_dir: Path, save_dir: Path, sets: list[str]):
    from relay.config import load_config, validate

    base = [f"prompt_dataset={prompt_dir}", f"save_dir={save_dir}", "logging.use_tensorboard=false",
            "cluster.timeout_s=900", "algo.num_episodes=100000", "save_interval=0",
            "placement=separate"]  # sync and async blocks on one system
    cfg = load_config("ppo", REPO / preset, base + list(sets))
    validate(cfg, "cpu")
    return cfg


def summarize(recs: list[dict]) -> dict:
    if not recs:
        return {}
    med = lambda k: statistics.median(r[k] for r in recs)  # noqa: E731
    total_s = sum(r["episode_s"] for r in recs)
    return {"episodes": len(recs), "samples_per_s_median": med("samples_per_s"),
            "samples_per_s_total": sum(r["samples"] for r in recs) / total_s, "episode_s_median": med("episode_s"),
            "sync_s_median": med("sync_s"), "sync_share_median": med("sync_share"), "gen_s_median": med("gen_s"),
            "score_s_median": med("score_s"), "update_s_median": med("update_s"), "load_median": med("load")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="configs/ppo_tiny.yaml")
    ap.add_argument("--tokenizer", default=None, help="demo prompt tokenizer (default: tiny, or smollm2 when the "
                                                          "preset's actor is smollm2)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sync-episodes", type=int, default=2)
    ap.add_argument("--async-episodes", type=int, default=3)
    ap.add_argument("--set", dest="sets", action="append", default=[], help="config override key=value")
    ap.add_argument("--out", default="runs/bench_ppo")
    args = ap.parse_args(argv)

    from relay.launch.cluster import init_ray
    from relay.launch.ppo import PPOSystem

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = args.tokenizer or ("smollm2" if "smollm2" in (REPO / args.preset).read_text() else "tiny")
    prompts = demo_prompts(out / f"data-{tokenizer}" / "demo", tokenizer)
    cfg = build_cfg(args.preset, prompts, out / "run", args.sets)
    init_ray(address="local", num_cpus=16, include_dashboard=False)
    system = PPOSystem(cfg)
    t0 = time.monotonic()
    recs: dict[str, list[dict]] = {"sync": [], "async": []}
    try:
        system.start()
        start_s = time.monotonic() - t0
        print(f"system up in {start_s:.1f} s", file=sys.stderr, flush=True)
        system.cfg.algo.mode = "sync"
        system.run_episodes(until=system.state.episode + 1)  # warm-up
        for rep in range(args.repeats):
            for mode, n in (("sync", args.sync_episodes), ("async", args.async_episodes)):
                system.cfg.algo.mode = mode
                block = system.run_episodes(until=system.state.episode + n)
                for i, r in enumerate(block):
                    r["load"] = round(os.getloadavg()[0], 2)
                    r["mode"] = mode
                    r["counted"] = mode == "sync" or i > 0
                    print(f"  rep {rep} {mode:5s} ep {r['episode']:3d}: {r['samples_per_s']:.3f} samples/s, episode "
                          f"{r['episode_s']:.2f} s (gen {r['gen_s']:.2f}, score {r['score_s']:.2f}, update "
                          f"{r['update_s']:.2f}, sync {r['sync_s']:.3f}), load {r['load']}"
                          f"{'' if r['counted'] else ' [not counted]'}", file=sys.stderr, flush=True)
                    if r["counted"]:
                        recs[mode].append(r)
    finally:
        system.close()

    s, a = summarize(recs["sync"]), summarize(recs["async"])
    ratio = a["samples_per_s_median"] / s["samples_per_s_median"]
    g, al = cfg.generation, cfg.algo
    print(f"\nPPO system, {cfg.actor.pretrain} ({al.advantage_estimator}), {g.num_generators} generator(s), "
          f"{al.experience_batch_size} prompts x {g.n_samples_per_prompt} samples x {g.max_new_tokens} tokens per "
          f"episode, actor {cfg.actor_learner.plugin} x{cfg.actor_learner.num_ranks} (medians)")
    print(f"{'mode':6s} {'eps':>4s} {'samples/s':>10s} {'episode s':>10s} {'gen s':>7s} {'score s':>8s} "
          f"{'update s':>9s} {'sync s':>7s} {'sync %':>7s} {'load':>5s}")
    for name, m in (("sync", s), ("async", a)):
        print(f"{name:6s} {m['episodes']:4d} {m['samples_per_s_median']:10.3f} {m['episode_s_median']:10.2f} "
              f"{m['gen_s_median']:7.2f} {m['score_s_median']:8.2f} {m['update_s_median']:9.2f} "
              f"{m['sync_s_median']:7.3f} {100 * m['sync_share_median']:6.2f}% {m['load_median']:5.2f}")
    print(f"async / sync samples/s: {ratio:.2f}x (goal >= 1.5x); weight sync {100 * s['sync_share_median']:.2f}% of a "
          f"sync episode (goal <= 5%)")
    result = {"benchmark": "ppo", "preset": args.preset, "overrides": args.sets, "model": cfg.actor.pretrain,
              "advantage_estimator": al.advantage_estimator, "num_generators": g.num_generators,
              "experience_batch_size": al.experience_batch_size, "n_samples_per_prompt": g.n_samples_per_prompt,
              "max_new_tokens": g.max_new_tokens, "start_s": start_s, "sync": s, "async": a,
              "async_over_sync": ratio, "episodes": recs}
    write_results(out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
