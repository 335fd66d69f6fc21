"""Cross-field rules (one field's valid range depends on another's) and `validate`, which runs the field checks
first and these rules on a config whose every field is valid. Ranges of single fields live with the fields."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from relay.config.fields import ConfigError
from relay.config.groups import LearnerConfig, LoraConfig
from relay.config.plugin_rules import check_plugin_support
from relay.config.ppo import PPOConfig, learner_temperature, needs_reference, ppo_buffer_size
from relay.config.schema import field_problems
from relay.config.train import TrainConfig

Problems = list[tuple[str, str]]


def detect_device() -> str:
    """'cuda' when this process or the attached Ray cluster has GPUs, else 'cpu'."""
    if os.environ.get("RELAY_DEVICE") in ("cpu", "cuda"):
        return os.environ["RELAY_DEVICE"]
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def validate(cfg: Any, device: str | None = None) -> None:
    """Raise ConfigError naming every invalid field (dotted path first) of a pipeline config."""
    problems = field_problems(cfg)
    if problems:  # the rules below compare fields, so they need each field valid on its own
        raise ConfigError.invalid(problems)
    device = device or detect_device()
    if isinstance(cfg, TrainConfig):
        problems += _check_learner("learner", cfg.learner, cfg.lora, device)
    if isinstance(cfg, PPOConfig):
        problems += _check_learner("actor_learner", cfg.actor_learner, cfg.lora, device)
        problems += _check_learner("critic_learner", cfg.critic_learner, None, device)
        problems += _check_ppo(cfg) + _check_ppo_sampling(cfg) + _check_ppo_logprobs(cfg) + _check_placement(cfg)
        problems += _check_scorers(cfg)
    if problems:
        raise ConfigError.invalid(problems)


def _check_learner(path: str, lc: LearnerConfig, lora: LoraConfig | None, device: str) -> Problems:
    problems = []
    if lc.num_ranks % (lc.tp * lc.pp):
        problems.append((f"{path}.num_ranks", f"{lc.num_ranks} is not divisible by tp*pp = {lc.tp * lc.pp}"))
    for msg in check_plugin_support(
        plugin=lc.plugin, tp=lc.tp, pp=lc.pp, sp=lc.sp, zero_stage=lc.zero_stage,
        precision=lc.mixed_precision, lora_rank=lora.lora_rank if lora else 0, device=device,
    ):
        problems.append((f"{path}.plugin", msg))
    return problems


def _is_task(name: str) -> bool:
    from relay.tasks import task_names  # lazily, like the plugin rules: it imports nothing heavy

    return name in task_names()


def _check_ppo(cfg: PPOConfig) -> Problems:
    """Batch sizes, data, reward source and async-mode rules."""
    a, problems = cfg.algo, []
    # The seed's identity: one episode's experiences = what the update phase consumes per pass.
    dp = max(cfg.actor_learner.num_ranks // (cfg.actor_learner.tp * cfg.actor_learner.pp), 1)
    collected, consumed = ppo_buffer_size(cfg), a.train_batch_size * a.accumulation_steps * dp
    if collected != consumed:
        problems.append(("algo.train_batch_size",
                         "the buffer-size identity does not hold: num_collect_steps x experience_batch_size x "
                         f"n_samples_per_prompt = {collected} experiences per episode, but train_batch_size x "
                         f"accumulation_steps x data-parallel size ({dp}) = {consumed}; make them equal"))
    if 0 < cfg.buffer_limit < collected:  # an update takes a whole episode: a smaller buffer never fills
        problems.append(("buffer_limit", f"{cfg.buffer_limit} cannot hold one episode ({collected} experiences); "
                                         "use 0 (sized automatically) or more"))
    if cfg.reward.kind == "rule" and not (cfg.reward.rule and (":" in cfg.reward.rule or _is_task(cfg.reward.rule))):
        problems.append(("reward.rule", f"kind=rule needs 'module:function' or a task name, got {cfg.reward.rule!r}"))
    if cfg.reward.kind == "http" and not cfg.reward.url:
        problems.append(("reward.url", "kind=http needs a URL"))
    if cfg.reward.kind == "http" and cfg.reward.max_outage_s >= cfg.cluster.timeout_s:
        # the driver waits on a reward call for cluster.timeout_s: a longer outage would time out there first
        problems.append(("reward.max_outage_s", f"{cfg.reward.max_outage_s:g} s must be below cluster.timeout_s "
                                                f"({cfg.cluster.timeout_s:g} s)"))
    if a.ptx_coef > 0 and not cfg.pretrain_dataset:
        problems.append(("pretrain_dataset", "ptx_coef > 0 needs a prepared ptx dataset"))
    if a.mode == "async" and a.old_logprobs == "generator":
        problems.append(("algo.old_logprobs", "async mode needs 'learner', 'loss' or 'auto': its importance weights "
                                              "compare the learner's logprobs with the generator's"))
    if a.old_logprobs == "loss" and a.num_update_steps != 1:
        problems.append(("algo.old_logprobs", f"'loss' needs algo.num_update_steps 1 (got {a.num_update_steps}): "
                                              "after the first optimizer step the policy has moved, and the loss's "
                                              "forward no longer gives the old logprobs; use 'learner' or 'auto'"))
    if a.mode == "async" and a.max_staleness < a.num_update_steps:
        # versions count optimizer steps: an async batch is trained num_update_steps versions after it was made
        problems.append(("algo.max_staleness", f"async mode trains each batch {a.num_update_steps} weight versions "
                                               f"after it was generated (num_update_steps); max_staleness "
                                               f"{a.max_staleness} would evict all of it"))
    if cfg.conversation_template_config and not Path(cfg.conversation_template_config).is_file():
        problems.append(("conversation_template_config", f"{cfg.conversation_template_config} is not a file"))
    return problems


def _check_ppo_sampling(cfg: PPOConfig) -> Problems:
    """Group sizes against the advantage estimator and greedy decoding (one answer per prompt)."""
    a, g, e, problems = cfg.algo, cfg.generation, cfg.eval, []
    if a.advantage_estimator in ("grpo", "rloo") and g.n_samples_per_prompt < 2:
        problems.append(("generation.n_samples_per_prompt",
                         f"{a.advantage_estimator} needs a group of >= 2 samples per prompt"))
    if g.temperature == 0 and g.n_samples_per_prompt > 1:
        problems.append(("generation.temperature", f"greedy decoding (0) gives {g.n_samples_per_prompt} identical "
                                                   "samples per prompt; use a temperature > 0 or n_samples_per_prompt 1"))
    if e.temperature == 0 and e.n_samples > 1:
        problems.append(("eval.n_samples", "greedy evaluation (eval.temperature 0) gives one answer per prompt; use 1"))
    return problems


def _check_ppo_logprobs(cfg: PPOConfig) -> Problems:
    """Temperature and KL rules: logprobs must describe the distribution the samples came from, and a KL loss
    term needs an estimator whose gradient is the KL's."""
    a, problems = cfg.algo, []
    t = cfg.generation.temperature
    if learner_temperature(cfg) != 1.0 and a.old_logprobs == "generator":
        problems.append(("algo.old_logprobs", f"'generator' needs generation.temperature 1 (got {t}): vLLM reports "
                                              "logprobs of the raw logits, the learners those of logits / "
                                              "temperature; use 'learner' or 'auto'"))
    if learner_temperature(cfg) != 1.0 and a.mode == "async":
        problems.append(("algo.mode", f"async needs generation.temperature 1 (got {t}): its importance weights "
                                      "compare the learner's logprobs (logits / temperature) with vLLM's (raw "
                                      "logits); use sync mode"))
    if not a.kl_in_reward and a.kl_coef > 0 and a.kl_estimator == "k1":
        problems.append(("algo.kl_estimator", "k1 as a loss term (kl_in_reward false) has zero gradient in "
                                              "expectation, so the KL penalty would not act; use k3 (low variance, "
                                              "unbiased) or k2"))
    return problems


def _check_scorers(cfg: PPOConfig) -> Problems:
    """Scorer dtypes that cannot run where the scorer will be: float16 without a GPU of its own (or a share).
    bf16 on a CPU without native bf16 is checked by the scorer at start, on its own node's CPU."""
    problems = []
    for name, section in (("reference", cfg.reference), ("reward", cfg.reward)):
        if section.dtype == "float16" and not section.num_gpus:
            problems.append((f"{name}.dtype", f"float16 runs only on a GPU, and {name}.num_gpus is 0 (it scores on "
                                              "CPU): use auto, float32 or bfloat16, or give it a GPU"))
    return problems


def _check_placement(cfg: PPOConfig) -> Problems:
    """Resource shapes the placement plan (relay.cluster.placement) can build; whether they fit the cluster is
    checked against its nodes at launch."""
    g, problems = cfg.generation, []
    if g.tensor_parallel_size > 1 and g.num_gpus_per_generator not in (0, g.tensor_parallel_size):
        problems.append(("generation.num_gpus_per_generator",
                         f"{g.num_gpus_per_generator:g} with tensor_parallel_size {g.tensor_parallel_size}: a GPU "
                         f"engine reserves one GPU per vLLM worker; use {g.tensor_parallel_size} (or 0 on CPU)"))
    if cfg.placement == "timeshare":
        if cfg.algo.mode != "sync":
            problems.append(("placement", "timeshare hands the cores to generation and update in turn, which needs "
                                          "algo.mode sync (async runs them at the same time); use placement "
                                          "separate for async"))
        if g.num_gpus_per_generator or g.tensor_parallel_size > 1 or cfg.actor_learner.num_gpus_per_rank:
            problems.append(("placement", "timeshare is built for CPU: on GPUs the engine would have to sleep "
                                          "during updates (vLLM sleep mode), which Relay does not do yet; use "
                                          "separate or colocate"))
    if cfg.placement == "colocate":
        critic = cfg.critic_learner if cfg.algo.advantage_estimator == "gae" else None
        guests = [("reference", cfg.reference.num_gpus, "actor_learner", cfg.actor_learner)] if needs_reference(cfg) else []
        if cfg.reward.kind == "model":
            guests.append(("reward", cfg.reward.num_gpus, *(("critic_learner", critic) if critic else
                                                           ("actor_learner", cfg.actor_learner))))
        for name, share, host_path, host in guests:
            if share and not host.num_gpus_per_rank:
                problems.append((f"{name}.num_gpus", f"placement colocate shares {host_path}'s GPUs, and its "
                                                     "num_gpus_per_rank is 0; set it, or use placement separate"))
            elif share >= host.num_gpus_per_rank > 0:
                problems.append((f"{name}.num_gpus", f"with placement colocate this is the share of one "
                                                     f"{host_path} rank's {host.num_gpus_per_rank:g} GPU(s) and must "
                                                     f"be smaller, e.g. 0.25; got {share:g}"))
    return problems
