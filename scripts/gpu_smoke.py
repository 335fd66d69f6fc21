"""One PPO run on one GPU with every role on it (configs/ppo_gpu_smoke.yaml: bf16 learners, bf16 vLLM engine,
reference and reward model in their `auto` dtype), printing where each role computed and what it measured.
Run by `scripts/gpu_smoke.sh`; `--set` overrides pass through (on a CPU machine, `--cpu` swaps the GPU shares
and dtypes for CPU ones, to check the script itself).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CPU_SETS = ["actor_learner.num_gpus_per_rank=0", "critic_learner.num_gpus_per_rank=0", "actor_learner.plugin=ddp",
            "critic_learner.plugin=ddp", "actor_learner.mixed_precision=fp32", "critic_learner.mixed_precision=fp32",
            "generation.num_gpus_per_generator=0", "generation.dtype=float32", "reference.num_gpus=0",
            "reward.num_gpus=0"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="prepared prompt folder (`relay data demo OUT -t tiny`: OUT/prompt)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--cpu", action="store_true", help="check the script on a machine without a GPU")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    args = ap.parse_args()

    import torch

    from relay.cluster.calls import get
    from relay.config import load_config, validate
    from relay.launch.ppo import PPOSystem
    from relay.launch.role_memory import peak_memory_by_role

    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_smoke: skipped: torch sees no CUDA device here (use --cpu to check the script on CPU)")
        return 0
    sets = [f"prompt_dataset={args.data}", f"save_dir={args.out}", "logging.use_tensorboard=false"]
    cfg = load_config("ppo", REPO / "configs" / "ppo_gpu_smoke.yaml", sets + (CPU_SETS if args.cpu else []) + args.sets)
    validate(cfg, device)
    t0 = time.monotonic()
    system = PPOSystem(cfg).start()
    up_s = time.monotonic() - t0
    try:
        rows = system.run_episodes()
        gen = next(iter(system.pool.clients().values()))
        where = {
            "generator": get(gen.actor.ready.remote(), 60, "generator ready")["device"],
            "actor_learner": system.actor.device,
            "critic_learner": system.critic.device if system.critic is not None else None,
            "reference": "{device} {dtype}".format(**system.ref.info()) if system.ref is not None else None,
            "reward": "{device} {dtype}".format(**system.reward.stats()),
        }
        memory = peak_memory_by_role(system)
    finally:
        system.close()
    print(f"gpu_smoke: system up in {up_s:.1f} s on {device}")
    for role, place in where.items():
        print(f"  {role:15s} {place}")
    for r in rows:
        print(f"  episode {r['episode']}: reward {r['reward_mean']:.3f}, kl {r['kl']:.4f}, {r['episode_s']:.2f} s "
              f"(gen {r['gen_s']:.2f}, score {r['score_s']:.2f}, update {r['update_s']:.2f}, weight sync "
              f"{r['sync_s']:.3f}); weight version {r['weight_version']}, generators at {r['gen_version_min']}")
    print("  peak resident memory (MiB): " + ", ".join(f"{k} {v:.0f}" for k, v in memory.items()))
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        print(f"  GPU memory in use after the run: {(total - free) / 2**30:.1f} of {total / 2**30:.1f} GiB")
    ok = (all(r["gen_version_min"] == r["weight_version"] for r in rows)
          and all(str(p).startswith(device) for p in where.values() if p is not None))
    (Path(args.out) / "gpu_smoke.json").write_text(json.dumps({"device": device, "where": where, "episodes": rows,
                                                               "peak_rss_mib": memory, "up_s": up_s}, indent=1))
    print("gpu_smoke: " + ("ok: every role on " + device if ok else "FAILED: a role is elsewhere or behind the weights"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
