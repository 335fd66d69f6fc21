"""Held-out evaluation inside a PPO run (`eval_dataset`, `eval_interval`, the `eval` group): the current policy
answers held-out prompts through the run's own generators, the run's reward source scores them, and the
reference (when the run has one) gives the KL. Logged as `eval/*` beside the training metrics, with a few
answers per evaluation in SAVE_DIR/eval_samples.jsonl, so reward hacking (answers growing long or odd while
the reward climbs) shows next to the curve.

A mixin of `relay.launch.ppo.PPOSystem`: it uses the system's `cfg`, `pool`, `reward`, `ref`, `tokenizer`,
`pad_id`, `stop_ids`, `eos_ids`, `save_dir`, `state` and `logger`.
"""
from __future__ import annotations

import json
import sys
from typing import Any

from relay.evals.scores import effect_in_prompt_sd, gap_closed


class PPOEvaluation:
    """`_load_eval_prompts()` at start-up, then `_maybe_evaluate(step, final)` after each episode."""

    eval_prompts: list[list[int]] | None = None
    eval_first: dict[str, Any] | None = None  # the first evaluation of this run: what later ones compare with

    def _load_eval_prompts(self) -> None:
        from relay.data.shards import load_prepared

        cfg = self.cfg
        if not cfg.eval_dataset:
            self.eval_prompts = None
            return
        data = load_prepared(cfg.eval_dataset, "prompt")
        n, maxlen = min(cfg.eval.num_prompts, len(data)), cfg.generation.max_prompt_length
        self.eval_prompts = [list(data[i]["input_ids"])[-maxlen:] for i in range(n)]

    def _eval_due(self, episode: int, final: bool) -> bool:
        if not self.eval_prompts:
            return False
        every = self.cfg.eval_interval
        return episode == 0 or final or bool(every and episode % every == 0)

    def evaluate(self, episode: int) -> dict[str, float]:
        """eval/* metrics of the current weights on the held-out prompts (fixed sampling seed)."""
        from relay.launch.answer_eval import eval_sampling, evaluate_answers, pool_generate

        cfg, e = self.cfg, self.cfg.eval
        max_tokens = e.max_new_tokens or cfg.generation.max_new_tokens
        sampling = eval_sampling(e.n_samples, e.temperature, max_tokens, self.stop_ids, seed=cfg.seed + 1009)
        res = evaluate_answers(pool_generate(self.pool, f"eval{episode}", cfg.cluster.timeout_s), self.eval_prompts,
                               sampling, self.reward, self.ref, self.tokenizer, self.pad_id, self.eos_ids,
                               e.pass_threshold, e.show_samples)
        out = {f"eval/{k}": v for k, v in res.metrics.items()}
        if self.eval_first is None:
            self.eval_first = {"episode": episode, "per_prompt": res.per_prompt, **res.metrics}
        elif self.eval_first["episode"] != episode:
            out["eval/effect_sd"] = effect_in_prompt_sd(self.eval_first["per_prompt"], res.per_prompt)
            if "pass_rate" in res.metrics:
                out["eval/gap_closed"] = gap_closed(self.eval_first["pass_rate"], res.metrics["pass_rate"])
        with open(self.save_dir / "eval_samples.jsonl", "a", encoding="utf-8") as fh:
            for s in res.samples:
                fh.write(json.dumps({"episode": episode, **s}, ensure_ascii=False) + "\n")
        shown = ", ".join(f"{k.removeprefix('eval/')} {v:.3f}" for k, v in out.items()
                          if k in ("eval/reward_mean", "eval/pass_rate", "eval/kl", "eval/response_length", "eval/effect_sd"))
        print(f"[relay ppo] eval after episode {episode} on {len(self.eval_prompts)} held-out prompts: {shown}",
              file=sys.stderr, flush=True)
        if res.samples:
            s = res.samples[0]
            print(f"[relay ppo]   e.g. {s['prompt'][-80:]!r} -> {s['answer'][:120]!r} (reward {s['reward']:.3f})",
                  file=sys.stderr, flush=True)
        return out
