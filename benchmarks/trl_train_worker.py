"""TRL side of bench_train_trl (SFT or DPO): run with .venv-bench's python (`make bench-env`); never imports Relay.

    .venv-bench/bin/python benchmarks/trl_train_worker.py sft|dpo --model DIR --data rows.json --out result.json

Rows come pre-tokenized from Relay's prepared data (so both sides train on the same token ids): SFT rows are
`input_ids` + `assistant_masks` (1 on the tokens Relay's labels keep); DPO rows are `prompt`, `chosen`,
`rejected` texts (decoded from Relay's ids: TRL 1.16's DPOTrainer tokenizes text itself). TRL at its best settings on CPU: fp32, no gradient checkpointing, DPO with precomputed reference
logprobs (the reference pass is outside the timed steps, as on Relay's side). Writes each step's wall time.
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
    ap.add_argument("stage", choices=("sft", "dpo"))
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model)
    rows = json.load(open(args.data))
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    common = dict(output_dir=os.path.join(os.path.dirname(os.path.abspath(args.out)), f"trl_{args.stage}"),
                  per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1, max_steps=args.steps,
                  learning_rate=args.lr, lr_scheduler_type="constant", logging_steps=1, report_to=[],
                  save_strategy="no", use_cpu=True, bf16=False, gradient_checkpointing=False,
                  dataloader_num_workers=0, seed=0, disable_tqdm=True, max_length=args.max_length)

    timer = step_timer(args.stage, chained=False)
    if args.stage == "sft":
        from trl import SFTConfig, SFTTrainer

        cfg = SFTConfig(**common, assistant_only_loss=False, completion_only_loss=False, packing=False)
        ds = Dataset.from_list(rows)
        trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[timer])
    else:
        from trl import DPOConfig, DPOTrainer

        cfg = DPOConfig(**common, beta=args.beta, precompute_ref_log_probs=True)
        ds = Dataset.from_list(rows)
        trainer = DPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[timer])
    t0 = time.perf_counter()
    trainer.train()
    json.dump({"stage": args.stage, "steps": timer.steps, "total_s": time.perf_counter() - t0,
               "trl": __import__("trl").__version__, "threads": args.threads,
               "logs": trainer.state.log_history}, open(args.out, "w"), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
