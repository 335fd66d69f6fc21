"""TRL side of bench_learn_race: run in the peer environment (`make bench-env`, .venv-bench), never imports Relay.

    .venv-bench/bin/python benchmarks/trl_race_worker.py --model DIR --prompts prompts.json --out DIR ...

Trains TRL's GRPOTrainer on the arithmetic task for `--steps` optimizer steps and saves the policy (fp32,
safetensors, `save_pretrained`) before the first step and every `--eval-every` steps (and after the last) as
OUT/ckpt/step_NNNN, each with the training wall-clock at that moment. The clock starts when training starts
(`on_train_begin`: model loading and trainer construction are set-up, as Relay's actor start-up is) and stops
while a checkpoint is being written, so saving costs TRL nothing. The driver scores the folders afterwards with
the same held-out evaluation Relay runs during its own training. OUT/result.json: checkpoints, per-step times,
TRL's logged rewards, versions.

The prompts come in the order Relay's run draws them (one optimizer step = the next `--prompts-per-step`
prompts, shuffle_dataset=False), as text with the chat template already applied; `--prompt-ids` (the token ids
Relay trains on) are checked against TRL's own tokenization of the text. The reward is the rule of
`relay.tasks.arithmetic:reward`, copied here because this environment has no Relay.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

from trl_common import set_worker_env  # sibling module: this script's folder is on sys.path

set_worker_env()

# --- relay/tasks/arithmetic.py's reward, verbatim in behaviour ---------------------------------------------
_QUESTION = re.compile(r"What is (-?\d+) ([+\-*]) (-?\d+)\?")
_NUMBER = re.compile(r"-?\d+")


def _solve(a: int, op: str, b: int) -> int:
    return {"+": a + b, "-": a - b, "*": a * b}[op]


def arithmetic_reward(prompt: str, response: str) -> float:
    """1.0 when the reply's first number is the answer to the prompt's (last) question, else 0.0."""
    found = _QUESTION.findall(prompt)
    if not found:
        return 0.0
    a, op, b = found[-1]
    first = _NUMBER.search(response)
    return 1.0 if first is not None and int(first.group()) == _solve(int(a), op, int(b)) else 0.0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", required=True, help="JSON list of prompt texts in step order (template applied)")
    ap.add_argument("--prompt-ids", default=None, help="JSON list of the token ids Relay trains on, same order")
    ap.add_argument("--out", required=True, help="folder: result.json and ckpt/step_NNNN")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--prompts-per-step", type=int, default=8)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--micro-batch", type=int, default=16, help="completions per micro-batch")
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--adam-beta1", type=float, default=0.9)
    ap.add_argument("--adam-beta2", type=float, default=0.95)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--clip-eps", type=float, default=0.2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args()

    t_setup = time.perf_counter()
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model)
    texts = json.load(open(args.prompts))
    completions = args.prompts_per_step * args.generations
    if len(texts) < args.steps * args.prompts_per_step:
        raise SystemExit(f"{len(texts)} prompts for {args.steps} steps of {args.prompts_per_step}")
    if completions % args.micro_batch or args.micro_batch % args.generations:
        raise SystemExit("--micro-batch must divide prompts-per-step x generations and be a multiple of generations")
    mismatched = 0
    if args.prompt_ids:  # TRL tokenizes the text itself (`processing_class(text=prompts)`): same ids as Relay's?
        want = json.load(open(args.prompt_ids))
        got = tok(text=texts)["input_ids"]
        mismatched = sum(1 for a, b in zip(want, got) if list(a) != list(b))
        if mismatched:
            raise SystemExit(f"{mismatched} of {len(texts)} prompts tokenize differently in TRL than in Relay")

    def reward(prompts, completions, **_):
        return [arithmetic_reward(p, c) for p, c in zip(prompts, completions)]

    reward.__name__ = "arithmetic"

    out = os.path.abspath(args.out)
    os.makedirs(os.path.join(out, "ckpt"), exist_ok=True)
    cfg = GRPOConfig(
        output_dir=os.path.join(out, "trl_out"),
        # one optimizer step = prompts_per_step prompts x generations completions, in micro-batches of
        # micro_batch completions (Relay: experience_batch_size x n_samples_per_prompt = train_batch_size x
        # accumulation_steps); steps_per_generation defaults to gradient_accumulation_steps: one generation
        # batch per optimizer step, as Relay generates one episode per update
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=completions // args.micro_batch,
        num_generations=args.generations,
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_steps=args.steps,
        shuffle_dataset=False,  # prompts already in Relay's order
        # optimizer = Relay's actor_optim in configs/demo_grpo.yaml: AdamW(lr, betas (0.9, 0.95), eps 1e-8, wd 0),
        # grad-norm clip 1.0, constant learning rate (min_lr_ratio 1.0), no warm-up
        learning_rate=args.lr,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_epsilon=1e-8,
        weight_decay=args.weight_decay,
        max_grad_norm=args.grad_clip,
        lr_scheduler_type="constant",
        warmup_steps=0,
        # the loss = Relay's grpo: advantage (r - group mean) / (group std, unbiased) (scale_rewards="group";
        # TRL adds 1e-4 to the std, Relay 1e-6), PPO clip 0.2 on the token ratio, summed over the step's
        # response tokens and divided by their count across all micro-batches (loss_type="dapo": "normalizing
        # with the number of active tokens in the global accumulated batch", Relay's step-wide token mean),
        # one pass per batch (num_iterations=1, Relay's num_update_steps=1), no KL term (beta=0: no reference
        # model; Relay kl_coef=0 starts none either)
        scale_rewards="group",
        loss_type="dapo",
        num_iterations=1,
        epsilon=args.clip_eps,
        beta=0.0,
        mask_truncated_completions=False,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        bf16=False,  # fp32 training, as Relay's actor (mixed_precision fp32)
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        seed=args.seed,
        disable_tqdm=True,
    )
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    ds = Dataset.from_list([{"prompt": t} for t in texts[: args.steps * args.prompts_per_step]])

    class Race(TrainerCallback):
        """The training clock (paused while saving) and a checkpoint every `eval_every` optimizer steps."""

        def __init__(self):
            self.t0 = self.t_step = None
            self.paused = 0.0  # seconds spent saving, off the clock
            self.checkpoints, self.steps = [], []

        def clock(self) -> float:
            return time.perf_counter() - self.t0 - self.paused

        def save(self, step: int, model) -> None:
            t = time.perf_counter()
            train_s = t - self.t0 - self.paused
            path = os.path.join(out, "ckpt", f"step_{step:04d}")
            model.save_pretrained(path, safe_serialization=True)
            tok.save_pretrained(path)
            save_s = time.perf_counter() - t
            self.paused += save_s
            self.checkpoints.append({"step": step, "train_s": train_s, "path": path, "save_s": save_s,
                                     "load": os.getloadavg()[0]})
            print(f"trl race: step {step} saved at {train_s:.1f} s of training ({save_s:.1f} s to save)",
                  file=sys.stderr, flush=True)

        def on_train_begin(self, args_, state, control, model=None, **kw):
            self.t0 = time.perf_counter()
            self.save(0, model)
            self.t_step = self.clock()

        def on_step_end(self, args_, state, control, model=None, **kw):
            now = self.clock()
            self.steps.append({"step": state.global_step, "wall_s": now - self.t_step, "train_s": now,
                               "load": os.getloadavg()[0]})
            print(f"trl race: step {state.global_step}: {now - self.t_step:.2f} s (load {os.getloadavg()[0]:.2f})",
                  file=sys.stderr, flush=True)
            if state.global_step % args.eval_every == 0 or state.global_step == args.steps:
                self.save(state.global_step, model)
            self.t_step = self.clock()

    race = Race()
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=cfg, train_dataset=ds, processing_class=tok,
                          callbacks=[race])
    setup_s = time.perf_counter() - t_setup
    t = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t
    logs = [h for h in trainer.state.log_history if "reward" in h]
    json.dump({"checkpoints": race.checkpoints, "steps": race.steps, "setup_s": setup_s, "total_s": total,
               "train_s": race.clock(), "save_s": race.paused, "samples_per_step": completions, "logs": logs,
               "threads": args.threads, "prompt_ids_checked": bool(args.prompt_ids), "prompts_mismatched": mismatched,
               "config": {k: getattr(cfg, k) for k in (
                   "per_device_train_batch_size", "gradient_accumulation_steps", "steps_per_generation",
                   "generation_batch_size", "num_generations", "max_completion_length", "temperature", "top_p",
                   "top_k", "learning_rate", "adam_beta1", "adam_beta2", "adam_epsilon", "weight_decay",
                   "max_grad_norm", "lr_scheduler_type", "scale_rewards", "loss_type", "num_iterations", "epsilon",
                   "beta", "seed", "shuffle_dataset")},
               "eos_token_ids": trainer.eos_token_ids, "torch": torch.__version__,
               "trl": __import__("trl").__version__, "transformers": __import__("transformers").__version__},
              open(os.path.join(out, "result.json"), "w"), indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
