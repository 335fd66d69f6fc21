"""Learning race: Relay's GRPO against TRL's GRPOTrainer on held-out arithmetic, pass rate against wall-clock.

Both sides train the same model (default: the demo's SFT model outputs/demo/sft/model when it exists, else the
bundled SmolLM2-135M-Instruct) on the arithmetic task (relay/tasks/arithmetic.py: "What is 7 + 5? Reply with the
number only.", reward 1 when the reply's first number is right) with configs/demo_grpo.yaml's settings, matched
on the TRL side:

- the same training prompts in the same order (Relay's seeded batch order; TRL gets them as text with the chat
  template applied, shuffle_dataset=False, and the worker checks that TRL's tokenization of the text gives
  Relay's token ids); 8 prompts x 8 samples per optimizer step, micro-batches of 16 completions x 4 accumulated
  (TRL: per_device_train_batch_size 16, gradient_accumulation_steps 4, num_generations 8);
- at most 12 new tokens, temperature 1, top-p 1, no top-k; the same reward rule (copied into the TRL worker);
- GRPO advantages (r - group mean) / group std (TRL scale_rewards="group"), PPO clip 0.2, one pass per batch,
  the loss a token mean over the whole step (TRL loss_type="dapo"), no KL term (kl_coef 0 / beta 0);
- AdamW lr 2e-5, betas (0.9, 0.95), eps 1e-8, no weight decay, grad-norm clip 1.0, constant learning rate,
  no warm-up; fp32 training, seed 42.

Held-out score, the same procedure for both: the 64 held-out prompts, 4 answers each at temperature 1 (at most
12 tokens), sampled by Relay's vLLM generator with a fixed per-request seed and scored by the task's rule; the
pass rate is the share of answers that are right. Relay scores itself during its run (eval_interval: before
training, every --eval-every optimizer steps and after the last). The TRL worker saves its policy at the same
steps, and after Relay's run each of those folders is pushed into the same generator and scored by the same
call (`PPOSystem.evaluate`). Clocks: Relay = the sum of its episodes' seconds (generation, scoring, update,
weight sync; evaluation excluded); TRL = seconds since its training started, checkpoint writes excluded.
Start-up (Ray, vLLM, learners / model load, trainer) is not on either clock and is reported apart.

Time to a score S = the first time the held-out pass rate reaches S, linearly interpolated between the two
evaluations around the crossing. S = --target, else the highest pass rate both sides reach (Relay's best and
TRL's best run's best, the smaller). Ratio = TRL time / Relay time, TRL at its best thread count (--trl-threads,
each a separate TRL run; the one reaching S soonest counts); Relay at its default, 1 thread per process.

    make bench-env && python -m benchmarks.bench_learn_race [--steps 30] [--eval-every 5] [--trl-threads 1,2]

Writes runs/bench_learn_race/<timestamp>/results.json (every evaluation of every side, settings, machine) and
race.png (held-out pass rate against wall-clock seconds, one line per side).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import int_list, machine_info, set_bench_env, write_results

set_bench_env()

REPO = Path(__file__).resolve().parents[1]
PASS = "eval/pass_rate"


# ------------------------------------------------------------------------------------------ race arithmetic
def time_to_reach(points: list[dict[str, float]], target: float) -> float | None:
    """Seconds at which the pass rate first reaches `target`: linear interpolation between the last evaluation
    below it and the first at or above it (0 when the first evaluation already is); None when never reached.
    `points`: [{'t': seconds, 'score': pass rate}] in time order."""
    for i, p in enumerate(points):
        if p["score"] >= target:
            if i == 0:
                return float(p["t"])
            a = points[i - 1]
            return a["t"] + (target - a["score"]) / (p["score"] - a["score"]) * (p["t"] - a["t"])
    return None


def common_target(relay: list[dict[str, float]], trl_runs: list[list[dict[str, float]]]) -> float:
    """The highest pass rate both sides reach: min(Relay's best, the best of any TRL run)."""
    return min(max(p["score"] for p in relay), max(p["score"] for run in trl_runs for p in run))


def race_ratio(relay_t: float | None, trl_t: float | None) -> float | None:
    """TRL time / Relay time; inf when only Relay gets there, None when neither does or both at once (t=0)."""
    if relay_t is None:
        return None if trl_t is None else 0.0
    if trl_t is None:
        return math.inf
    if relay_t <= 0:
        return None if trl_t <= 0 else math.inf
    return trl_t / relay_t


def fmt_s(t: float | None) -> str:
    return "never" if t is None else f"{t:.0f} s"


def fmt_ratio(r: float | None) -> str:
    return "n/a" if r is None else ("TRL never" if math.isinf(r) else f"{r:.2f}x")


# ------------------------------------------------------------------------------------------ set-up
def default_model() -> Path:
    sft = REPO / "outputs" / "demo" / "sft" / "model"
    if (sft / "config.json").exists():
        return sft
    from relay.models.smollm2 import prepare_smollm2

    return Path(prepare_smollm2())


def prepare_task(folder: Path, model: Path) -> Path:
    """`relay data task arithmetic FOLDER -t MODEL`: FOLDER/prompt and FOLDER/prompt_heldout."""
    from relay.launch.prepare_cmd import data_main

    if not (folder / "prompt_heldout").exists():
        code = data_main(["task", "arithmetic", str(folder), "-t", str(model)])
        if code:
            raise SystemExit(f"relay data task arithmetic failed ({code})")
    return folder


def relay_config(args, model: Path, data: Path, out: Path):
    from relay.config import load_config, validate

    sets = [f"actor.pretrain={model}", f"prompt_dataset={data / 'prompt'}", f"eval_dataset={data / 'prompt_heldout'}",
            f"eval_interval={args.eval_every}", f"algo.num_episodes={args.steps}", f"save_dir={out / 'relay'}",
            "save_interval=0", "logging.use_tensorboard=false", "cluster.timeout_s=1800", "algo.mode=sync",
            "eval.num_prompts=64", "eval.n_samples=4", "eval.temperature=1.0", "eval.max_new_tokens=0",
            "eval.pass_threshold=1.0", "eval.show_samples=3", "generation.temperature=1.0", "generation.top_p=1.0",
            "generation.top_k=-1", "actor_learner.num_threads=1", "actor_learner.mixed_precision=fp32",
            "placement=separate"] + args.sets
    cfg = load_config("ppo", REPO / "configs" / "demo_grpo.yaml", sets)
    validate(cfg, "cpu")
    a, g, o = cfg.algo, cfg.generation, cfg.actor_optim
    # what the TRL side reproduces; an override that leaves this set would make the race unfair
    needs = {"advantage_estimator grpo": a.advantage_estimator == "grpo", "kl_coef 0": a.kl_coef == 0,
             "num_update_steps 1": a.num_update_steps == 1, "num_collect_steps 1": a.num_collect_steps == 1,
             "one optimizer step per episode": a.train_batch_size * a.accumulation_steps * cfg.actor_learner.num_ranks
             == a.experience_batch_size * g.n_samples_per_prompt,
             "constant lr (min_lr_ratio 1, no warm-up)": o.min_lr_ratio == 1.0 and o.warmup_steps == 0,
             "reward relay.tasks.arithmetic:reward": cfg.reward.kind == "rule" and cfg.reward.rule ==
             "relay.tasks.arithmetic:reward", "reward_clip 0": a.reward_clip == 0, "no ptx, no entropy bonus":
             a.ptx_coef == 0 and a.entropy_coef == 0, "no LoRA": cfg.lora.lora_rank == 0}
    broken = [k for k, ok in needs.items() if not ok]
    if broken:
        raise SystemExit(f"the TRL side cannot match this Relay config: {broken}")
    return cfg


def trl_inputs(cfg, tokenizer, steps: int, out: Path) -> tuple[Path, Path, list[list[int]]]:
    """The prompts of Relay's first `steps` episodes in the order it draws them (its seeded BatchOrder, built
    as PPOSystem.start builds it), as text (TRL re-tokenizes) and as the ids Relay trains on."""
    from relay.data.batches import BatchOrder
    from relay.data.shards import load_prepared

    a, maxlen = cfg.algo, cfg.generation.max_prompt_length
    records = load_prepared(cfg.prompt_dataset, "prompt")
    order = BatchOrder(len(records), a.num_collect_steps * a.experience_batch_size, cfg.seed)
    batches = [order.next_batch() for _ in range(steps)]
    ids = [list(records[i]["input_ids"])[-maxlen:] for b in batches for i in b]
    texts = [tokenizer.decode(x, skip_special_tokens=False) for x in ids]
    (out / "prompts.json").write_text(json.dumps(texts))
    (out / "prompt_ids.json").write_text(json.dumps(ids))
    return out / "prompts.json", out / "prompt_ids.json", batches


# ------------------------------------------------------------------------------------------ the TRL side
def run_trl(args, cfg, model: Path, prompts: Path, prompt_ids: Path, threads: int, out: Path) -> dict[str, Any]:
    py = REPO / args.bench_venv / "bin" / "python"
    if not py.exists():
        raise SystemExit(f"{py} missing: run `make bench-env` first")
    a, g, o = cfg.algo, cfg.generation, cfg.actor_optim
    out.mkdir(parents=True, exist_ok=True)
    cmd = [str(py), str(REPO / "benchmarks" / "trl_race_worker.py"), "--model", str(model), "--prompts", str(prompts),
           "--prompt-ids", str(prompt_ids), "--out", str(out), "--steps", str(args.steps),
           "--eval-every", str(args.eval_every), "--prompts-per-step", str(a.experience_batch_size),
           "--generations", str(g.n_samples_per_prompt), "--max-new-tokens", str(g.max_new_tokens),
           "--micro-batch", str(a.train_batch_size), "--lr", str(o.lr), "--adam-beta1", str(o.betas[0]),
           "--adam-beta2", str(o.betas[1]), "--weight-decay", str(o.weight_decay), "--grad-clip", str(o.grad_clip),
           "--clip-eps", str(a.eps_clip), "--threads", str(threads), "--seed", str(cfg.seed)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    print(f"TRL GRPOTrainer, {threads} thread(s): {args.steps} steps (log: {out / 'worker.log'})", file=sys.stderr,
          flush=True)
    t = time.perf_counter()
    with open(out / "worker.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            log.write(line)
            if line.startswith("trl race:"):
                print(f"  {line.rstrip()}", file=sys.stderr, flush=True)
        code = proc.wait()
    if code:
        print((out / "worker.log").read_text()[-4000:], file=sys.stderr)
        raise RuntimeError(f"TRL worker ({threads} threads) failed ({code})")
    res = json.loads((out / "result.json").read_text())
    res["process_s"] = time.perf_counter() - t
    return res


# ------------------------------------------------------------------------------------------ the Relay side
# vLLM's token budget per engine step on CPU (max_num_batched_tokens; longer prefills are split over steps)
VLLM_CPU_BATCHED_TOKENS = 4096


def avoid_chunked_prefill(system, cfg) -> int:
    """Cap the prompts per generate call so that no prefill is split over engine steps.

    vLLM 0.32 on CPU fails a step in which a request with its own sampling seed has a partly computed prefill
    (gpu_model_runner rewinds the request's torch.Generator with get_offset/set_offset, which CPU generators
    do not have: "RuntimeError: CPU Generator does not use offset"). Relay's held-out evaluation is seeded and
    sends all 64 prompts x 4 answers (~12k prompt tokens) in one call, so without this cap every evaluation
    fails. The pool gives chunk prompt k the seed it would have had in one call, so the samples are the same;
    training batches (8 prompts) are under the cap and are not split."""
    g, e = cfg.generation, cfg.eval
    longest_eval = max(map(len, system.eval_prompts))
    longest_train = min(g.max_prompt_length, max(len(r["input_ids"]) for r in system.prompts))
    chunk = max(1, min(VLLM_CPU_BATCHED_TOKENS // (e.n_samples * longest_eval),
                       VLLM_CPU_BATCHED_TOKENS // (g.n_samples_per_prompt * longest_train)))
    system.pool.options.max_chunk_size = chunk
    return chunk


def run_relay(cfg, steps: int, batches: list[list[int]]) -> tuple[Any, dict[str, Any]]:
    """Start Relay's PPO system, check it draws `batches`, run `steps` episodes one at a time (load average per
    episode) with its in-run evaluation. Returns the live system (for scoring TRL's folders) and the results."""
    from relay.launch.ppo import PPOSystem

    system = PPOSystem(cfg)
    t0 = time.monotonic()
    system.start()
    setup_s = time.monotonic() - t0
    chunk = avoid_chunked_prefill(system, cfg)
    order = copy.deepcopy(system.prompt_order)
    same_prompts = [order.next_batch() for _ in range(steps)] == batches
    if not same_prompts:
        print("WARNING: Relay's prompt order differs from the one given to TRL", file=sys.stderr)
    print(f"Relay GRPO: system up in {setup_s:.0f} s; {steps} steps", file=sys.stderr, flush=True)
    episodes = []
    while system.state.episode < steps:
        rec = system.run_episodes(until=system.state.episode + 1)[0]
        rec["load"] = round(os.getloadavg()[0], 2)
        episodes.append(rec)
    first = system.eval_first or {}
    points = [{"step": 0, "t": 0.0, "score": first.get("pass_rate"), "reward_mean": first.get("reward_mean"),
               "response_length": first.get("response_length"), "load": episodes[0]["load"] if episodes else None}]
    clock = 0.0
    for r in episodes:
        clock += r["episode_s"]
        if PASS in r:
            points.append({"step": r["episode"], "t": clock, "score": r[PASS], "reward_mean": r["eval/reward_mean"],
                           "response_length": r.get("eval/response_length"), "eval_s": r.get("eval_s"),
                           "load": r["load"]})
    keep = ("episode", "episode_s", "gen_s", "score_s", "update_s", "sync_s", "reward_mean", "response_length",
            "eval_s", "load")
    return system, {"setup_s": setup_s, "train_s": clock, "points": points, "same_prompt_order": same_prompts,
                    "pool_max_chunk_size": chunk,
                    "episodes": [{k: r.get(k) for k in keep} for r in episodes]}


def score_checkpoints(system, trl: dict[str, Any], threads: int) -> list[dict[str, Any]]:
    """Each TRL folder's weights -> Relay's generator pool, then the very evaluation Relay ran on itself."""
    from safetensors.torch import load_file

    from relay.actors.weight_push import local_sender

    points = []
    for c in trl["checkpoints"]:
        files = sorted(Path(c["path"]).glob("*.safetensors"))
        state = {}
        for f in files:
            state.update(load_file(f))
        system.pool.push_weights(local_sender(state), system.pool.version + 1)  # TRL's weights, read here
        t = time.monotonic()
        m = system.evaluate(f"trl{threads}t-step{c['step']}")
        points.append({"step": c["step"], "t": c["train_s"], "score": m[PASS], "reward_mean": m["eval/reward_mean"],
                       "response_length": m.get("eval/response_length"), "eval_s": time.monotonic() - t,
                       "load": c["load"]})
    return points


# ------------------------------------------------------------------------------------------ output
def plot(path: Path, curves: dict[str, list[dict[str, float]]], target: float | None, times: dict[str, float | None],
         title: str, dashed: set[str] = frozenset()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, (name, pts) in enumerate(curves.items()):
        line, = ax.plot([p["t"] for p in pts], [p["score"] for p in pts], marker="o", ms=4, color=f"C{i}",
                        ls="--" if name in dashed else "-", label=name)
        t = times.get(name)
        if target is not None and t is not None:
            ax.axvline(t, color=line.get_color(), lw=0.8, alpha=0.5)
    if target is not None:
        ax.axhline(target, color="grey", lw=0.8, ls=":", label=f"target {target:.3f}")
    ax.set_xlabel("training wall-clock (s; start-up and held-out evaluation excluded)")
    ax.set_ylabel("held-out pass rate (64 prompts x 4 answers)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per side (default 30)")
    ap.add_argument("--eval-every", type=int, default=5, help="held-out evaluation every N steps (default 5)")
    ap.add_argument("--trl-threads", type=int_list, default="1,2", help="TRL runs, one per thread count (default 1,2)")
    ap.add_argument("--model", default=None, help="default: outputs/demo/sft/model if it exists, else smollm2")
    ap.add_argument("--target", type=float, default=None,
                    help="held-out pass rate to race to (default: the highest both sides reach)")
    ap.add_argument("--out", default=None, help="default runs/bench_learn_race/<timestamp>")
    ap.add_argument("--bench-venv", default=".venv-bench")
    ap.add_argument("--keep-checkpoints", action="store_true", help="keep TRL's saved policies after scoring")
    ap.add_argument("--reuse-trl", default=None, metavar="RUN_DIR",
                    help="score the TRL runs of an earlier run (kept with --keep-checkpoints) instead of training "
                         "TRL again; the two sides then did not run back to back (results.json says so)")
    ap.add_argument("--set", dest="sets", action="append", default=[],
                    help="extra Relay config override (the TRL side follows the matched fields)")
    args = ap.parse_args(argv)
    threads = args.trl_threads
    if args.steps < 1 or args.eval_every < 1 or not threads:
        ap.error("--steps and --eval-every must be >= 1 and --trl-threads name at least one count")

    from transformers import AutoTokenizer

    from relay import logs
    from relay.launch.cluster import init_ray
    from relay.models.smollm2 import resolve_model_path

    t_start = time.time()
    out = Path(args.out or REPO / "runs" / "bench_learn_race" / time.strftime("%Y%m%d-%H%M%S")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model = Path(resolve_model_path(args.model)) if args.model else default_model()
    print(f"learning race: model {model}, output {out}", file=sys.stderr, flush=True)
    data = prepare_task(out / "data" / "arithmetic", model)
    cfg = relay_config(args, model, data, out)
    tok = AutoTokenizer.from_pretrained(model)
    prompts, prompt_ids, batches = trl_inputs(cfg, tok, args.steps, out)
    machine_before = machine_info()

    trl: dict[int, dict[str, Any]] = {}
    for n in threads:
        if args.reuse_trl:  # an earlier run's TRL side (kept checkpoints), for re-running Relay's side only
            old = Path(args.reuse_trl).resolve()
            if (old / "prompts.json").read_text() != prompts.read_text():
                raise SystemExit(f"--reuse-trl {old}: its prompts differ from this run's")
            trl[n] = json.loads((old / f"trl_{n}t" / "result.json").read_text())
            trl[n]["process_s"] = None
            trl[n]["reused_from"] = str(old)
            missing = [c["path"] for c in trl[n]["checkpoints"] if not Path(c["path"]).exists()]
            if missing:
                raise SystemExit(f"--reuse-trl {old}: checkpoints gone (run it with --keep-checkpoints): {missing[:2]}")
        else:
            trl[n] = run_trl(args, cfg, model, prompts, prompt_ids, n, out / f"trl_{n}t")

    logs.quiet_console()
    with logs.run_logs(out / "relay" / "logs"):
        init_ray(address="local", num_cpus=16, include_dashboard=False)
        system = None
        try:
            system, relay = run_relay(cfg, args.steps, batches)
            print(f"scoring TRL's policies with Relay's held-out evaluation", file=sys.stderr, flush=True)
            for n, res in trl.items():
                res["points"] = score_checkpoints(system, res, n)
        finally:
            if system is not None:
                system.close()
            import ray

            ray.shutdown()
    if not args.keep_checkpoints and not args.reuse_trl:
        for n in trl:
            shutil.rmtree(out / f"trl_{n}t" / "ckpt", ignore_errors=True)

    # ---- the race
    names = {n: f"TRL GRPOTrainer, {n} thread{'s' if n > 1 else ''}" for n in threads}
    target = args.target if args.target is not None else common_target(relay["points"], [r["points"] for r in trl.values()])
    relay_t = time_to_reach(relay["points"], target)
    trl_t = {n: time_to_reach(r["points"], target) for n, r in trl.items()}
    best = min(threads, key=lambda n: (trl_t[n] is None, trl_t[n] or 0.0, trl[n]["train_s"]))
    ratio = race_ratio(relay_t, trl_t[best])
    start = [relay["points"][0]["score"]] + [r["points"][0]["score"] for r in trl.values()]
    base = sum(start) / len(start)
    fractions = {}
    for f in (0.25, 0.5, 0.75, 1.0):
        s = base + f * (target - base)
        r_t, t_t = time_to_reach(relay["points"], s), {n: time_to_reach(r["points"], s) for n, r in trl.items()}
        b = min(threads, key=lambda n: (t_t[n] is None, t_t[n] or 0.0))
        fractions[f"{f:.2f}"] = {"score": s, "relay_s": r_t, "trl_s": {str(n): t for n, t in t_t.items()},
                                 "trl_best_threads": b, "ratio": race_ratio(r_t, t_t[b])}

    a, g, o = cfg.algo, cfg.generation, cfg.actor_optim
    settings = {
        "model": str(model), "task": "arithmetic (relay/tasks/arithmetic.py), rule reward",
        "train_prompts": len(json.loads(prompts.read_text())), "heldout_prompts": cfg.eval.num_prompts,
        "steps": args.steps, "eval_every": args.eval_every, "prompts_per_step": a.experience_batch_size,
        "group_size": g.n_samples_per_prompt, "micro_batch": a.train_batch_size, "accumulation": a.accumulation_steps,
        "max_new_tokens": g.max_new_tokens, "temperature": g.temperature, "lr": o.lr, "betas": o.betas,
        "weight_decay": o.weight_decay, "grad_clip": o.grad_clip, "clip_eps": a.eps_clip, "kl_coef": a.kl_coef,
        "seed": cfg.seed, "eval": {"n_samples": cfg.eval.n_samples, "temperature": cfg.eval.temperature,
                                   "max_new_tokens": cfg.eval.max_new_tokens or g.max_new_tokens,
                                   "sampling_seed": cfg.seed + 1009, "pass_threshold": cfg.eval.pass_threshold},
        "relay_threads_per_process": cfg.actor_learner.num_threads, "trl_threads": threads,
        "interpolation": "linear between the evaluations around the first crossing",
    }
    title = (f"GRPO learning race, held-out arithmetic: {model.name}, {a.experience_batch_size} prompts x "
             f"{g.n_samples_per_prompt}, <= {g.max_new_tokens} tokens, lr {o.lr:g}\n"
             f"to pass rate {target:.3f}: Relay {fmt_s(relay_t)}, TRL at its best ({best} thread"
             f"{'s' if best > 1 else ''}) {fmt_s(trl_t[best])}: {fmt_ratio(ratio)}")
    curves = {"Relay GRPO (1 thread/process)": relay["points"]}
    times = {"Relay GRPO (1 thread/process)": relay_t}
    dashed = set()
    for n in threads:
        label = names[n] + (" (best)" if n == best and len(threads) > 1 else "")
        curves[label], times[label] = trl[n]["points"], trl_t[n]
        if n != best:
            dashed.add(label)
    png = out / "race.png"
    plot(png, curves, target, times, title, dashed)

    # ---- summary
    rows = [("Relay GRPO", "1/proc", relay["points"], relay["train_s"], relay["setup_s"], relay_t)]
    rows += [(f"TRL GRPOTrainer", str(n), trl[n]["points"], trl[n]["train_s"], trl[n]["setup_s"], trl_t[n]) for n in threads]
    print(f"\nGRPO learning race on held-out arithmetic: {model}, {a.experience_batch_size} prompts x "
          f"{g.n_samples_per_prompt} samples, <= {g.max_new_tokens} tokens, lr {o.lr:g}, {args.steps} steps; held-out "
          f"{cfg.eval.num_prompts} prompts x {cfg.eval.n_samples} answers at T={cfg.eval.temperature:g}, evaluated every "
          f"{args.eval_every} steps")
    print(f"{'side':16s} {'threads':>7s} {'step 0':>6s} {'best':>6s} {'final':>6s} {'train s':>8s} {'s/step':>7s} "
          f"{'setup s':>7s} {'to target':>9s}")
    for side, th, pts, train_s, setup_s, t in rows:
        print(f"{side:16s} {th:>7s} {pts[0]['score']:6.3f} {max(p['score'] for p in pts):6.3f} {pts[-1]['score']:6.3f} "
              f"{train_s:8.1f} {train_s / args.steps:7.2f} {setup_s:7.1f} {fmt_s(t):>9s}")
    print("held-out pass rate at each evaluation (step: seconds -> pass rate):")
    for side, th, pts, *_ in rows:
        print(f"  {side} ({th}): " + ", ".join(f"{p['step']}: {p['t']:.0f} s -> {p['score']:.3f}" for p in pts))
    spread = max(start) - min(start)
    se = math.sqrt(max(base * (1 - base), 1e-9) / (cfg.eval.num_prompts * cfg.eval.n_samples))
    print(f"step-0 check (same weights, same sampling seed): {', '.join(f'{s:.3f}' for s in start)}"
          f"{' identical' if spread == 0 else f', spread {spread:.3f} (sampling SE ~{se:.3f})'}")
    print("time to a share of the way from the step-0 score to the target (TRL at its best there):")
    for f, v in fractions.items():
        print(f"  {float(f):4.0%}: pass rate {v['score']:.3f}: Relay {fmt_s(v['relay_s'])}, TRL "
              f"{fmt_s(v['trl_s'][str(v['trl_best_threads'])])} ({v['trl_best_threads']}t): {fmt_ratio(v['ratio'])}")
    how = "given" if args.target is not None else "the highest pass rate both sides reach"
    print(f"target {target:.3f} ({how}; linear interpolation between evaluations)")
    if target - base < 2 * se:
        print(f"NOTE: the target is within 2 sampling SEs ({2 * se:.3f}) of the step-0 pass rate {base:.3f}: this "
              f"ratio measures noise, not learning; run more --steps or give a --target further up")
    step_ratio = (trl[best]["train_s"] / args.steps) / (relay["train_s"] / args.steps)
    print(f"seconds per optimizer step: Relay {relay['train_s'] / args.steps:.1f}, TRL ({best}t) "
          f"{trl[best]['train_s'] / args.steps:.1f}: {step_ratio:.2f}x (what the race ratio tends to when both learn "
          f"alike per step)")
    print(f"TRL at its best ({best} thread{'s' if best > 1 else ''}) / Relay, time to target: {fmt_ratio(ratio)} "
          f"(goal >= 2.5x); load average now {os.getloadavg()[0]:.2f}")
    print(f"figure: {png}")
    write_results(out, {
        "benchmark": "learn_race", "command": " ".join(["python -m benchmarks.bench_learn_race"] + (argv if argv is not None
                                                                                                     else sys.argv[1:])),
        "args": vars(args), "settings": settings, "target": target, "target_how": how,
        "relay": {**relay, "time_to_target_s": relay_t},
        "trl": {str(n): {"points": r["points"], "steps": r["steps"], "setup_s": r["setup_s"], "train_s": r["train_s"],
                         "save_s": r["save_s"], "process_s": r["process_s"], "time_to_target_s": trl_t[n],
                         "config": r["config"], "logs": r["logs"], "eos_token_ids": r["eos_token_ids"],
                         "reused_from": r.get("reused_from"),
                         "versions": {k: r[k] for k in ("torch", "trl", "transformers")}} for n, r in trl.items()},
        "trl_best_threads": best, "ratio": ratio if ratio is None or not math.isinf(ratio) else "inf",
        "ratios_by_fraction": {k: {**v, "ratio": v["ratio"] if v["ratio"] is None or not math.isinf(v["ratio"])
                                   else "inf"} for k, v in fractions.items()},
        "step0_scores": start, "step0_sampling_se": se, "step_time_ratio": step_ratio, "figure": str(png), "wall_s": time.time() - t_start,
        "machine_at_start": machine_before, "machine": machine_info(),
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
