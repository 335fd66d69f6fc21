"""The update phase of a PPO episode: old logprobs (the generators', recomputed by the actor group, or taken
from the loss's own forward), then
`num_update_steps` optimizer steps of actor (PPO loss + ptx) and critic (value loss), micro-batched. With
`algo.overlap_critic` each step's critic step runs at the same time as the actor's (the groups share no
state), and placement timeshare shares the node's cores over both groups' ranks; `update_overlap_s` says how
long the two really ran together.

Logprobs (old and new) are those of logits / generation.temperature (`learner_temperature`). A step the
learners skip for a non-finite loss or gradient is counted (`nonfinite_skipped`); `algo.max_nonfinite_steps`
update steps in a row with a skip stop the run.

A mixin of `relay.launch.ppo.PPOSystem`: it uses the system's `cfg`, `state`, `actor`, `critic`, `kl_ctl`,
`ptx` and `ptx_order`.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch

from relay.config import (
    PPOConfig, actor_shares_prompts, forward_micro_batch, learner_temperature, old_logprobs_source,
)
from relay.launch.ppo_rollout import learner_batch
from relay.learners.accumulate import NonfiniteGuard
from relay.learners.group import share_node_cores


def update_token_metrics(batch: dict[str, Any], shared: bool, steps: int, recomputed: bool) -> dict[str, float]:
    """Actor tokens of one update phase for its FLOP count (`relay.models.flops.update_flops`): trained
    (forward + backward, `steps` passes) and forward-only (the old-logprob recompute)."""
    from relay.learners.ppo import actor_token_counts

    c = actor_token_counts(batch, shared)
    fwd = c if recomputed else {"tokens": 0, "logit_tokens": 0}
    return {"update_tokens": float(c["tokens"] * steps), "update_logit_tokens": float(c["logit_tokens"] * steps),
            "update_forward_tokens": float(fwd["tokens"]), "update_forward_logit_tokens": float(fwd["logit_tokens"])}


def dp_size(cfg: PPOConfig) -> int:
    lc = cfg.actor_learner
    return max(lc.num_ranks // max(lc.tp * lc.pp * lc.sp, 1), 1)


class PPOUpdates:
    """`_update(exp)` for `PPOSystem`."""

    def _ptx_rows(self, micro_batches: int) -> dict[str, torch.Tensor]:
        """ptx_batch_size rows per micro-batch per dp rank (the order's batches hold ptx_batch_size x dp)."""
        from relay.data.batches import collate_sft

        rows = [self.ptx[i] for _ in range(micro_batches) for i in self.ptx_order.next_batch()]
        batch = collate_sft(rows, self.pad_id)
        return {f"ptx_{k}": v for k, v in batch.items()}

    def _update(self, exp: Any) -> dict[str, float]:
        """Old logprobs (`old_logprobs_source`), then num_update_steps optimizer steps of actor (and
        critic). Placement timeshare: the learner ranks take every core of their node for it, then hand back."""
        if self.cfg.placement != "timeshare":
            return self._update_steps(exp, self.cfg.actor_learner.num_threads, self.cfg.critic_learner.num_threads)
        groups = [g for g in (self.actor, self.critic) if g is not None]
        if self.phase_threads is None:  # reset when the learner groups are (re)built
            cores = [g.rank_cores() for g in groups]
            together = self.cfg.algo.overlap_critic
            self.phase_threads = share_node_cores(cores) if together else [share_node_cores([c])[0] for c in cores]
        with contextlib.ExitStack() as stack:
            for group, counts in zip(groups, self.phase_threads):
                stack.enter_context(group.hand_over_threads(counts))
            out = self._update_steps(exp, 0, 0)  # 0: the losses keep the threads handed over
        out["update_threads"] = float(max(self.phase_threads[0]))
        return out

    def _update_steps(self, exp: Any, actor_threads: int, critic_threads: int) -> dict[str, float]:
        """`_update` with the given torch threads per rank (0: keep the threads the rank has)."""
        from relay.learners.ppo import ppo_actor_loss, ppo_critic_loss
        from relay.learners.schedule import lr_at

        cfg, a = self.cfg, self.cfg.algo
        dp = dp_size(cfg)
        keep = len(exp) - len(exp) % dp  # rows must split evenly over dp ranks (only async evictions change it)
        batch = {k: v[:keep] for k, v in learner_batch(exp).items()}
        mask = batch["action_mask"].float()
        out: dict[str, float] = {}
        source = old_logprobs_source(cfg)
        if source == "learner":
            out.update(self._recompute_old_logprobs(batch, mask, async_mode=a.mode == "async"))
        out.update(update_token_metrics(batch, actor_shares_prompts(cfg), a.num_update_steps,
                                        recomputed=source == "learner"))
        micro = max(1, -(-keep // dp // a.train_batch_size))  # ceil: rows per rank / train_batch_size
        total_steps = a.num_episodes * a.num_update_steps
        kl_coef = self.kl_ctl.value
        actor_kw = dict(clip_eps=a.eps_clip, ptx_coef=a.ptx_coef, entropy_coef=a.entropy_coef,
                        kl_coef=0.0 if a.kl_in_reward else kl_coef, kl_estimator=a.kl_estimator,
                        shared_prompt=actor_shares_prompts(cfg), temperature=learner_temperature(cfg),
                        num_threads=actor_threads, autocast=a.update_autocast, old_from_forward=source == "loss",
                        tis_cap=a.tis_cap if source == "loss" and a.mode == "async" else 0.0)
        guard = self._nonfinite_guard()
        out["nonfinite_skipped"] = 0.0
        out["samples_skipped"] = 0.0  # experiences in actor steps the guard dropped (rows x dropped steps)
        out["update_overlap_s"] = 0.0
        critic_kw = dict(loss=ppo_critic_loss, micro_batches=micro, value_clip=a.value_clip, num_threads=critic_threads,
                         autocast=a.update_autocast)
        for step in range(a.num_update_steps):
            n = self.state.version
            self.actor.set_lr(lr_at(n, cfg.actor_optim.lr, total_steps, cfg.actor_optim.warmup_steps, cfg.actor_optim.min_lr_ratio))
            if self.critic is not None:
                self.critic.set_lr(lr_at(n, cfg.critic_optim.lr, total_steps, cfg.critic_optim.warmup_steps, cfg.critic_optim.min_lr_ratio))
            actor_batch = dict(batch)
            if self.ptx is not None:
                actor_batch.update(self._ptx_rows(micro))
            actor_call = self.actor.start_train_step(actor_batch, loss=ppo_actor_loss, micro_batches=micro, **actor_kw)
            critic_call = None
            if self.critic is not None and a.overlap_critic:
                critic_call = self.critic.start_train_step(batch, **critic_kw)
            m = self.actor.finish(actor_call)
            skipped = m.get("nonfinite_skipped", 0.0)
            out["samples_skipped"] += keep * skipped
            if step == 0:
                out["approx_kl_first"] = m["approx_kl"]
                if source != "learner":  # before any update the loss compares the learner with the generator
                    out["logprob_diff"] = m["logprob_diff"]
                if "is_weight_mean" in m:
                    out["is_weight_mean"] = m["is_weight_mean"]
            self.state.version += 1
            for k in ("loss", "pg_loss", "entropy", "clip_frac", "approx_kl", "ratio", "ptx_loss", "kl_loss"):
                if k in m:
                    key = "actor_loss" if k == "loss" else k
                    out[key] = out.get(key, 0.0) + m[k] / a.num_update_steps
            if self.critic is not None:
                c = self.critic.finish(critic_call) if critic_call else self.critic.train_step(batch, **critic_kw)
                out["critic_loss"] = out.get("critic_loss", 0.0) + c["loss"] / a.num_update_steps
                # rank 0 of each group: how long both groups were inside their step at once
                together = min(m["step_ended"], c["step_ended"]) - max(m["step_started"], c["step_started"])
                out["update_overlap_s"] += max(0.0, together)
                skipped += c.get("nonfinite_skipped", 0.0)
            out["nonfinite_skipped"] += skipped
            guard.update(skipped > 0, f"episode {self.state.episode + 1}, update step {step + 1}")
        out.setdefault("ptx_loss", 0.0)
        out.setdefault("critic_loss", 0.0)
        out["lr"] = lr_at(self.state.version - 1, cfg.actor_optim.lr, total_steps, cfg.actor_optim.warmup_steps, cfg.actor_optim.min_lr_ratio)
        return out

    def _nonfinite_guard(self) -> NonfiniteGuard:
        """One guard for the run: the streak of update steps with a skip carries over episodes."""
        if getattr(self, "nonfinite", None) is None:
            self.nonfinite = NonfiniteGuard(self.cfg.algo.max_nonfinite_steps, "algo.max_nonfinite_steps")
        return self.nonfinite

    def _recompute_old_logprobs(self, batch: dict[str, Any], mask: torch.Tensor, async_mode: bool) -> dict[str, float]:
        """Old logprobs from the actor group (ratio exactly 1 at the first step); async: the truncated IS
        weights learner/generator. Returns the generator-vs-learner difference metrics (with a temperature other
        than 1 they include it: the generators report logprobs of the raw logits)."""
        from relay.algos.losses import truncated_is_weights
        from relay.algos.masked import masked_mean

        A = mask.shape[1]
        learner_lp = self.actor.forward_logprobs({"input_ids": batch["input_ids"],
                                                  "attention_mask": batch["attention_mask"]},
                                                 temperature=learner_temperature(self.cfg), last=A,
                                                 micro_batch_size=forward_micro_batch(self.cfg.algo)) * mask
        gen_lp = batch["old_logprobs"]
        diff = (learner_lp - gen_lp).abs() * mask
        out = {"logprob_diff": float(masked_mean(diff, mask)), "logprob_diff_max": float(diff.max())}
        batch["old_logprobs"] = learner_lp
        if async_mode:
            batch["is_weights"] = truncated_is_weights(learner_lp, gen_lp, self.cfg.algo.tis_cap, mask)
            out["is_weight_mean"] = float(masked_mean(batch["is_weights"], mask))
        return out
