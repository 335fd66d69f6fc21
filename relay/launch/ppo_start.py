"""Start-up and shut-down of a PPO run's actors (the `PPOSystem` mixin `PPOStartup`): the run name claimed on the
cluster, placement groups reserved, then generators, reference, reward, buffer and learner groups started side by
side; `close` ends them all and frees the names. The episode loop is in `relay.launch.ppo`."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch

from relay.cluster.together import start_together
from relay.config import PPOConfig, needs_reference, ppo_buffer_size, save_config, to_dict
from relay.launch import safe_points
from relay.launch.ppo_log import log
from relay.restarts import call_or_explain


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


class PPOStartup:
    """Starting and stopping every actor of a run; expects `PPOSystem`'s attributes and run-state methods."""

    def start(self) -> "PPOStartup":
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
