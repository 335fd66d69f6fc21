"""`relay demo` (`make demo`, `make learn`): the seed pipeline on SmolLM2-135M-Instruct, judged on held-out data.

1. data: chitchat-dataset -> SFT / preference / prompt sets with held-out splits from unseen conversations
   (preference: the real reply against the same reply garbled), and the arithmetic task's prompts;
2. SFT -> reward model -> PPO against the reward model -> GRPO on arithmetic with a rule reward -> DPO from
   the SFT model; presets configs/demo_{sft,rm,ppo,grpo,dpo}.yaml, every stage evaluating on held-out data while
   it trains (metrics.jsonl, TensorBoard, plots);
3. `relay eval` side by side (SFT vs PPO vs DPO; SFT vs GRPO) and the targets each stage is held to;
4. a few answers through vLLM, and the same model in int4 where the CPU has the kernel.
`--learn` runs the longer preset (configs/demo_presets/learn.yaml) sized to meet every target; `--quick` a smoke run.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DEMO_PROMPTS = ["What is the capital of France?", "What is 7 + 5? Reply with the number only."]
STAGES = ("sft", "rm", "ppo", "grpo", "dpo")
PIPELINE = {"sft": "sft", "rm": "rm", "ppo": "ppo", "grpo": "ppo", "dpo": "dpo"}


@dataclass(frozen=True)
class Target:
    """A held-out figure a stage is held to: `metric` of `model` in the final evaluation (else `logged`, the same
    figure from the stage's last held-out evaluation during training), at least `at_least`."""

    what: str
    model: str
    metric: str
    logged: str
    at_least: float


TARGETS = (
    Target("reward model ranks held-out pairs", "rm", "rm_accuracy", "eval/acc", 0.80),
    Target("DPO prefers the chosen reply (implicit reward, held-out)", "dpo", "pref_accuracy",
           "eval/rewards/accuracy", 0.70),
    Target("PPO: held-out reward rise, in SDs of the SFT policy's per-prompt means", "ppo", "effect_sd",
           "eval/effect_sd", 1.0),
    Target("GRPO: share of the SFT->perfect gap closed on held-out arithmetic", "grpo", "gap_closed",
           "eval/gap_closed", 0.5),
)


def load_preset(name: str) -> dict[str, Any]:
    """configs/demo_presets/<name>.yaml: per-stage `--set` overrides and data sizes layered on the demo presets."""
    import yaml

    path = CONFIGS / "demo_presets" / f"{name}.yaml"
    return yaml.safe_load(path.read_text()) or {}


def data_args(preset: dict[str, Any]) -> list[str]:
    sizes = {"sft": 256, "preference": 384, "prompt": 128, "ptx": 32, "sft-heldout": 32,
             "preference-heldout": 128, "prompt-heldout": 64, **preset.get("data", {})}
    return [a for k, v in sizes.items() for a in (f"--{k}", str(v))]


def stage_overrides(out: Path, data: Path, model: Path, preset: dict[str, Any]) -> dict[str, list[str]]:
    sft, rm = out / "sft" / "model", out / "rm" / "model"
    arith = data / "arithmetic"
    o = {
        "sft": [f"model.pretrain={model}", f"dataset={data / 'sft'}", f"eval_dataset={data / 'sft_heldout'}"],
        "rm": [f"model.pretrain={sft}", f"dataset={data / 'preference'}", f"eval_dataset={data / 'preference_heldout'}"],
        "ppo": [f"actor.pretrain={sft}", f"critic.pretrain={rm}", f"reward.model={rm}",
                f"prompt_dataset={data / 'prompt'}", f"eval_dataset={data / 'prompt_heldout'}"],
        "grpo": [f"actor.pretrain={sft}", f"prompt_dataset={arith / 'prompt'}", f"eval_dataset={arith / 'prompt_heldout'}"],
        "dpo": [f"model.pretrain={sft}", f"dataset={data / 'preference'}", f"eval_dataset={data / 'preference_heldout'}"],
    }
    for stage in STAGES:
        o[stage] += [f"save_dir={out / stage}"] + [str(x) for x in preset.get(stage, [])]
    return o


def prepare_data(data: Path, model: Path, preset: dict[str, Any], console: Any) -> int:
    from relay.launch.prepare_cmd import data_main

    args = data_args(preset)
    stamp = data / "demo-args.txt"
    if stamp.exists() and stamp.read_text() == " ".join(args) and (data / "arithmetic" / "prompt").exists():
        return 0
    console.rule("data: chitchat-dataset -> SFT / preference / prompt sets with held-out splits; arithmetic prompts")
    code = data_main(["demo", str(data), *args, "-t", str(model), "--max-length", "160"])
    code = code or data_main(["task", "arithmetic", str(data / "arithmetic"), "-t", str(model)])
    if not code:
        stamp.write_text(" ".join(args))
    return code


def held_out_line(history: list[dict[str, Any]], keys: list[str]) -> str:
    """'key first -> last' over the evaluations logged during training."""
    parts = []
    for key in keys:
        values = [r[key] for r in history if isinstance(r.get(key), (int, float))]
        if values:
            parts.append(f"{key.removeprefix('eval/')} {values[0]:.3f} -> {values[-1]:.3f}" if len(values) > 1
                         else f"{key.removeprefix('eval/')} {values[-1]:.3f}")
    return ", ".join(parts) or "-"


SHOWN_DURING = {
    "sft": ["eval/loss"], "rm": ["eval/acc", "eval/reward_margin"], "dpo": ["eval/rewards/accuracy", "eval/rewards/margins"],
    "ppo": ["eval/reward_mean", "eval/kl", "eval/response_length"], "grpo": ["eval/pass_rate", "eval/response_length"],
}


def run_stage(stage: str, cfg: Any) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Train one stage; returns its metrics history (and, for PPO, the memory of each component)."""
    if PIPELINE[stage] == "ppo":
        from relay.launch.ppo import PPOSystem

        system = PPOSystem(cfg)
        memory: dict[str, int] = {}
        try:
            system.start()
            history = system.run_episodes(until=1)
            if stage == "ppo":
                memory = actor_memory()  # while every component is up and has done one episode
            history = history + system.run_episodes()
            system.save_final()
        finally:
            system.close()
        return history, memory
    from relay.launch.train import train

    return train(cfg, stage).history, {}


EVAL_SIZES = {"eval": {"num_prompts": 32, "n_samples": 2}, "eval_arithmetic": {"num_prompts": 32, "n_samples": 4}}


def eval_sizes(preset: dict[str, Any], key: str) -> dict[str, Any]:
    """The final evaluation's sizes: the preset's `eval` / `eval_arithmetic` entries over the demo's defaults."""
    return {**EVAL_SIZES[key], **preset.get(key, {})}


def final_eval(out: Path, data: Path, skip: list[str], console: Any, preset: dict[str, Any] | None = None
               ) -> dict[str, dict[str, Any]]:
    """Side by side on held-out data: SFT vs PPO vs DPO (reward-model reward, KL to SFT, preference accuracy),
    SFT vs GRPO on held-out arithmetic; every model's answers come from a vLLM generator actor. The preset's
    `eval` / `eval_arithmetic` entries size the two evaluations (prompts, samples per prompt); without
    `eval_full: true` (the short demo) only SFT's and PPO's answers are compared, since the RM, DPO and GRPO
    figures on the same held-out data already come from their stages' last evaluations."""
    preset = preset or {}
    full = bool(preset.get("eval_full"))
    from relay.launch.eval_cmd import EvalSettings, evaluate_models, print_table, write_outputs

    sft = str(out / "sft" / "model")
    log = lambda m: console.print(f"[dim][relay eval] {m}[/dim]")  # noqa: E731
    results: dict[str, dict[str, Any]] = {}
    chat = {"sft": sft}
    if "ppo" not in skip:
        chat["ppo"] = str(out / "ppo" / "actor")
    if "dpo" not in skip and full:
        chat["dpo"] = str(out / "dpo" / "model")
    if "rm" not in skip:
        if full:
            chat["rm"] = str(out / "rm" / "model")
        s = EvalSettings(prompts=str(data / "prompt_heldout"),
                         preferences=str(data / "preference_heldout") if full else None,
                         reference=sft, reward={"kind": "model", "model": str(out / "rm" / "model")},
                         max_new_tokens=32, baseline="sft", preference_models=["dpo"],
                         **eval_sizes(preset, "eval"))
        results.update(evaluate_models(chat, s, log))
        write_outputs(results, out / "eval" / "chitchat", s)
        print_table(results, "held-out chitchat: RM reward of sampled answers, KL to SFT, preference accuracy")
    if "grpo" not in skip and full:
        s = EvalSettings(prompts=str(data / "arithmetic" / "prompt_heldout"), reference=sft,
                         reward={"kind": "rule", "rule": "relay.tasks.arithmetic:reward"}, pass_threshold=1.0,
                         max_new_tokens=16, baseline="sft", **eval_sizes(preset, "eval_arithmetic"))
        arith = evaluate_models({"sft": sft, "grpo": str(out / "grpo" / "actor")}, s, log)
        write_outputs(arith, out / "eval" / "arithmetic", s)
        print_table(arith, "held-out arithmetic: pass rate of sampled answers")
        results["grpo"] = arith["grpo"]
        results["sft-arithmetic"] = arith["sft"]
    return results


def check_targets(results: dict[str, dict[str, Any]], last_evals: dict[str, dict[str, Any]], console: Any) -> int:
    """The targets table; `last_evals[stage]` holds each stage's last held-out evaluation during training."""
    from rich.table import Table

    table = Table(title="targets (held-out data)")
    for col in ("target", "needed", "measured", "from", ""):
        table.add_column(col)
    met = 0
    for t in TARGETS:
        value, source = results.get(t.model, {}).get(t.metric), "relay eval"
        if value is None:
            value, source = last_evals.get(t.model, {}).get(t.logged), f"{t.model} stage's last eval"
        if value is None:
            continue
        ok = value >= t.at_least
        met += ok
        table.add_row(t.what, f">= {t.at_least:g}", f"{value:.3f}", source,
                      "[green]met[/green]" if ok else "[red]not met[/red]")
    console.print(table)
    return met


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="relay demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="run folder (default outputs/demo, outputs/learn with --learn)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--learn", action="store_true", help="the longer preset (configs/demo_presets/learn.yaml) sized to meet every target")
    size.add_argument("--quick", action="store_true", help="a smoke run: a few steps per stage (configs/demo_presets/quick.yaml)")
    parser.add_argument("--skip", nargs="*", default=[], choices=STAGES, help="stages to skip")
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    from relay.config import load_config
    from relay.launch.cluster import init_ray
    from relay.launch.plot_cmd import plot_run
    from relay.models.smollm2 import prepare_smollm2

    console = Console()
    start_all = time.time()
    preset_name = "learn" if args.learn else "quick" if args.quick else None
    preset = load_preset(preset_name) if preset_name else {}
    out = Path(args.out or ("outputs/learn" if args.learn else "outputs/demo")).resolve()
    model = prepare_smollm2()
    data = out / "data"
    code = prepare_data(data, model, preset, console)
    if code:
        return code
    from relay import logs

    logs.use_log_dir(out / "logs")  # dependency output of everything not inside a stage's own folder
    init_ray(num_cpus=8)
    overrides = stage_overrides(out, data, model, preset)
    rows: list[tuple[str, ...]] = []
    last_evals: dict[str, dict[str, Any]] = {}
    memory: dict[str, int] = {}
    for stage in STAGES:
        if stage in args.skip:
            continue
        console.rule(f"{stage.upper()}  (configs/demo_{stage}.yaml{' + demo_presets/' + preset_name + '.yaml' if preset_name else ''})")
        cfg = load_config(PIPELINE[stage], CONFIGS / f"demo_{stage}.yaml", overrides[stage])
        t0 = time.time()
        with logs.run_logs(Path(cfg.save_dir) / "logs"):  # each stage's actors log beside its metrics
            history, mem = run_stage(stage, cfg)
        memory = memory or mem
        from relay.metrics import read_metrics

        logged = read_metrics(cfg.save_dir)  # also holds the evaluation before the first step
        last_evals[stage] = next((r for r in reversed(logged) if any(k.startswith("eval/") for k in r)), {})
        length = f"{len([r for r in history if 'episode' in r]) or len(history)} {'episodes' if PIPELINE[stage] == 'ppo' else 'steps'}"
        rows.append((stage.upper(), length, held_out_line(logged, SHOWN_DURING[stage]), f"{time.time() - t0:.0f} s"))
        try:
            plot_run(cfg.save_dir)
        except (FileNotFoundError, ValueError) as err:
            console.print(f"[yellow]no plots for {stage}: {err}[/yellow]")
    table = Table(title="held-out metrics during training (first evaluation -> last)")
    for col in ("stage", "length", "held-out", "time"):
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    console.print(table)

    console.rule("relay eval: before / after on held-out data")
    with logs.run_logs(out / "eval" / "logs"):
        results = final_eval(out, data, args.skip, console, preset)
    met = check_targets(results, last_evals, console)
    if memory:
        mem = Table(title="memory per PPO component (resident set size, SmolLM2-135M, CPU)")
        mem.add_column("actor")
        mem.add_column("RSS", justify="right")
        for name, rss in sorted(memory.items()):
            mem.add_row(name, f"{rss / 2**30:.2f} GiB")
        console.print(mem)
    if "ppo" not in args.skip:
        show_answers(out, console)
    console.print(f"[bold]{met} of {len(TARGETS)} targets met[/bold] in {time.time() - start_all:.0f} s. Outputs, "
                  f"metrics.jsonl and plots/: {out}/<stage>; side-by-side figures: {out}/eval/*/eval.{{json,png}}. "
                  f"Try: relay chat --model {out / 'ppo' / 'actor'}")
    return 0


def show_answers(out: Path, console: Any) -> None:
    """The PPO model answering through vLLM, then the same model in int4 where this CPU has the kernel."""
    from relay.launch.chat import main as chat_main
    from relay.launch.models_cmd import main as models_main

    console.rule("relay chat with the PPO model (vLLM)")
    chat_main(["--model", str(out / "ppo" / "actor"), "--temperature", "0", "--max-new-tokens", "40",
               "--run-dir", str(out / "chat"), *[a for p in DEMO_PROMPTS for a in ("--prompt", p)]])
    try:
        from relay.cpu import vllm_int4_support
    except ImportError:  # the CPU probe is optional for the demo
        vllm_int4_support = None
    ok, why = vllm_int4_support() if vllm_int4_support else (True, "")
    if not ok:
        console.print(f"[yellow]int4 step skipped: {why}[/yellow]")
        return
    console.rule("the same model as int4 on CPU (relay models quantize: AWQ format, round-to-nearest)")
    models_main(["quantize", str(out / "ppo" / "actor"), "--out", str(out / "ppo" / "actor-int4")])
    chat_main(["--model", str(out / "ppo" / "actor-int4"), "--temperature", "0", "--max-new-tokens", "40",
               "--run-dir", str(out / "chat"), "--prompt", DEMO_PROMPTS[0]])


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
