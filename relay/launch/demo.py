"""`relay demo` (`make demo`): the quickstart on SmolLM2-135M-Instruct.

Today it prepares the model from the bundled GGUF, starts a local Ray cluster and one vLLM generator actor,
and answers a few chat prompts, printing a table. The PPO issue turns it into SFT -> RM -> PPO (+ DPO).
"""
from __future__ import annotations

import argparse
import time

DEMO_PROMPTS = [
    "What is the capital of France?",
    "Give me one tip for staying focused while studying.",
    "Write a haiku about the sea.",
    "What does a reward model do in RLHF?",
]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="relay demo", description=__doc__.splitlines()[0])
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--run-dir", default="outputs/demo", help="run folder (engine sockets and caches)")
    args = parser.parse_args(argv)

    from pathlib import Path

    from rich.console import Console
    from rich.table import Table
    from transformers import AutoTokenizer

    from relay.actors.generator import GeneratorConfig, start_generator
    from relay.actors.sampling import SamplingConfig
    from relay.launch.cluster import init_ray
    from relay.models.smollm2 import prepare_smollm2

    console = Console()
    model_dir = prepare_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        for p in DEMO_PROMPTS
    ]
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    info = init_ray(num_cpus=8)
    console.print(f"[bold]Ray[/bold] cluster up; dashboard: {info.get('dashboard_url') or 'off'}")
    run_dir = Path(args.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    gen = start_generator(GeneratorConfig(model=str(model_dir), dtype=args.dtype, max_model_len=1024, run_dir=str(run_dir)), name="generator-0")
    console.print(f"vLLM generator [bold]relay/generator-0[/bold] ready in {time.time() - start:.0f} s")
    sampling = SamplingConfig(temperature=0.0, max_tokens=args.max_new_tokens, stop_token_ids=[tokenizer.eos_token_id])
    start = time.time()
    results = gen.generate(prompts, sampling)
    elapsed = time.time() - start
    table = Table(title=f"SmolLM2-135M-Instruct via vLLM (weights v{results[0].weight_version})")
    table.add_column("prompt", style="cyan", max_width=40)
    table.add_column("answer", max_width=70)
    table.add_column("tokens", justify="right")
    total = 0
    for prompt, res in zip(DEMO_PROMPTS, results):
        total += res.num_tokens
        table.add_row(prompt, tokenizer.decode(res.token_ids, skip_special_tokens=True).strip(), str(res.num_tokens))
    console.print(table)
    console.print(f"{total} tokens in {elapsed:.1f} s ({total / max(elapsed, 1e-9):.0f} tok/s, batch of {len(prompts)})")
    gen.kill()
    return 0
