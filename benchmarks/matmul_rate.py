"""This machine's matmul rate with torch at a model's own shapes: the ceiling an update's achieved GFLOP/s is
compared with (`relay.models.flops`).

The shapes are one decoder layer's linear layers at `tokens` rows (a micro-batch's tokens): q/o (h x h), k/v
(h x kv_heads*head_dim), gate/up (h x intermediate) and down (intermediate x h), each in the three orientations a
training step runs (forward X.W, input gradient dY.W^T, weight gradient X^T.dY), weighted by how often a layer
runs each. The rate is their FLOPs over their summed median times: what a perfect update of this model could
reach on these kernels. fp32 always; bf16 only where the CPU computes it natively (`relay.cpu.bf16_is_fast`:
AVX512_BF16 or AMX), else skipped with the reason (AVX2-only CPUs emulate bf16). Timed at the thread count
the update uses (`actor_learner.num_threads`, 1 by default); medians of interleaved rounds, so a machine shared
with other work gives a rate under the same load as the update measured beside it.

    python -m benchmarks.matmul_rate [--model smollm2|DIR] [--threads 1] [--tokens 512] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any, Mapping

from benchmarks.common import set_bench_env

set_bench_env()


def layer_matmuls(config: Mapping[str, Any] | Any, tokens: int) -> list[tuple[str, int, int, int, int]]:
    """(name, M, K, N, count per layer) of one decoder layer's training matmuls at `tokens` rows."""
    get = (lambda k: config.get(k)) if isinstance(config, Mapping) else (lambda k: getattr(config, k, None))
    h, inter, heads = get("hidden_size"), get("intermediate_size"), get("num_attention_heads")
    head_dim = get("head_dim") or h // heads
    kv = (get("num_key_value_heads") or heads) * head_dim
    out = []
    for name, k_in, n_out, count in (("q/o", h, heads * head_dim, 2), ("k/v", h, kv, 2),
                                     ("gate/up", h, inter, 2), ("down", inter, h, 1)):
        out += [(f"{name} fwd", tokens, k_in, n_out, count),  # X [T, in] . W [in, out]
                (f"{name} dX", tokens, n_out, k_in, count),  # dY [T, out] . W^T
                (f"{name} dW", k_in, tokens, n_out, count)]  # X^T [in, T] . dY [T, out]
    return out


def _time_once(a, b, c, iters: int) -> float:
    import torch

    t = time.perf_counter()
    for _ in range(iters):
        torch.mm(a, b, out=c)
    return (time.perf_counter() - t) / iters


def measure(shapes: list[tuple[str, int, int, int, int]], dtype: str, rounds: int = 5, min_s: float = 0.05) -> dict[str, Any]:
    """Per-shape GFLOP/s (median over `rounds` interleaved rounds of >= `min_s` each) and the count-weighted
    aggregate: sum(count x FLOPs) / sum(count x median time)."""
    import torch

    torch.manual_seed(0)
    dt = getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[dtype])
    mats = [(torch.randn(m, k, dtype=dt), torch.randn(k, n, dtype=dt), torch.empty(m, n, dtype=dt)) for _, m, k, n, _ in shapes]
    iters = []
    for a, b, c in mats:  # warm-up, and enough iterations per round to last min_s
        per = _time_once(a, b, c, 2)
        iters.append(max(1, int(min_s / max(per, 1e-7))))
    times: list[list[float]] = [[] for _ in shapes]
    for _ in range(rounds):
        for i, (a, b, c) in enumerate(mats):
            times[i].append(_time_once(a, b, c, iters[i]))
    per_shape, flops_sum, time_sum = [], 0.0, 0.0
    for (name, m, k, n, count), ts in zip(shapes, times):
        med, flops = statistics.median(ts), 2.0 * m * k * n
        per_shape.append({"name": name, "m": m, "k": k, "n": n, "gflops": round(flops / med / 1e9, 2)})
        flops_sum += count * flops
        time_sum += count * med
    return {"gflops": flops_sum / time_sum / 1e9, "per_shape": per_shape}


def bf16_skip_reason() -> str | None:
    """None where this CPU computes bf16 natively, else one line saying why the bf16 rate is not measured."""
    from relay.cpu import bf16_is_fast, bf16_slow_reason

    return None if bf16_is_fast() else f"bf16 skipped: {bf16_slow_reason()}"


def matmul_rate(config: Mapping[str, Any] | Any, threads: int = 1, tokens: int = 512, rounds: int = 5,
                dtypes: tuple[str, ...] = ("fp32", "bf16")) -> dict[str, Any]:
    """{"threads", "tokens", "fp32": {"gflops", "per_shape"}, "bf16": {...} or {"skipped": reason}} at this
    process's torch, with torch set to `threads` threads for the measurement (restored after)."""
    import torch

    from relay.cpu import cpu_capabilities

    shapes = layer_matmuls(config, tokens)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out: dict[str, Any] = {"threads": threads, "tokens": tokens, "cpu": cpu_capabilities().label}
        for dtype in dtypes:
            reason = bf16_skip_reason() if dtype == "bf16" else None
            out[dtype] = {"skipped": reason} if reason else measure(shapes, dtype, rounds)
    finally:
        torch.set_num_threads(before)
    return out


def rate_line(rate: Mapping[str, Any]) -> str:
    """One line: "matmul rate: fp32 95.1 GFLOP/s, bf16 201.3 GFLOP/s (1 thread, 512-token layer shapes)"."""
    parts = []
    for dtype in ("fp32", "bf16"):
        r = rate.get(dtype)
        if r is None:
            continue
        parts.append(f"{dtype} {r['gflops']:.1f} GFLOP/s" if "gflops" in r else r["skipped"])
    n = rate["threads"]
    return f"matmul rate: {', '.join(parts)} ({n} thread{'s' if n != 1 else ''}, {rate['tokens']}-token layer shapes)"


def model_config(model: str) -> Any:
    """The transformers config of a bundled name ('smollm2') or a model folder, as the benchmarks load it."""
    from transformers import AutoConfig

    from relay.models.smollm2 import resolve_model_path

    return AutoConfig.from_pretrained(resolve_model_path(model))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help="bundled name or model folder whose shapes are timed")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the update's actor_learner.num_threads)")
    ap.add_argument("--tokens", type=int, default=512, help="rows of each matmul (tokens of a micro-batch)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--per-shape", action="store_true", help="also print each shape's rate")
    ap.add_argument("--json", default=None, help="write the result here")
    args = ap.parse_args(argv)
    rate = matmul_rate(model_config(args.model), args.threads, args.tokens, args.rounds)
    if args.per_shape:
        for dtype in ("fp32", "bf16"):
            for s in rate[dtype].get("per_shape", []):
                print(f"  {dtype} {s['name']:12s} {s['m']:5d}x{s['k']:5d}x{s['n']:5d} {s['gflops']:8.1f} GFLOP/s")
    print(rate_line(rate))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rate, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
