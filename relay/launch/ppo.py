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
from typing import Any, Callable

import torch

from relay.cluster.together import start_together
from relay.config import PPOConfig, learner_temperature, needs_reference, ppo_buffer_size, save_config, to_dict
from relay.launch import safe_points
from relay.launch.ppo_rollout import Rollout, Scorers, build_rollout, sampling_config, score_rollout
from relay.launch.ppo_checkpoint import PPOCheckpoints, PPOState
from relay.launch.ppo_eval import PPOEvaluation
from relay.launch.ppo_buffer import exchange
from relay.launch.ppo_recovery import PPORecovery, dead_learner
from relay.launch.ppo_update import PPOUpdates, dp_size
from relay.restarts import RestartWatch, call_or_explain


def log(msg: str) -> None:
    from tqdm import tqdm  # a line between progress-bar redraws, not through the bar

    tqdm.write(f"[relay ppo] {msg}", file=sys.stderr)
    sys.stderr.flush()


def engine_threads(cfg: PPOConfig, cores: int | None = None) -> int:
    """generation.cpu_threads, where 0 is 1 thread, or with placement timeshare this node's cores shared out
    over the generators (they have the cores while they generate; the learners while they update)."""
    g = cfg.generation
    if g.cpu_threads:
        return g.cpu_threads
    if cfg.placement != "timeshare":
        return 1
    from relay.cpu import usable_cores

    return max(1, (cores or usable_cores()) // g.num_generators)


def learner_options(cfg: PPOConfig, role: str) -> dict[str, Any]:
    lc = cfg.actor_learner if role == "actor" else cfg.critic_learner
    oc = cfg.actor_optim if role == "actor" else cfg.critic_optim
    opts: dict[str, Any] = dict(
        plugin=lc.plugin, tp=lc.tp, pp=lc.pp, sp=lc.sp, zero_stage=lc.zero_stage, precision=lc.mixed_precision,
        max_norm=oc.grad_clip, lr=oc.lr, weight_decay=oc.weight_decay, betas=tuple(oc.betas), eps=oc.eps,
        grad_checkpoint=lc.grad_checkpoint, seed=cfg.seed,
    )
    if role == "actor" and cfg.lora.lora_rank > 0:
        opts.update(lora_rank=cfg.lora.lora_rank, lora_alpha=cfg.lora.lora_alpha, lora_dropout=cfg.lora.lora_dropout,
                    lora_target_modules=tuple(cfg.lora.lora_target_modules))
    return opts


class PPOSystem(PPOUpdates, PPOCheckpoints, PPOEvaluation, PPORecovery):
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

    # ------------------------------------------------------------------------------------------ start-up
    def start(self) -> "PPOSystem":
        from relay.actors.generator import GeneratorConfig
        from relay.actors.pool import GeneratorPool, PoolOptions
        from relay.actors.rewards import start_reward_actor
        from relay.actors.scorers import start_reference
        from relay.buffer.actor import start_buffer
        from relay.data.shards import load_prepared
        from relay.cluster.options import scoped
        from relay.launch import cluster
        from relay.models.local import local_folder
        from relay.models.smollm2 import resolve_model_path
        from transformers import AutoTokenizer

        cfg, a, g = self.cfg, self.cfg.algo, self.cfg.generation
        self._check_async()
        self.save_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, cfg.config_file or self.save_dir / "config.yaml")
        torch.manual_seed(cfg.seed)
        self.actor_path = resolve_model_path(cfg.actor.pretrain, "actor.pretrain")
        gae = a.advantage_estimator == "gae"
        self.critic_path = resolve_model_path(cfg.critic.pretrain, "critic.pretrain") if gae else None
        tok_dir = cfg.actor.tokenizer_dir and local_folder(cfg.actor.tokenizer_dir, "actor.tokenizer_dir")
        self.tokenizer = AutoTokenizer.from_pretrained(tok_dir or self.actor_path)
        tok = self.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        # stop ids: the conversation template's (generation stops there; rewards count them as EOS)
        from relay.launch.ppo_template import resolve_stop_ids

        stops = resolve_stop_ids(cfg, tok)
        self.stop_ids, self.eos_ids = stops.stop_ids, stops.eos_ids
        log(f"stop ids {self.stop_ids} (from {stops.source}), EOS ids for rewards {self.eos_ids}")

        self.prompts = load_prepared(cfg.prompt_dataset, "prompt")
        self.ptx = load_prepared(cfg.pretrain_dataset, "ptx") if a.ptx_coef > 0 else None

        cluster.init_ray(cfg.cluster.address, num_cpus=cfg.cluster.num_cpus, dashboard_host=cfg.cluster.dashboard_host)
        t0 = time.time()
        self._claim_run_name()
        run = self.run_name
        self._reserve_placement()  # resolves placement auto, which engine_threads reads
        gen_cfg = GeneratorConfig(
            model=self.actor_path, dtype=g.dtype, max_model_len=self._max_model_len(), seed=cfg.seed,
            tensor_parallel_size=g.tensor_parallel_size, cpu_kvcache_gib=max(1, int(round(g.kv_cache_gib))),
            trust_remote_code=cfg.actor.trust_remote_code, in_process=g.in_process,
            gpu_memory_utilization=g.gpu_memory_utilization, cpu_threads=engine_threads(cfg),
        )
        place = self.placement.options
        opts = PoolOptions(control_name=f"control-{run}", run=run, num_cpus=g.num_cpus_per_generator,
                           num_gpus=g.num_gpus_per_generator or None,
                           placement=lambda index, name: place("generator", index, name))
        # Generators start in the background (vLLM start is the slowest part) while the rest comes up.
        self.pool = GeneratorPool(gen_cfg, g.num_generators, opts, wait=False)
        timeout, restarts = cfg.cluster.timeout_s, cfg.cluster.max_restarts
        # Reference, reward and buffer come back if their process dies (Ray restarts them, see relay.restarts)
        rc = cfg.reference
        limit = cfg.buffer_limit or ppo_buffer_size(cfg) * (2 if a.mode == "async" else 1)
        starters = {
            "reward": lambda: start_reward_actor(cfg.reward, self.actor_path, name=scoped("reward", run),
                                                 timeout_s=timeout, max_restarts=restarts, **place("reward", 0)),
            "buffer": lambda: start_buffer(limit, scoped("buffer", run), pad_token_id=self.pad_id, seed=cfg.seed,
                                           timeout_s=timeout, max_restarts=restarts, **place("buffer", 0)),
            **self._learner_starters(),
        }
        if needs_reference(cfg):
            starters["ref"] = lambda: start_reference(
                self.actor_path, scoped("ref", run), timeout_s=timeout, max_restarts=restarts, dtype=rc.dtype,
                micro_batch_size=rc.micro_batch_size, **place("reference", 0))
        start_together(starters, keep=lambda name, value: setattr(self, name, value))
        self._log_scorers(self._watch_restarts())
        self.pool.wait_ready(timeout)
        self._reset_run_state()
        if (stop := safe_points.active()) is not None:
            # If the stop's grace period runs out, the process exits at once: remove our temp files first.
            self._forget_cleanup = stop.add_cleanup(self._remove_temp_files)
        resumed = self._maybe_resume()
        from relay.metrics import MetricsLogger, RayGauges

        al, cl = cfg.actor_learner, cfg.critic_learner
        lg = cfg.logging
        self.logger = MetricsLogger(self.save_dir, lg.log_dir, lg.use_tensorboard, lg.use_wandb, lg.wandb_project,
                                    run_name=f"ppo-{self.run_name}", config=to_dict(cfg),
                                    resume_step=self.state.episode + 1 if resumed else None, note=log)
        self.gauges = RayGauges("relay_ppo", {"run": self.run_name})
        self._load_eval_prompts()
        for role, lc in (("actor_learner", al), ("critic_learner", cl if self.critic else None)):
            if lc is not None and lc.mixed_precision == "bf16" and not lc.num_gpus_per_rank:
                from relay.cpu import bf16_slow_reason

                if (slow := bf16_slow_reason()) is not None:
                    log(f"{role}.mixed_precision: bf16 kept, but {slow}")
        log(f"{g.num_generators} generators, actor {al.num_ranks} ranks ({al.plugin}, tp={al.tp}), "
            f"critic {'%d ranks (%s)' % (cl.num_ranks, cl.plugin) if self.critic else 'none'}, "
            f"{len(self.prompts)} prompts, {ppo_buffer_size(cfg)} experiences per episode, ready in {time.time() - t0:.1f} s")
        return self

    def _start_learners(self) -> None:
        """The actor (and, for GAE, critic) learner groups, freshly built from the model folders, side by side."""
        start_together(self._learner_starters(), keep=lambda name, value: setattr(self, name, value))

    def _learner_starters(self) -> dict[str, Callable[[], Any]]:
        """Starters (for `start_together`) of the actor and, for GAE, critic learner groups."""
        from relay.learners.group import LearnerGroup

        cfg, timeout = self.cfg, self.cfg.cluster.timeout_s
        al, cl = cfg.actor_learner, cfg.critic_learner
        common = dict(run=self.run_name, timeout_s=timeout, placement=self.placement)
        self.phase_threads = None  # the update's threads per rank (placement timeshare), asked again of new ranks
        starters: dict[str, Callable[[], Any]] = {
            "actor": lambda: LearnerGroup.create(al.num_ranks, self.actor_path, "causal_lm", role="actor",
                                                 num_cpus=al.num_cpus_per_rank,
                                                 num_gpus=al.num_gpus_per_rank or None,
                                                 placement_role="actor_learner", **common,
                                                 **learner_options(cfg, "actor"))}
        if self.critic_path:
            starters["critic"] = lambda: LearnerGroup.create(
                cl.num_ranks, self.critic_path, "critic", role="critic", num_cpus=cl.num_cpus_per_rank,
                num_gpus=cl.num_gpus_per_rank or None, placement_role="critic_learner", **common,
                **learner_options(cfg, "critic"))
        return starters

    def _reserve_placement(self) -> None:
        """Check the run's layout against the cluster's nodes (a table of what is missing when it cannot fit)
        and reserve its placement groups, before any actor starts (relay.cluster.placement)."""
        import ray

        from relay.cluster.placement import auto_mode, plan_ppo
        from relay.cluster.placement_groups import Placement

        gpus = ray.cluster_resources().get("GPU", 0) > 0
        if self.cfg.placement == "auto":  # decided once per run; the saved config keeps auto for a resume
            self.cfg.placement, why = auto_mode(self.cfg, gpus)
            log(f"placement auto: {self.cfg.placement} ({why})")
        plan = plan_ppo(self.cfg, gpus_present=gpus)
        self.placement = Placement.reserve(plan, self.run_name, self.cfg.cluster.placement_timeout_s)
        log(f"placement {plan.mode}: {self.placement.describe()}")

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

    def _check_async(self) -> None:
        """Versions count optimizer steps: an async batch is trained num_update_steps versions after it was
        generated, so a smaller max_staleness would evict every sample of every episode."""
        a = self.cfg.algo
        if a.mode == "async" and self.cfg.placement == "timeshare":
            raise ValueError("algo.mode async with placement timeshare: the phases would run at once on cores "
                             "handed to one of them; set placement separate (auto picks it for async runs)")
        if a.mode == "async" and a.max_staleness < a.num_update_steps:
            raise ValueError(f"algo.max_staleness={a.max_staleness}: async mode trains each batch num_update_steps="
                             f"{a.num_update_steps} weight versions after it was generated; use >= {a.num_update_steps}")

    def _max_model_len(self) -> int:
        """generation.max_model_len, capped at the model's positions (vLLM refuses a longer one)."""
        import json

        conf = json.loads((Path(self.actor_path) / "config.json").read_text())
        limit = conf.get("max_position_embeddings") or self.cfg.generation.max_model_len
        return min(self.cfg.generation.max_model_len, int(limit))

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

    def _watch_restarts(self) -> dict[str, dict[str, Any]]:
        """Ask the restartable actors for their info and return it by role ('reference', 'reward', 'buffer'): a
        new pid means Ray restarted the actor (logged once, counted in the metrics as restarts_<role>). The run's
        timeout: a restarting reference first reloads its model."""
        cluster = self.cfg.cluster
        infos: dict[str, dict[str, Any]] = {}
        for role, client in (("reference", self.ref), ("reward", self.reward), ("buffer", self.buffer)):
            if client is None:
                continue
            infos[role] = info = call_or_explain(lambda: client.info(timeout_s=cluster.timeout_s), client.name,
                                                 cluster.max_restarts)
            if msg := self.watch.observe(client.name, int(info["pid"])):
                log(msg)
        return infos

    def _log_scorers(self, infos: dict[str, dict[str, Any]]) -> None:
        """One line: the device, dtype and micro-batch size each model scorer ended up with (relay.actors.scoring),
        from the infos `_watch_restarts` just fetched (one round trip per actor at start-up)."""
        where = [("reference", infos.get("reference", {})), ("reward model", infos.get("reward", {}))]
        parts = [f"{role} on {i['device']} in {i['dtype']} ({i.get('micro_batch_size')} rows per forward)"
                 for role, i in where if "device" in i]
        if parts:
            log("scorers: " + ", ".join(parts))

    def close(self) -> None:
        if self._forget_cleanup is not None:
            self._forget_cleanup()
        for name in ("pool", "actor", "critic"):
            obj = getattr(self, name)
            if obj is not None:
                try:
                    obj.shutdown()
                except Exception as err:  # keep closing the rest
                    log(f"{name} shutdown: {err}")
        for name in ("ref", "reward", "buffer"):
            obj = getattr(self, name)
            if obj is not None:
                try:
                    obj.kill()
                except Exception:
                    pass
        self._wait_names_free()
        if self.placement is not None:  # after the actors: removing a group ends the actors in it
            self.placement.release()
            self.placement = None
        if self.logger is not None:
            self.logger.close()
        self._remove_temp_files()


    def _wait_names_free(self, timeout_s: float = 30.0) -> list[str]:
        """ray.kill is asynchronous: wait until this run's actor names are released, so that a next run in the
        same cluster (a resumed run, the next test) can take them. Returns the names still taken."""
        import ray

        from relay.cluster.options import NAMESPACE, scoped

        run = self.run_name
        names = [f"relay/{scoped(n, run)}" for n in ("ref", "reward", "buffer", "actor-rank0", "critic-rank0")]
        deadline, taken = time.monotonic() + timeout_s, []
        for name in [*names, f"relay/control-{run}"]:
            while True:
                try:
                    ray.get_actor(name, namespace=NAMESPACE)
                except ValueError:
                    break
                if time.monotonic() > deadline:
                    taken.append(name)
                    break
                time.sleep(0.2)
        return taken

    def _claim_run_name(self, wait_s: float = 20.0) -> None:
        """Actor names carry the run name (SAVE_DIR's last folder), so runs of other names share a cluster; one of
        the same name cannot. A killed driver's actors go with its job within seconds: wait for those first."""
        if taken := self._wait_names_free(wait_s):
            raise RuntimeError(f"a run named {self.run_name!r} is already on this cluster ({', '.join(taken)}): "
                               f"give this run another save_dir (its last folder names the run)")


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
