"""`relay plot SAVE_DIR`: draw a run's metrics.jsonl as PNG charts in SAVE_DIR/plots."""
from __future__ import annotations

import argparse
from pathlib import Path

# chart name -> metric keys drawn on it (those present in the run are drawn; the rest are skipped)
CHARTS: dict[str, list[str]] = {
    "loss": ["loss", "eval/loss", "actor_loss", "critic_loss", "ptx_loss"],
    "reward": ["reward_mean", "reward_chosen", "reward_rejected", "rewards/chosen", "rewards/rejected",
               "rewards/margins", "eval/reward_chosen", "eval/reward_rejected", "eval/rewards/chosen",
               "eval/rewards/rejected", "eval/rewards/margins"],
    "accuracy": ["train/acc", "acc", "eval/acc", "rewards/accuracy", "eval/rewards/accuracy"],
    "heldout": ["eval/acc", "eval/rewards/accuracy", "eval/reward_mean", "eval/pass_rate"],
    "heldout_signs": ["eval/response_length", "eval/kl", "eval/eos_rate", "response_length"],
    "kl": ["kl", "approx_kl", "kl_coef", "clip_frac", "entropy"],
    "lr": ["lr", "actor_lr", "critic_lr"],
    "throughput": ["samples_per_s", "tokens_per_s", "rollout_tokens_per_s"],
    "sync": ["sync_s", "staleness_mean", "logprob_diff"],
}


def plot_run(save_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from relay.metrics import read_metrics

    records = read_metrics(save_dir)
    out = Path(out_dir) if out_dir else Path(save_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for chart, keys in CHARTS.items():
        series = {k: [(r["step"], r[k]) for r in records if isinstance(r.get(k), (int, float))] for k in keys}
        series = {k: v for k, v in series.items() if v}
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key, points in series.items():
            xs, ys = zip(*points)
            ax.plot(xs, ys, label=key, marker="." if len(xs) < 30 else None)
        ax.set_xlabel("step")
        ax.set_title(f"{Path(save_dir).name}: {chart}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"{chart}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    if not written:
        raise ValueError(f"{save_dir}/metrics.jsonl: no known metric to plot (looked for {sorted({k for v in CHARTS.values() for k in v})})")
    return written


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="relay plot", description="Draw a run's metrics as PNG charts.")
    parser.add_argument("save_dir", help="run folder holding metrics.jsonl")
    parser.add_argument("--out", default=None, help="folder for the PNGs (default SAVE_DIR/plots)")
    args = parser.parse_args(argv)
    for path in plot_run(args.save_dir, args.out):
        print(path)
    return 0
