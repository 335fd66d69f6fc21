"""The learner's update step alone, as a fraction of this machine's matmul rate: before/after in one process.

One GRPO-shaped micro-batch (`--groups` prompts x `--samples` responses, prompt `--prompt` tokens, responses of
ragged length up to `--response`) through `relay.learners.ppo.ppo_actor_loss` on SmolLM2-135M (the converted
copy the benchmarks use), forward + backward, no Ray. Variants, interleaved `--repeats` times (medians):

- `before`: the loss with the one-shot fp32 `log_softmax(logits).gather` and a second log-softmax for the
  entropy metric (the code before the chunked logprobs; patched in for this variant only),
- `chunked`: the loss as it is (chunked logprobs, entropy from the same pass),
- `chunked+bf16`: the same under bf16 autocast (`autocast="bf16"`), only where the CPU has native bf16,
- `compiled`, `compiled+bf16` (asked for by `--variants`): the same two with the model under
  `torch.compile(dynamic=True)` (inductor, C++ on CPU); the warm-up step, which compiles, is timed apart.

Achieved GFLOP/s = `relay.models.flops.update_flops` (prompt tokens once per group when the shared-prompt
forward is on; padding not counted) / step time; the matmul rate (`benchmarks.matmul_rate`, fp32 and bf16, at
`--threads`) is measured before and after the variants and averaged. An AdamW step is timed separately.

    python -m benchmarks.bench_update_step [--repeats 5] [--no-shared-prompt] [--threads 1] [--json PATH]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from typing import Any

from benchmarks.common import machine_info, name_list, set_bench_env

set_bench_env()


def grpo_batch(vocab: int, groups: int, samples: int, prompt: int, response: int, seed: int = 0) -> dict[str, Any]:
    """input_ids [B, P + R] (each group's prompt repeated for its samples), attention/action masks with
    ragged response lengths (right padding), advantages ~ N(0, 1); old logprobs are filled in later."""
    import torch

    g = torch.Generator().manual_seed(seed)
    B, S = groups * samples, prompt + response
    ids = torch.randint(3, vocab, (B, S), generator=g)
    for i in range(groups):
        ids[i * samples : (i + 1) * samples, :prompt] = ids[i * samples, :prompt]
    lengths = torch.randint(response // 2, response + 1, (B,), generator=g)
    lengths[0] = response
    action = (torch.arange(response)[None, :] < lengths[:, None]).long()
    attn = torch.cat([torch.ones(B, prompt, dtype=torch.long), action], dim=1)
    ids[:, prompt:][action == 0] = 2  # pad id
    return {"input_ids": ids, "attention_mask": attn, "action_mask": action,
            "advantages": torch.randn(B, response, generator=g) * action}


def token_counts(batch: dict[str, Any], samples: int, shared: bool) -> tuple[int, int]:
    """(tokens the forward must compute, positions whose logits are used): real tokens, prompts once per group
    when shared."""
    A = batch["action_mask"].shape[1]
    prompt_tokens = int(batch["attention_mask"][:, :-A].sum())
    if shared:
        prompt_tokens //= samples
    actions = int(batch["action_mask"].sum())
    return prompt_tokens + actions, actions


@contextlib.contextmanager
def before_logprobs():
    """Patch the loss back to the one-shot fp32 log-softmax (and a second one for the entropy metric)."""
    import torch

    import relay.learners.ppo as ppo
    from relay.algos.losses import entropy_from_logits

    def old(logits, tokens, temperature=1.0):
        z = logits.float() / temperature if temperature != 1.0 else logits
        logp = torch.log_softmax(z.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        with torch.no_grad():
            entropy = entropy_from_logits(z.detach())
        return logp, entropy

    saved = ppo.chunked_logprobs
    ppo.chunked_logprobs = old
    try:
        yield
    finally:
        ppo.chunked_logprobs = saved


def step_seconds(model, batch: dict[str, Any], kw: dict[str, Any]) -> float:
    from relay.learners.ppo import ppo_actor_loss

    model.zero_grad(set_to_none=True)
    t = time.perf_counter()
    loss, _ = ppo_actor_loss(model, batch, **kw)
    loss.backward()
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--groups", type=int, default=1)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=40)
    ap.add_argument("--response", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-shared-prompt", action="store_true")
    ap.add_argument("--variants", type=name_list, default="before,chunked,chunked+bf16")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    from benchmarks.matmul_rate import bf16_skip_reason, matmul_rate, rate_line
    from relay.models.flops import achieved_gflops, param_split, update_flops
    from relay.models.smollm2 import resolve_model_path

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(args.model), dtype=torch.float32)
    model.train()
    cfg = model.config
    shared = not args.no_shared_prompt
    batch = grpo_batch(cfg.vocab_size, args.groups, args.samples, args.prompt, args.response)
    from relay.learners.ppo import response_logprobs

    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        batch["old_logprobs"] = response_logprobs(out.logits, batch["input_ids"], args.response) * batch["action_mask"]
    tokens, logit_tokens = token_counts(batch, args.samples, shared)
    flops = update_flops(param_split(cfg), tokens, logit_tokens)
    rate_tokens = int(batch["attention_mask"].sum())

    variants = args.variants
    skip = bf16_skip_reason()
    for v in [v for v in variants if v.endswith("+bf16")] if skip else []:
        variants.remove(v)
        print(f"{v} {skip}")
    base_kw = {"shared_prompt": shared, "num_threads": args.threads}
    kws = {"before": base_kw, "chunked": base_kw, "chunked+bf16": {**base_kw, "autocast": "bf16"},
           "compiled": base_kw, "compiled+bf16": {**base_kw, "autocast": "bf16"}}
    compiled = torch.compile(model, dynamic=True) if any(v.startswith("compiled") for v in variants) else None
    models = {v: compiled if v.startswith("compiled") else model for v in variants}
    rates = [matmul_rate(cfg, args.threads, rate_tokens)]
    print(rate_line(rates[0]), flush=True)
    times: dict[str, list[float]] = {v: [] for v in variants}
    warmup_s = {}
    for v in variants:  # warm-up (compiles the compiled variants)
        with before_logprobs() if v == "before" else contextlib.nullcontext():
            warmup_s[v] = step_seconds(models[v], batch, kws[v])
    print("  warm-up: " + ", ".join(f"{v} {s:.1f} s" for v, s in warmup_s.items()), flush=True)
    for rep in range(args.repeats):
        for v in variants:
            with before_logprobs() if v == "before" else contextlib.nullcontext():
                times[v].append(step_seconds(models[v], batch, kws[v]))
        print(f"  repeat {rep}: " + ", ".join(f"{v} {times[v][-1]:.2f} s" for v in variants), flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-9)
    opt_s = []
    for _ in range(3):
        t = time.perf_counter()
        opt.step()
        opt_s.append(time.perf_counter() - t)
    rates.append(matmul_rate(cfg, args.threads, rate_tokens))
    print(rate_line(rates[1]), flush=True)
    ceiling = {d: statistics.mean(r[d]["gflops"] for r in rates) for d in ("fp32", "bf16") if "gflops" in rates[0][d]}
    best_ceiling = {d: max(r[d]["gflops"] for r in rates) for d in ceiling}

    B = batch["input_ids"].shape[0]
    print(f"\nupdate step, SmolLM2-135M fp32 weights, {args.groups} x {args.samples} sequences x (prompt {args.prompt} + "
          f"response <= {args.response}), shared prompt {'on' if shared else 'off'}, {args.threads} thread(s), "
          f"{tokens} tokens computed, {logit_tokens} with logits, {flops / 1e9:.1f} GFLOP per forward+backward; "
          f"medians of {args.repeats}, load {machine_info()['loadavg']}")
    rows = []
    for v in variants:
        med = statistics.median(times[v])
        gf = achieved_gflops(flops, med)
        dtype = "bf16" if v.endswith("bf16") else "fp32"
        best = achieved_gflops(flops, min(times[v]))
        row = {"variant": v, "step_s": med, "times": times[v], "gflops": gf, "best_gflops": best,
               "vs_fp32": gf / ceiling["fp32"]}
        if "bf16" in ceiling:
            row["vs_bf16"] = gf / ceiling["bf16"]
        rows.append(row)
        print(f"{v:13s} {med:6.2f} s  {gf:6.1f} GFLOP/s = {gf / ceiling[dtype]:5.1%} of the {dtype} matmul rate "
              f"({ceiling[dtype]:.1f})" + (f", {gf / ceiling['fp32']:5.1%} of fp32's" if dtype != "fp32" else "")
              + f"; fastest repeat {min(times[v]):.2f} s = {best / best_ceiling[dtype]:.1%} of the fastest rate")
    if "before" in times:
        for r in rows[1:]:
            print(f"{r['variant']} / before: {statistics.median(times['before']) / r['step_s']:.2f}x faster")
    for v, plain in (("compiled", "chunked"), ("compiled+bf16", "chunked+bf16")):
        if v in times and plain in times:
            print(f"{v} / {plain}: {statistics.median(times[plain]) / statistics.median(times[v]):.2f}x faster "
                  f"(its first step, which compiles: {warmup_s[v]:.1f} s)")
    print(f"AdamW step (134.5M fp32 parameters): {statistics.median(opt_s):.2f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "tokens": tokens, "logit_tokens": logit_tokens, "flops": flops, "rows": rows,
                       "matmul_rates": rates, "optimizer_s": opt_s, "warmup_s": warmup_s, "rows_b": B, "bf16_skipped": skip,
                       "machine": machine_info()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
