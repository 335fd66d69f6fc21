"""TRL side of bench_ppo_trl: TRL 1.12's PPOTrainer (`trl.experimental.ppo`, the last TRL that has it), run with
.venv-bench's python and `.venv-bench/trl-ppo` first on PYTHONPATH (`make bench-env`); never imports Relay.

    PYTHONPATH=.venv-bench/trl-ppo .venv-bench/bin/python benchmarks/trl_ppo_worker.py --model DIR --reward DIR ...

Policy and reference from `--model`, reward and value models from `--reward` (a sequence-classification folder:
SmolLM2 with a one-output score head). Writes each PPO update's wall time (generation, scoring, one PPO epoch,
optimizer) to `--out`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from trl_common import set_worker_env, step_timer  # sibling module: this script's folder is on sys.path

set_worker_env()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--reward", required=True)
    ap.add_argument("--prompts", required=True, help="JSON list of prompt token-id lists")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--prompts-per-step", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--kl-coef", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bf16", action="store_true", help="PPOConfig.bf16: bf16 autocast on CPU too")
    args = ap.parse_args()

    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    prompts = json.load(open(args.prompts))
    ds = Dataset.from_list([{"input_ids": p} for p in prompts])

    def load(cls, path):
        return cls.from_pretrained(path, dtype=torch.float32, **({"num_labels": 1} if cls is not AutoModelForCausalLM else {}))

    cfg = PPOConfig(
        output_dir=os.path.join(os.path.dirname(os.path.abspath(args.out)), "trl_ppo_out"),
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.prompts_per_step // args.micro_batch,
        local_rollout_forward_batch_size=args.micro_batch,
        num_mini_batches=1, num_ppo_epochs=1, total_episodes=args.steps * args.prompts_per_step,
        response_length=args.max_new_tokens, temperature=1.0, stop_token="eos", missing_eos_penalty=None,
        kl_coef=args.kl_coef, learning_rate=args.lr, lr_scheduler_type="constant", use_cpu=True, bf16=args.bf16,
        fp16=False, report_to=[], save_strategy="no", logging_steps=1, num_sample_generations=0, seed=0,
        dataloader_num_workers=0, gradient_checkpointing=False,
    )

    timer = step_timer("ppo", chained=True)
    trainer = PPOTrainer(
        args=cfg, processing_class=tok, model=load(AutoModelForCausalLM, args.model),
        ref_model=load(AutoModelForCausalLM, args.model), reward_model=load(AutoModelForSequenceClassification, args.reward),
        value_model=load(AutoModelForSequenceClassification, args.reward), train_dataset=ds, callbacks=[timer],
    )
    t0 = time.perf_counter()
    trainer.train()
    json.dump({"steps": timer.steps, "total_s": time.perf_counter() - t0, "trl": trl.__version__,
               "samples_per_step": args.prompts_per_step, "threads": args.threads, "bf16": args.bf16}, open(args.out, "w"), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
