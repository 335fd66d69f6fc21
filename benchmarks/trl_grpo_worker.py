"""TRL side of bench_grpo_trl: run in the peer environment (`make bench-env`, .venv-bench), never imports Relay.

    .venv-bench/bin/python benchmarks/trl_grpo_worker.py --model DIR --prompts prompts.json --out result.json ...

Trains TRL's GRPOTrainer for `--steps` optimizer steps and writes the wall time of each step (generation +
reward + loss + optimizer, as TRL runs them) to `--out`. The reward is the same rule as Relay's
`relay.actors.scorers:low_token_share` (share of response tokens, EOS excluded, with id < 512), copied here
because this environment has no Relay.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

from trl_common import set_worker_env, step_timer  # sibling module: this script's folder is on sys.path

set_worker_env()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", required=True, help="JSON list of prompt texts (chat template already applied)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--prompts-per-step", type=int, default=8)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bf16", action="store_true", help="TrainingArguments.bf16: bf16 autocast on CPU too")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model)
    eos = {int(tok.eos_token_id)} if tok.eos_token_id is not None else set()

    def low_token_share(prompts, completions, completion_ids=None, **_):
        out = []
        for ids in completion_ids:
            ids = [int(t) for t in ids if int(t) not in eos]
            out.append(sum(1 for t in ids if t < 512) / max(1, len(ids)))
        return out

    texts = json.load(open(args.prompts))
    ds = Dataset.from_list([{"prompt": t} for t in texts])
    completions = args.prompts_per_step * args.generations
    cfg = GRPOConfig(
        output_dir=os.path.join(os.path.dirname(os.path.abspath(args.out)), "trl_out"),
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=completions // args.micro_batch,
        num_generations=args.generations,
        max_completion_length=args.max_new_tokens,
        max_steps=args.steps,
        learning_rate=args.lr,
        beta=0.0,  # no reference model (Relay's run uses kl_coef 0 too)
        temperature=1.0,
        top_p=1.0,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        bf16=args.bf16,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        seed=args.seed,
        disable_tqdm=True,
    )
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)

    timer = step_timer("grpo", chained=True)
    trainer = GRPOTrainer(model=model, reward_funcs=[low_token_share], args=cfg, train_dataset=ds,
                          processing_class=tok, callbacks=[timer])
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    logs = [h for h in trainer.state.log_history if "reward" in h]
    json.dump({"steps": timer.steps, "total_s": total, "samples_per_step": completions, "logs": logs,
               "threads": args.threads, "bf16": args.bf16, "torch": torch.__version__,
               "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
               "trl": __import__("trl").__version__, "transformers": __import__("transformers").__version__},
              open(args.out, "w"), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
