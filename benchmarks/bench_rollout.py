"""Rollout benchmark: Relay's vLLM generator actor against transformers `generate`, and 1 against 2 generators.

SmolLM2-135M-Instruct, the first user turns of `--prompts` chitchat conversations in the model's chat template,
`--new-tokens` sampled tokens per prompt (temperature 1, EOS ignored on both sides so every sample has exactly
that many tokens), in bf16 and fp32. Relay's side is a `Generator` Ray actor (in-process vLLM engine on CPU,
returning token ids and per-token logprobs); the peer is `model.generate(do_sample=True)` on the whole batch
(left padding) in this process. For each dtype and thread count one engine is started and the two sides
alternate `--repeats` times; the table gives medians, the ratio at equal threads and "best vs best" (each side
at its fastest thread count).

Scaling: two 1-thread generators with half the prompts each (concurrently) against one with all of them,
alternating, in `--scaling-dtype`.

    python -m benchmarks.bench_rollout [--repeats 3] [--threads 1,2] [--dtypes bfloat16,float32] [--out DIR]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from benchmarks.common import int_list, name_list, set_bench_env, write_results

set_bench_env()


def load() -> float:
    return round(os.getloadavg()[0], 2)


def build_prompts(tok, n: int, max_prompt_tokens: int = 96) -> list[list[int]]:
    """The first user turns of chitchat conversations, in the chat template, at most `max_prompt_tokens` long
    (a few first turns are whole essays: one of 1,782 tokens would make the padded HF batch 30x wider)."""
    from relay.data.demo import chitchat_conversations

    out = []
    for c in chitchat_conversations():
        if not (c and c[0].strip()):
            continue
        ids = list(tok.apply_chat_template([{"role": "user", "content": c[0]}], add_generation_prompt=True,
                                           tokenize=True, return_dict=False))
        if len(ids) <= max_prompt_tokens:
            out.append(ids)
        if len(out) == n:
            return out
    return out


def hf_generate(model, tok, prompts: list[list[int]], new_tokens: int, threads: int, seed: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    torch.manual_seed(seed)
    l0 = load()
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0,
                             top_k=0, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad)
    wall = time.perf_counter() - t
    tokens = int((out[:, width:] != -1).sum())  # min_new_tokens: every row has exactly new_tokens
    return {"wall_s": wall, "tokens": tokens, "tok_s": tokens / wall, "load": l0}


def relay_generate(clients, prompts: list[list[int]], new_tokens: int, seed: int) -> dict:
    import ray

    from relay.actors.sampling import SamplingConfig

    sampling = SamplingConfig(n=1, temperature=1.0, max_tokens=new_tokens, ignore_eos=True, seed=seed)
    parts = [prompts[i::len(clients)] for i in range(len(clients))]
    l0 = load()
    t = time.perf_counter()
    refs = [c.generate_async(p, sampling) for c, p in zip(clients, parts)]
    outs = ray.get(refs, timeout=900)
    wall = time.perf_counter() - t
    tokens = sum(len(r.token_ids) for out in outs for r in out)
    assert all(len(r.logprobs) == len(r.token_ids) for out in outs for r in out)
    return {"wall_s": wall, "tokens": tokens, "tok_s": tokens / wall, "load": l0}


def med(rows: list[dict], key: str = "tok_s") -> float:
    return statistics.median(r[key] for r in rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--max-prompt-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int_list, default="1,2", help="thread counts to try on both sides")
    ap.add_argument("--dtypes", type=name_list, default="bfloat16,float32")
    ap.add_argument("--scaling-dtype", default="bfloat16", help="dtype of the 1-vs-2-generator test ('' = skip)")
    ap.add_argument("--out", default="runs/bench_rollout")
    args = ap.parse_args(argv)
    threads = args.threads
    dtypes = args.dtypes

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from relay.actors.generator import GeneratorConfig, start_generator
    from relay.launch.cluster import init_ray
    from relay.models.smollm2 import prepare_smollm2

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_dir = prepare_smollm2()
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = build_prompts(tok, args.prompts, args.max_prompt_tokens)
    max_len = max(map(len, prompts)) + args.new_tokens + 8
    init_ray(address="local", num_cpus=16, include_dashboard=False)

    def engine(dtype: str, t: int, name: str):
        cfg = GeneratorConfig(model=str(model_dir), dtype=dtype, max_model_len=max_len, cpu_threads=t,
                              run_dir=str((out_dir / "vllm" / name).resolve()))
        return start_generator(cfg, name=f"bench-rollout-{name}", timeout_s=600)

    runs: dict[str, list[dict]] = {}

    def log(key: str, r: dict) -> None:
        runs.setdefault(key, []).append(r)
        print(f"  {key:28s} {r['tok_s']:8.1f} tok/s  ({r['wall_s']:.1f} s, load {r['load']})", file=sys.stderr,
              flush=True)

    # -- Relay generator vs transformers generate, per dtype and thread count -------------------------------
    for dtype in dtypes:
        torch_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).eval()
        for t in threads:
            gen = engine(dtype, t, f"{dtype}-t{t}")
            print(f"{dtype}, {t} thread(s): engine up in {gen.info['start_s']:.1f} s", file=sys.stderr)
            relay_generate([gen], prompts[:4], 8, seed=0)  # warm-up both sides
            hf_generate(hf, tok, prompts[:4], 8, t, seed=0)
            for rep in range(args.repeats):
                log(f"relay/{dtype}/t{t}", relay_generate([gen], prompts, args.new_tokens, seed=rep))
                log(f"hf/{dtype}/t{t}", hf_generate(hf, tok, prompts, args.new_tokens, t, seed=rep))
            gen.kill()
        del hf

    # -- 1 vs 2 generators (1 thread each) ------------------------------------------------------------------
    if args.scaling_dtype:
        a = engine(args.scaling_dtype, 1, "scale-a")
        b = engine(args.scaling_dtype, 1, "scale-b")
        relay_generate([a, b], prompts[:4], 8, seed=0)
        for rep in range(args.repeats):
            log("gen1", relay_generate([a], prompts, args.new_tokens, seed=rep))
            log("gen2", relay_generate([a, b], prompts, args.new_tokens, seed=rep))
        a.kill()
        b.kill()

    # -- table ----------------------------------------------------------------------------------------------
    rows = []
    print(f"\nRollout, SmolLM2-135M, {len(prompts)} prompts x {args.new_tokens} new tokens, sampling "
          f"(median of {args.repeats}, tok/s)")
    print(f"{'dtype':9s} {'threads':>7s} {'Relay vLLM':>11s} {'HF generate':>12s} {'ratio':>6s} {'load':>6s}")
    summary: dict = {"dtypes": {}}
    for dtype in dtypes:
        best_r = max((med(runs[f"relay/{dtype}/t{t}"]), t) for t in threads)
        best_h = max((med(runs[f"hf/{dtype}/t{t}"]), t) for t in threads)
        for t in threads:
            r, h = med(runs[f"relay/{dtype}/t{t}"]), med(runs[f"hf/{dtype}/t{t}"])
            ld = med(runs[f"relay/{dtype}/t{t}"] + runs[f"hf/{dtype}/t{t}"], "load")
            print(f"{dtype:9s} {t:7d} {r:11.1f} {h:12.1f} {r / h:6.2f} {ld:6.2f}")
            rows.append({"dtype": dtype, "threads": t, "relay_tok_s": r, "hf_tok_s": h, "ratio": r / h, "load": ld})
        print(f"{dtype:9s} {'best':>7s} {best_r[0]:11.1f} {best_h[0]:12.1f} {best_r[0] / best_h[0]:6.2f}"
              f"   (Relay {best_r[1]} thr, HF {best_h[1]} thr)")
        summary["dtypes"][dtype] = {"relay_best_tok_s": best_r[0], "relay_best_threads": best_r[1],
                                    "hf_best_tok_s": best_h[0], "hf_best_threads": best_h[1],
                                    "ratio_best": best_r[0] / best_h[0]}
    overall_r = max(v["relay_best_tok_s"] for v in summary["dtypes"].values())
    overall_h = max(v["hf_best_tok_s"] for v in summary["dtypes"].values())
    summary["ratio_best_overall"] = overall_r / overall_h
    print(f"best of all settings: Relay {overall_r:.1f} tok/s vs HF {overall_h:.1f} tok/s = "
          f"{overall_r / overall_h:.2f}x (goal >= 2.5x)")
    if args.scaling_dtype:
        g1, g2 = med(runs["gen1"]), med(runs["gen2"])
        summary["scaling"] = {"dtype": args.scaling_dtype, "gen1_tok_s": g1, "gen2_tok_s": g2, "ratio": g2 / g1,
                              "load": round(med(runs["gen1"] + runs["gen2"], "load"), 2)}
        print(f"1 generator {g1:.1f} tok/s, 2 generators {g2:.1f} tok/s: {g2 / g1:.2f}x (goal >= 1.7x; "
              f"{os.cpu_count()} cores, load {summary['scaling']['load']})")

    result = {"benchmark": "rollout", "model": "SmolLM2-135M-Instruct", "prompts": len(prompts),
              "prompt_tokens": [min(map(len, prompts)), max(map(len, prompts))],
              "new_tokens": args.new_tokens, "repeats": args.repeats, "threads": threads, "rows": rows,
              "summary": summary, "runs": runs, "load_after": os.getloadavg()}
    write_results(out_dir, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
