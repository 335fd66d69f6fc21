"""`relay ppo`: the distributed PPO driver (see ../shared/DESIGN.md, "The PPO system").

One episode = collect `num_collect_steps x experience_batch_size` prompts (n samples each) from the generator
pool -> score them (relay/ref, relay/reward, critic group) -> advantages -> relay/buffer -> take the episode's
experiences -> `num_update_steps` optimizer steps of actor (and critic) -> the actor's rank 0 pushes its weights
to every generator, not through the driver (version = actor optimizer steps so far; `relay.actors.weight_push`).

- **sync**: the next episode's prompts are generated after the weight push (on-policy; the generator/learner
  logprob difference is numerical noise, reported as `logprob_diff`).
- **async**: the next episode's prompts are submitted *before* the update, so the generators produce them
  while the learners train; they are trained one version later (staleness 1). `max_staleness` evicts older
  samples; the actor loss is weighted by the truncated IS ratio min(pi_learner / pi_generator, tis_cap).

The "old" logprobs of the PPO ratio (`algo.old_logprobs`) are, in sync mode with fp32 generators and learners,
the generators' as they are (the two agree to ~1e-6, and the actor forward saved is a sizeable share of a small
episode); else, when an episode makes one optimizer step (`num_update_steps` 1), the loss's own forward,
detached (the policy has not moved yet: ratio exactly 1, no extra forward; async mode's importance weights are
computed there); else the actor group recomputes them on the episode's batch before its first update.
With kl_coef 0 no reference actor runs.

Faults: the reference, reward and buffer actors come back when their process dies (Ray restarts them up to
`cluster.max_restarts` times; scoring calls in flight are re-run, the buffer's episode is put again, see
`relay.restarts` and `relay.launch.ppo_buffer`); each restart is logged and counted (restarts_<role> metrics).
Dead generators, and generators whose vLLM engine process died, are replaced by the pool (up to
`PoolOptions.max_failures`; counted as restarts_generators). A learner rank's death restarts both learner groups from the newest
checkpoint and runs the episodes since again (`relay.launch.ppo_recovery`, also up to `cluster.max_restarts`).

Accumulation: the seed's buffer-size identity makes one episode exactly one global batch
(train_batch_size x accumulation_steps x dp), so each update pass is one optimizer step on all of it, run by
each rank as micro-batches of train_batch_size rows whose gradients accumulate (one micro-batch's activations
in memory at a time).
"""
from __future__ import annotations

import functools
import sys
import time
from pathlib import Path
from typing import Any

import torch

from relay.config import PPOConfig, learner_temperature
from relay.launch import safe_points
from relay.launch.ppo_log import log
from relay.launch.ppo_start import PPOStartup, engine_threads, learner_options
from relay.launch.ppo_rollout import Rollout, Scorers, build_rollout, sampling_config, score_rollout
from relay.launch.ppo_checkpoint import PPOCheckpoints, PPOState
from relay.launch.ppo_eval import PPOEvaluation
from relay.launch.ppo_buffer import exchange
from relay.launch.ppo_recovery import PPORecovery, dead_learner
from relay.launch.ppo_update import PPOUpdates, dp_size
from relay.restarts import RestartWatch

__all__ = ["PPOSystem", "engine_threads", "learner_options", "log", "run_ppo"]  # the start-up helpers' old home


class PPOSystem(PPOStartup, PPOUpdates, PPOCheckpoints, PPOEvaluation, PPORecovery):
    """Every actor of a PPO run plus the episode loop. `run_ppo` builds one, runs it and closes it; tests may
    call `run_episodes` more than once (e.g. switch `cfg.algo.mode`) on one set of actors."""

    def __init__(self, cfg: PPOConfig):
        self.cfg = cfg
        self.save_dir = Path(cfg.save_dir)
        self.run_name = self.save_dir.name or "ppo"
        self.pool = self.ref = self.reward = self.buffer = self.actor = self.critic = None
        self.placement = None  # the run's placement groups (relay.cluster.placement_groups), made before any actor
        self.watch = RestartWatch(cfg.cluster.max_restarts)  # restarts of ref/reward/buffer seen (pid changes)
        self.logger = self.gauges = None
        self.pending: dict[str, Any] | None = None  # async: the submitted next batch {ids, t0}
        self.history: list[dict[str, Any]] = []
        self.schedule = safe_points.SaveSchedule(cfg.save_interval, cfg.save_every_minutes)
        self.saved_episode = 0  # the newest episode on disk (a fresh run has nothing worth saving at 0)
        self.last_checkpoint: Path | None = None
        self.stopped = False  # by a signal, at a safe point (the run continues with `--resume auto`)
        self._forget_cleanup: Any = None
        self.last_sync: dict[str, Any] = {}  # the last weight push's report (sender, transports, timings)

    # ------------------------------------------------------------------------------------------ run state
    def _reset_run_state(self) -> None:
        """Everything a checkpoint restores, as at the start of a run: data positions, KL controller, reward
        moments (in the scorers), episode and version, the driver's random state."""
        from relay.algos.kl import make_kl_controller
        from relay.data.batches import BatchOrder

        cfg, a = self.cfg, self.cfg.algo
        self.prompt_order = BatchOrder(len(self.prompts), a.num_collect_steps * a.experience_batch_size, cfg.seed)
        self.ptx_order = (BatchOrder(len(self.ptx), a.ptx_batch_size * dp_size(cfg), cfg.seed + 1)
                          if self.ptx is not None else None)
        self.kl_ctl = make_kl_controller(a.kl_coef, a.adaptive_kl, a.target_kl, a.kl_horizon)
        self.scorers = Scorers(self.ref, self.reward, self.critic, a, cfg.generation.n_samples_per_prompt,
                               self.eos_ids, cfg.cluster.timeout_s, temperature=learner_temperature(cfg),
                               actor=self.actor)
        self.state = PPOState(kl_coef=self.kl_ctl.value)
        torch.manual_seed(cfg.seed)

    # ------------------------------------------------------------------------------------------ rollouts
    def _sampling(self, episode: int):
        return sampling_config(self.cfg, episode, self.stop_ids)

    def _submit(self, episode: int) -> dict[str, Any]:
        """Queue one episode's prompts (ids carry the episode, so a resumed run never reuses one)."""
        order_before = self.prompt_order.state_dict()  # a checkpoint taken while this job is pending rewinds here
        idx = self.prompt_order.next_batch()
        maxlen = self.cfg.generation.max_prompt_length
        prompts = [list(self.prompts[i]["input_ids"])[-maxlen:] for i in idx]
        ids = [f"e{episode}-{k}" for k in range(len(prompts))]
        self.pool.submit(prompts, self._sampling(episode), ids=ids)
        # dispatch now (generators work while the driver does other things); ids=[]: pop nothing, since
        # a bare collect() would hand back, and so lose, any result that finished meanwhile
        self.pool.collect(timeout_s=0.0, ids=[])
        return {"ids": ids, "t0": time.monotonic(), "episode": episode, "order_before": order_before}

    def _wait(self, job: dict[str, Any]) -> tuple[list[Any], float]:
        from relay.cluster.calls import RemoteCallTimeout

        want, got = list(job["ids"]), {}
        deadline = time.monotonic() + self.cfg.cluster.timeout_s
        while len(got) < len(want):
            if time.monotonic() > deadline:
                raise RemoteCallTimeout(f"episode {job['episode']}: generation did not finish in time")
            for r in self.pool.collect(timeout_s=0.2, ids=[i for i in want if i not in got]):
                got[r.prompt_id] = r
        return [got[i] for i in want], time.monotonic() - job["t0"]

    def sync_weights(self, rewind: bool = False) -> float:
        """The actor group's rank 0 pushes its weights straight to every generator at `state.version`
        (`rewind`: older than theirs, after going back to a checkpoint); returns seconds. The driver passes
        only generator handles and the version (`GeneratorPool.push_weights`), never the tensors. A bf16 or
        fp16 engine gets its own dtype (half the bytes of fp32; it would round them to it on load anyway)."""
        t0 = time.monotonic()
        dtype = self.cfg.generation.dtype
        send = (self.actor.publish_weights if dtype in ("float32", "auto")
                else functools.partial(self.actor.publish_weights, dtype=dtype))
        self.last_sync = self.pool.push_weights(send, self.state.version, rewind=rewind)
        return time.monotonic() - t0

    # ------------------------------------------------------------------------------------------ episodes
    def run_episodes(self, until: int | None = None) -> list[dict[str, Any]]:
        """Run episodes state.episode .. until-1 (default num_episodes); returns their metrics records."""
        from tqdm import tqdm

        a = self.cfg.algo
        until = a.num_episodes if until is None else until
        self._check_async()  # the mode may have been switched since start()
        records = []
        if self.state.episode == 0 and self.eval_first is None and self._eval_due(0, False):
            t_eval = time.monotonic()
            self.logger.log(0, {**self.evaluate(0), "episode": 0, "eval_s": time.monotonic() - t_eval})
        bar = tqdm(total=until, initial=self.state.episode, desc="relay ppo", disable=not sys.stderr.isatty())
        while self.state.episode < until:
            if safe_points.stop_requested():  # safe point: between episodes
                self._stop_here()
                break
            try:
                rec = self._episode(until)
            except Exception as err:
                if (what := dead_learner({"actor": self.actor, "critic": self.critic}, err)) is None:
                    raise
                self._recover_learners(what, err)  # back to the newest checkpoint, learners rebuilt
                records = [r for r in records if r["episode"] <= self.state.episode]
                bar.reset(total=until)
                bar.update(self.state.episode)
                continue
            records.append(rec)
            bar.update(1)
            bar.set_postfix(reward=f"{rec['reward_mean']:.3f}", kl=f"{rec['kl']:.3f}", v=self.state.version)
        bar.close()
        self.history += records
        return records

    def _episode(self, until: int) -> dict[str, Any]:
        """One episode: generate, score, buffer, update, push weights, log (and maybe evaluate and save)."""
        from relay.buffer.experience import Experience

        cfg, a = self.cfg, self.cfg.algo
        ep, t_ep = self.state.episode, time.monotonic()
        self.pool.poll_control()  # a `relay scale` request takes effect at the latest here
        job = self.pending if (self.pending and self.pending["episode"] == ep) else self._submit(ep)
        self.pending = None
        results, gen_s = self._wait(job)
        if a.mode == "async" and ep + 1 < until:
            self.pending = self._submit(ep + 1)  # generated with the current weights while we train
        rollout: Rollout = build_rollout(results, self.pad_id)
        t_score = time.monotonic()
        exp, m = score_rollout(rollout, self.scorers, self.kl_ctl.value)
        score_s = time.monotonic() - t_score
        through = exchange(self.buffer, exp, version=self.state.version,
                           max_staleness=a.max_staleness if a.mode == "async" else None,
                           max_restarts=cfg.cluster.max_restarts, note=log)
        buffer_size, evicted = through.size, through.evicted
        exp = Experience.collate(through.taken, self.pad_id)
        staleness = (self.state.version - exp.weight_version).float()
        t_up = time.monotonic()
        up = self._update(exp)
        update_s = time.monotonic() - t_up
        self.kl_ctl.update(m["kl"], len(exp))
        self.state.kl_coef = self.kl_ctl.value
        sync_s = self.sync_weights()
        versions = self.pool.versions()
        if not versions:  # every generator died (e.g. was killed); replacements load the weights just pushed
            self.pool.wait_ready(cfg.cluster.timeout_s)
            versions = self.pool.versions()
        self._watch_restarts()
        self.state.episode = ep + 1
        episode_s = time.monotonic() - t_ep
        rec = {
            **m, **up, **self.watch.counts(), "restarts_learners": self.learner_restarts,
            "restarts_generators": self.pool.counters["failed"], "episode": ep + 1, "weight_version": self.state.version,
            "gen_version_min": min(versions.values()), "gen_version_max": max(versions.values()),
            "num_generators": len(versions), "buffer_size": buffer_size, "buffer_evicted": evicted,
            "samples": len(exp), "staleness_mean": float(staleness.mean()), "staleness_max": float(staleness.max()),
            "kl_coef": self.kl_ctl.value, "gen_s": gen_s, "score_s": score_s, "update_s": update_s,
            "sync_s": sync_s, "episode_s": episode_s, "rollout_tokens_per_s": rollout.num_tokens / max(gen_s, 1e-9),
            "samples_per_s": len(exp) / max(episode_s, 1e-9), "sync_share": sync_s / max(episode_s, 1e-9),
            # where the sync's time goes: the sender's push (serialize + write, then the object-store put while
            # the generators load)
            "sync_push_s": float(self.last_sync.get("total_s", 0.0)),
            "sync_write_s": float(self.last_sync.get("write_s", 0.0)),
            "sync_load_s": float(self.last_sync.get("load_s", 0.0)),
            **{f"sync_{k}": float(self.last_sync.get(k, 0.0)) for k in ("serialize_s", "file_s", "put_s")},
            "sync_overwritten": int(self.last_sync.get("overwritten", 0)),  # buckets written over kept files
        }
        if self._eval_due(ep + 1, final=ep + 1 == a.num_episodes):
            t_eval = time.monotonic()
            rec.update(self.evaluate(ep + 1), eval_s=time.monotonic() - t_eval)
        self.logger.log(ep + 1, rec)
        self.gauges.set(rec)
        log(f"episode {ep + 1}/{a.num_episodes} reward {m['reward_mean']:.3f} kl {m['kl']:.4f} "
            f"length {m['response_length']:.1f} {episode_s:.1f} s")
        if self.schedule.due(ep + 1) and ep + 1 < a.num_episodes:
            self.save_checkpoint()
        return rec

def run_ppo(cfg: PPOConfig) -> int:
    """Entry point of `relay ppo` (the config is already validated)."""
    system = PPOSystem(cfg)
    try:
        system.start()
        records = system.run_episodes()
        if system.stopped:
            return 0  # `relay` (pipeline_cmd) prints how to resume and exits with the signal's code
        system.save_final()
        if records:
            first, last = records[0], records[-1]
            log(f"done: {len(system.history)} episodes, reward {first['reward_mean']:.3f} -> {last['reward_mean']:.3f}, "
                f"weight version {system.state.version}; metrics in {system.save_dir / 'metrics.jsonl'}")
    finally:
        system.close()
    return 0
