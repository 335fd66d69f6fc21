"""`relay eval`: score model folders on held-out data, side by side, and write eval.json and eval.png.

What is measured depends on the folder and the data given:

- a reward-model folder (value head) + `--preferences`: accuracy of its ranking of held-out pairs;
- a policy folder + `--preferences` + `--reference`: implicit-reward preference accuracy against the reference
  (the policy read as a DPO reward model, beta x log-ratio);
- a policy folder + `--prompts` + a reward (`--reward-model`, `--reward-rule` or `--reward-url`): mean reward and
  pass rate of its sampled answers to held-out prompts (through a vLLM generator actor), the spread of
  per-prompt means, answer length, and with `--reference` the KL to it.

Examples::

    relay eval --model sft=outputs/demo/sft/model --model ppo=outputs/demo/ppo/actor \\
        --reference outputs/demo/sft/model --prompts outputs/demo/data/prompt_heldout \\
        --reward-model outputs/demo/rm/model --out outputs/demo/eval
    relay eval --model rm=outputs/demo/rm/model --preferences outputs/demo/data/preference_heldout
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relay.evals.scores import effect_in_prompt_sd, gap_closed
from relay.launch.argtypes import finite_float

# metric -> label in the table and chart (also the order they are shown in)
SHOWN = {
    "rm_accuracy": "RM accuracy", "pref_accuracy": "preference accuracy", "pref_margin": "implicit margin",
    "reward_mean": "mean reward", "pass_rate": "pass rate", "prompt_sd": "per-prompt SD",
    "kl": "KL to reference", "response_length": "answer length", "effect_sd": "rise in prompt SDs",
    "gap_closed": "gap closed",
}


@dataclass
class EvalSettings:
    """Everything `evaluate_models` needs besides the model folders."""

    prompts: str | None = None  # prepared prompt folder (held-out)
    preferences: str | None = None  # prepared preference folder (held-out)
    reference: str | None = None  # reference policy folder (KL, implicit rewards)
    reward: dict[str, Any] | None = None  # RewardSpec fields: {"kind": "model"|"rule"|"http", ...}
    pass_threshold: float | None = None  # an answer passes when its reward >= this
    num_prompts: int = 64
    num_pairs: int = 256
    n_samples: int = 4
    temperature: float = 1.0
    max_new_tokens: int = 64
    max_length: int = 256  # preference rows are truncated to this many tokens
    beta: float = 0.1  # implicit-reward scale
    seed: int = 0
    baseline: str | None = None  # model name the others are compared with (effect size, gap closed)
    timeout_s: float = 1800.0
    show: int = 3
    preference_models: list[str] | None = None  # policies scored for implicit-reward accuracy (None = every one)
    extra: dict[str, Any] = field(default_factory=dict)


def is_reward_model(folder: str | Path) -> bool:
    from relay.models.heads import CONFIG_MARKER

    cfg = Path(folder) / "config.json"
    return cfg.exists() and CONFIG_MARKER in json.loads(cfg.read_text())


def parse_reward(args: argparse.Namespace) -> dict[str, Any] | None:
    given = [(k, v) for k, v in (("model", args.reward_model), ("rule", args.reward_rule), ("http", args.reward_url)) if v]
    if len(given) > 1:
        raise ValueError("give one of --reward-model, --reward-rule, --reward-url")
    if not given:
        return None
    kind, value = given[0]
    key = {"model": "model", "rule": "rule", "http": "url"}[kind]
    if kind == "rule" and ":" not in value:
        from relay.tasks import rule_spec

        value = rule_spec(value)  # a bare task name: that task's reward
    return {"kind": kind, key: value}


# ------------------------------------------------------------------------------------------ measurements
def preference_rows(path: str, n: int, max_length: int):
    from relay.launch.train_data import load_samples

    samples = load_samples([path], "preference", max_length)
    keep = min(n, len(samples))
    samples.columns = {k: v[:keep] for k, v in samples.columns.items()}
    return samples


def summed_logps(scorer: Any, samples: Any, pad_id: int, chunk: int = 16):
    """Summed label logprobs of chosen and rejected replies under a frozen-model scorer: (N,), (N,)."""
    import torch

    from relay.launch.train_data import batches_of, collate, stacked
    from relay.learners.dpo import token_logprob_sums

    chosen, rejected = [], []
    for part in batches_of(list(range(len(samples))), chunk):
        b = stacked(collate(samples, part, pad_id, "dpo"), ("input_ids", "attention_mask", "labels"))
        lp = scorer.logprobs({"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]})
        sums, _ = token_logprob_sums(lp, torch.as_tensor(b["labels"]))
        chosen.append(sums[: len(part)])
        rejected.append(sums[len(part):])
    return torch.cat(chosen), torch.cat(rejected)


def rm_accuracy(folder: str, samples: Any, timeout_s: float, tag: str, tokenizer: str | None = None) -> dict[str, float]:
    """Ranking accuracy of a reward model on preference rows (score at each whole sequence's last token)."""
    import ray
    import torch

    from relay.actors.rewards import start_reward_actor
    from relay.evals.scores import pairwise_accuracy

    own = (Path(folder) / "tokenizer_config.json").exists()
    client = start_reward_actor({"kind": "model", "model": folder}, folder if own or not tokenizer else tokenizer,
                                name=f"eval-rm-{tag}", timeout_s=timeout_s)
    try:
        c = samples.columns
        empty = [[] for _ in c["chosen_input_ids"]]
        chosen = client.score_ids(c["chosen_input_ids"], empty)
        rejected = client.score_ids(c["rejected_input_ids"], empty)
    finally:
        ray.kill(client.actor, no_restart=True)
    out = pairwise_accuracy(torch.tensor(chosen), torch.tensor(rejected))
    return {"rm_accuracy": out["accuracy"], "rm_margin": out["margin"], "pairs": out["pairs"]}


def load_prompts(path: str, n: int, max_prompt_length: int = 512) -> list[list[int]]:
    from relay.data.shards import load_prepared

    data = load_prepared([path], "prompt")
    return [list(data[i]["input_ids"])[-max_prompt_length:] for i in range(min(n, len(data)))]


def stop_ids_for(prompt_folder: str, tokenizer: Any) -> list[int]:
    """The conversation template's stop ids saved with the prepared prompts, else the tokenizer's EOS."""
    from relay.data.templates import tokenizer_eos_ids

    info = Path(prompt_folder) / "conversation_template.json"
    if info.exists():
        ids = json.loads(info.read_text()).get("stop_ids")
        if ids:
            return [int(i) for i in ids]
    return tokenizer_eos_ids(tokenizer)


def evaluate_models(models: dict[str, str], s: EvalSettings, log=print) -> dict[str, dict[str, Any]]:
    """Every measurement that applies, per model; actors are started and stopped one model at a time."""
    import ray
    from transformers import AutoTokenizer

    from relay.actors.generator import GeneratorConfig
    from relay.actors.rewards import start_reward_actor
    from relay.actors.scorers import start_reference
    from relay.evals.scores import preference_accuracy
    from relay.launch.answer_eval import client_generate, eval_sampling, evaluate_answers

    results: dict[str, dict[str, Any]] = {name: {"path": path} for name, path in models.items()}
    policies = {n: p for n, p in models.items() if not is_reward_model(p)}
    tok_path = s.reference or next(iter(policies.values()), None) or next(iter(models.values()))
    tok = AutoTokenizer.from_pretrained(tok_path)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    pairs = preference_rows(s.preferences, s.num_pairs, s.max_length) if s.preferences else None

    for name, path in models.items():
        if path not in policies.values() and pairs is not None:
            log(f"{name}: reward-model accuracy on {len(pairs)} held-out pairs")
            results[name].update(rm_accuracy(path, pairs, s.timeout_s, name, tok_path))

    ref = start_reference(s.reference, "eval-ref", timeout_s=s.timeout_s) if s.reference and policies else None
    reward = gen = None
    try:
        if pairs is not None and ref is not None:
            ref_c, ref_r = summed_logps(ref, pairs, pad_id)
            for name, path in policies.items():
                if s.preference_models is not None and name not in s.preference_models:
                    continue
                if Path(path).resolve() == Path(s.reference).resolve():
                    # the reference against itself: every implicit reward is 0 (ties), by definition
                    results[name].update(pref_accuracy=0.5, pref_margin=0.0)
                    continue
                log(f"{name}: implicit-reward preference accuracy on {len(pairs)} held-out pairs")
                scorer = start_reference(path, f"eval-policy-{name}", timeout_s=s.timeout_s)
                try:
                    pol_c, pol_r = summed_logps(scorer, pairs, pad_id)
                finally:
                    scorer.kill()
                acc = preference_accuracy(pol_c, pol_r, ref_c, ref_r, s.beta)
                results[name].update(pref_accuracy=acc["accuracy"], pref_margin=acc["margin"])
        if s.prompts and s.reward and policies:
            prompts = load_prompts(s.prompts, s.num_prompts)
            stop = stop_ids_for(s.prompts, tok)
            reward = start_reward_actor(s.reward, tok_path, name="eval-reward", timeout_s=s.timeout_s)
            sampling = eval_sampling(s.n_samples, s.temperature, s.max_new_tokens, stop, s.seed)
            max_len = max(_max_len(path, prompts, s) for path in policies.values())
            for name, path in policies.items():
                log(f"{name}: {s.n_samples} answers to each of {len(prompts)} held-out prompts")
                gen = load_into_generator(gen, path, GeneratorConfig(model=path, seed=s.seed, max_model_len=max_len),
                                          f"eval-generator-{name}", s.timeout_s, log)
                is_ref = s.reference is not None and Path(path).resolve() == Path(s.reference).resolve()
                # the reference against itself: KL is 0 by definition, so skip the reference forward pass
                out = evaluate_answers(client_generate(gen, s.timeout_s), prompts, sampling, reward,
                                       None if is_ref else ref, tok, pad_id, stop, s.pass_threshold, s.show)
                results[name].update(out.metrics)
                if is_ref and ref is not None and s.temperature == 1.0:
                    results[name].update(kl=0.0, kl_k3=0.0, kl_per_token=0.0)
                results[name]["per_prompt"] = out.per_prompt
                results[name]["samples"] = out.samples
    finally:
        if gen is not None:
            gen.kill()
        for client in (ref, reward):
            if client is not None:
                ray.kill(client.actor, no_restart=True)
    compare(results, s)
    return results


def load_into_generator(gen: Any, path: str, cfg: Any, name: str, timeout_s: float, log=print) -> Any:
    """A generator serving `path`: the running one with the folder's weights pushed in place (one engine start
    for every model of the same architecture), else a new one."""
    from relay.actors.generator import start_generator

    if gen is not None:
        files = sorted(str(f) for f in Path(path).glob("*.safetensors"))
        try:
            if files:
                gen.update_weights(files, timeout_s=timeout_s)
                return gen
        except Exception as err:  # another architecture or shapes: this folder needs its own engine
            log(f"{Path(path).name}: weights do not fit the running engine ({type(err).__name__}), starting another")
        gen.kill()
    return start_generator(cfg, name=name, timeout_s=timeout_s)


def _max_len(path: str, prompts: list[list[int]], s: EvalSettings) -> int:
    conf = json.loads((Path(path) / "config.json").read_text())
    need = max(map(len, prompts)) + s.max_new_tokens
    return min(int(conf.get("max_position_embeddings") or need), max(need, 256))


def compare(results: dict[str, dict[str, Any]], s: EvalSettings) -> None:
    """Against the baseline model (default: the first policy): rise of the mean reward in SDs of the
    baseline's per-prompt means, and the share of the pass-rate gap to 1 that was closed."""
    with_prompts = [n for n, r in results.items() if "per_prompt" in r]
    if not with_prompts:
        return
    base = s.baseline if s.baseline in with_prompts else with_prompts[0]
    b = results[base]
    for name in with_prompts:
        if name == base:
            continue
        r = results[name]
        r["effect_sd"] = effect_in_prompt_sd(b["per_prompt"], r["per_prompt"])
        if "pass_rate" in r and "pass_rate" in b:
            r["gap_closed"] = gap_closed(b["pass_rate"], r["pass_rate"])
        r["baseline"] = base


# ------------------------------------------------------------------------------------------ output
def table_rows(results: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    keys = [k for k in SHOWN if any(isinstance(r.get(k), (int, float)) for r in results.values())]
    rows = [[name] + [f"{r[k]:.3f}" if isinstance(r.get(k), (int, float)) else "-" for k in keys]
            for name, r in results.items()]
    return ["model"] + [SHOWN[k] for k in keys], rows


def write_outputs(results: dict[str, dict[str, Any]], out: Path, settings: EvalSettings) -> tuple[Path, Path | None]:
    """eval.json (every number, settings, samples) and eval.png (one bar group per metric)."""
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "eval.json"
    from relay.redact import redact_config  # --reward-url may carry a token

    json_path.write_text(json.dumps({"settings": redact_config(settings.__dict__), "models": results}, indent=2,
                                    default=str))
    header, rows = table_rows(results)
    if len(header) < 2:
        return json_path, None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = header[1:]
    fig, axes = plt.subplots(1, len(metrics), figsize=(2.6 * len(metrics), 3.2), squeeze=False)
    for ax, col in zip(axes[0], range(1, len(header))):
        names = [r[0] for r in rows if r[col] != "-"]
        values = [float(r[col]) for r in rows if r[col] != "-"]
        ax.bar(names, values, color=[f"C{i}" for i in range(len(names))])
        ax.set_title(header[col], fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    png = out / "eval.png"
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return json_path, png


def print_table(results: dict[str, dict[str, Any]], title: str = "held-out evaluation") -> None:
    from rich.console import Console
    from rich.table import Table

    header, rows = table_rows(results)
    table = Table(title=title)
    for h in header:
        table.add_column(h, justify="left" if h == "model" else "right")
    for row in rows:
        table.add_row(*row)
    Console().print(table)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="relay eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", action="append", required=True, metavar="NAME=PATH",
                   help="a model folder to score (repeat for side-by-side); NAME= is optional")
    p.add_argument("--prompts", help="prepared held-out prompt folder (relay prepare prompt)")
    p.add_argument("--preferences", help="prepared held-out preference folder (relay prepare preference)")
    p.add_argument("--reference", help="reference policy folder (KL, implicit rewards)")
    p.add_argument("--reward-model", help="reward-model folder scoring the answers")
    p.add_argument("--reward-rule", help="'module:function' or a task name (e.g. arithmetic) scoring the answers")
    p.add_argument("--reward-url", help="HTTP reward endpoint scoring the answers")
    p.add_argument("--pass-threshold", type=finite_float(), help="an answer passes when its reward >= this (pass rate)")
    p.add_argument("--num-prompts", type=int, default=64, help="held-out prompts used (default 64)")
    p.add_argument("--num-pairs", type=int, default=256, help="held-out pairs used (default 256)")
    p.add_argument("--samples", type=int, default=4, help="answers per prompt (default 4)")
    p.add_argument("--temperature", type=finite_float(0), default=1.0, help="sampling temperature (KL needs 1.0)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--beta", type=finite_float(0), default=0.1, help="implicit-reward scale (DPO's beta)")
    p.add_argument("--baseline", help="model NAME the others are compared with (default: the first policy)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/eval", help="folder for eval.json and eval.png")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    models: dict[str, str] = {}
    for i, item in enumerate(args.model):
        name, _, path = item.rpartition("=") if "=" in item else (Path(item).parent.name or f"model{i}", "", item)
        from relay.models.smollm2 import resolve_model_path

        models[name or f"model{i}"] = str(resolve_model_path(path, "--model"))
    for what, value in (("--prompts", args.prompts), ("--preferences", args.preferences), ("--reference", args.reference)):
        if value and not Path(value).exists():
            print(f"relay eval: {what} {value} does not exist", file=sys.stderr)
            return 2
    try:
        settings = EvalSettings(prompts=args.prompts, preferences=args.preferences, reference=args.reference,
                                reward=parse_reward(args), pass_threshold=args.pass_threshold,
                                num_prompts=args.num_prompts, num_pairs=args.num_pairs, n_samples=args.samples,
                                temperature=args.temperature, max_new_tokens=args.max_new_tokens, beta=args.beta,
                                seed=args.seed, baseline=args.baseline)
    except ValueError as err:
        print(f"relay eval: {err}", file=sys.stderr)
        return 2
    from relay.launch.cluster import init_ray

    from relay import logs

    t0 = time.time()
    with logs.run_logs(Path(args.out) / "logs"):
        init_ray()
        results = evaluate_models(models, settings, log=lambda m: print(f"[relay eval] {m}", flush=True))
    json_path, png = write_outputs(results, Path(args.out), settings)
    print_table(results)
    print(f"[relay eval] {json_path}{' and ' + str(png) if png else ''} ({time.time() - t0:.0f} s)")
    return 0
