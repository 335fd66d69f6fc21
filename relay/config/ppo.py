"""Configs of PPO (and GRPO / RLOO): generation, reward, algorithm, evaluation, and the rules derived from them
that the launch code shares (buffer size, reference need, logprob source)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from relay.config.fields import (
    Fraction, Group, NodePin, NonNegFloat, NonNegInt, PlacementMode, PosFloat, PosInt, Range, Resources, Seed, StrList,
    doc,
)
from relay.config.groups import (
    NODE_PIN_HELP, RESOURCES_HELP, ClusterConfig, LearnerConfig, LoggingConfig, LoraConfig, ModelConfig, OptimConfig,
)


@dataclass
class GenerationConfig(Group):
    """vLLM generators and sampling."""

    num_generators: PosInt = doc("vLLM engines (Ray actors); can be changed while a run goes on.", 1)
    tensor_parallel_size: PosInt = doc("vLLM tensor parallelism inside each generator (GPU).", 1)
    num_cpus_per_generator: NonNegFloat = doc("Logical CPUs each generator reserves in Ray.", 1.0)
    num_gpus_per_generator: NonNegFloat = doc(
        "GPUs each generator reserves in Ray: a share of one GPU with tensor_parallel_size 1, or "
        "tensor_parallel_size (one GPU per vLLM worker, reserved as the engine's own STRICT_PACK placement group); "
        "0: tensor_parallel_size on a cluster with GPUs, none (a CPU engine) on one without.", 0.0)
    resources_per_generator: Resources = doc(RESOURCES_HELP.format(who="each generator"), factory=dict)
    node_pin: NodePin | None = doc(NODE_PIN_HELP.format(who="the generators"), None)
    placement_strategy: Literal["SPREAD", "PACK"] = doc(
        "SPREAD: generators go to different nodes where they fit (a node's loss costs one engine); PACK: Ray's "
        "default, fewest nodes.", "SPREAD")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = doc("vLLM weight dtype (fp32 is faster for tiny models on CPU).", "float32")
    kv_cache_gib: PosFloat = doc("KV-cache size per engine on CPU, GiB.", 1.0)
    gpu_memory_utilization: Annotated[float, Range(gt=0, le=1)] = doc(
        "GPU: the share of its GPU's memory an engine takes for weights + KV cache (vLLM's setting); lower it "
        "when other roles share the GPU (configs/ppo_gpu_smoke.yaml: 0.15).", 0.85)
    cpu_threads: NonNegInt = doc(
        "CPU: torch/OpenMP threads of each engine, fixed when it starts. 0: 1 thread, or with placement "
        "timeshare the driver node's cores / num_generators (the engines have the cores while they generate).", 0)
    in_process: bool | None = doc(
        "Run each vLLM engine inside its generator actor (true) or in an engine process of its own (false; its "
        "death is noticed and the generator replaced). None: in-process on CPU (half the CPU for the same "
        "tokens), own process on GPU.", None)
    max_model_len: PosInt = doc("Longest prompt + response an engine accepts.", 1024)
    n_samples_per_prompt: PosInt = doc("Responses sampled per prompt (group size for grpo/rloo).", 1)
    temperature: NonNegFloat = doc(
        "Sampling temperature. The learners and the reference compute logprobs (PPO ratio, KL, entropy) from "
        "logits / temperature, the distribution the samples came from, as OpenRLHF and verl do; 0 (greedy) "
        "leaves them on raw logits and needs n_samples_per_prompt 1.", 1.0)
    top_p: Annotated[float, Range(gt=0, le=1)] = doc("Nucleus sampling threshold.", 1.0)
    top_k: Annotated[int, Range(ge=-1)] = doc("Top-k sampling (-1 or 0: off).", -1)
    max_new_tokens: PosInt = doc("Longest response.", 64)
    max_prompt_length: PosInt = doc("Prompts are left-truncated to this many tokens.", 256)


# The dtypes a scorer (reference, reward model) may load its model in: relay.actors.scoring.SCORER_DTYPES.
ScorerDtype = Literal["auto", "float32", "bfloat16", "float16"]
SCORER_DTYPE_HELP = (
    "dtype the {who} loads its model in, on the device Ray gave it (a GPU when {sec}.num_gpus > 0, else CPU). "
    "auto: bfloat16 on a GPU (float16 on one without bf16), float32 on CPU. bfloat16 on CPU needs native bf16 "
    "(AVX512_BF16 or AMX; elsewhere the actor stops at start with an error naming this field instead of silently "
    "running emulated bf16 or loading float32 at twice the planned memory); float16 needs a GPU. {extra}")
MICRO_BATCH_HELP = ("{what} per forward of the {who} (bounds its activation memory; scores do not depend on it "
                    "beyond float rounding).")


@dataclass
class RewardConfig(Group):
    """Where rewards come from."""

    kind: Literal["model", "rule", "http"] = doc("model (a trained RM folder), rule (a Python function) or http (a remote service).", "model")
    model: str | None = doc("Reward-model folder (kind=model).", None)
    rule: str | None = doc("'module:function' taking (prompt, response) texts and returning a float (kind=rule).", None)
    url: str | None = doc("Endpoint receiving JSON {prompts, responses} and returning {rewards} (kind=http).", None)
    timeout_s: PosFloat = doc("HTTP timeout per request.", 30.0)
    retries: NonNegInt = doc("HTTP: retry a failed request at least this many times (exponential backoff), even "
                             "past max_outage_s.", 3)
    max_outage_s: NonNegFloat = doc(
        "HTTP: how long the run holds and retries (exponential backoff, each wait logged) while the service is "
        "down (connection refused, timeouts, HTTP 408/429/5xx) before it stops with an error; keep it below "
        "cluster.timeout_s. TLS/certificate errors are never retried.", 600.0)
    max_response_bytes: PosInt = doc("HTTP: largest reply accepted; a larger one is an error (not retried).",
                                     16 * 2**20)
    num_cpus: NonNegFloat = doc("Logical CPUs the reward actor reserves in Ray.", 1.0)
    num_gpus: NonNegFloat = doc("GPUs the reward actor reserves in Ray (kind=model); with placement colocate, its "
                                "share of a critic rank's GPU (the actor's without a critic), e.g. 0.25.", 0.0)
    resources: Resources = doc(RESOURCES_HELP.format(who="the reward actor"), factory=dict)
    node_pin: NodePin | None = doc(NODE_PIN_HELP.format(who="the reward actor"), None)
    dtype: ScorerDtype = doc(SCORER_DTYPE_HELP.format(
        who="reward actor (kind=model)", sec="reward",
        extra="Rewards come back as fp32 numbers; bf16/fp16 ones carry ~1e-2 relative rounding."), "auto")
    micro_batch_size: PosInt = doc(MICRO_BATCH_HELP.format(what="Samples", who="reward model (kind=model)"), 8)


@dataclass
class ReferenceConfig(Group):
    """The frozen reference policy's actor (started when a KL term uses it)."""

    num_cpus: NonNegFloat = doc("Logical CPUs the reference actor reserves in Ray.", 0.5)
    num_gpus: NonNegFloat = doc("GPUs the reference actor reserves in Ray; with placement colocate, its share of "
                                "an actor-learner rank's GPU, e.g. 0.25.", 0.0)
    resources: Resources = doc(RESOURCES_HELP.format(who="the reference actor"), factory=dict)
    node_pin: NodePin | None = doc(NODE_PIN_HELP.format(who="the reference actor"), None)
    dtype: ScorerDtype = doc(SCORER_DTYPE_HELP.format(
        who="reference actor", sec="reference",
        extra="Its logprobs come back in fp32, but from bf16/fp16 logits the KL to an fp32 actor carries their "
              "rounding noise (not exactly 0 before the first update); float32 keeps it exact."), "auto")
    micro_batch_size: PosInt = doc(MICRO_BATCH_HELP.format(what="Sequences", who="reference"), 16)


@dataclass
class BufferConfig(Group):
    """The ExperienceBuffer actor (its capacity is `buffer_limit`)."""

    num_cpus: NonNegFloat = doc("Logical CPUs the buffer actor reserves in Ray.", 0.5)
    num_gpus: NonNegFloat = doc("GPUs the buffer actor reserves in Ray (it computes nothing on them: keep 0 "
                                "unless a GPU node must hold it).", 0.0)
    resources: Resources = doc(RESOURCES_HELP.format(who="the buffer actor"), factory=dict)
    node_pin: NodePin | None = doc(NODE_PIN_HELP.format(who="the buffer actor"), None)


@dataclass
class PPOAlgoConfig(Group):
    """The algorithm (defaults follow the seed)."""

    advantage_estimator: Literal["gae", "grpo", "rloo"] = doc("gae (PPO with a critic), grpo or rloo (group baselines, no critic).", "gae")
    num_episodes: PosInt = doc("Episodes; each = collect phase + update phase.", 10)
    num_collect_steps: PosInt = doc("Prompt batches generated per episode.", 1)
    num_update_steps: PosInt = doc("Passes over the episode's experiences (PPO epochs).", 1)
    experience_batch_size: PosInt = doc("Prompts per collect step.", 8)
    train_batch_size: PosInt = doc("Experiences per micro-batch per data-parallel rank.", 8)
    accumulation_steps: PosInt = doc("Micro-batches per optimizer step.", 1)
    forward_micro_batch_size: NonNegInt = doc(
        "Experiences per no-grad forward per data-parallel rank when the critic scores values and the actor "
        "recomputes old logprobs (and the KL's policy logprobs at a temperature other than 1), so their peak "
        "memory follows this micro-batch, not the episode; each micro-batch drops the padding columns none of its "
        "rows uses. Results do not depend on it beyond float rounding. 0: train_batch_size.", 0)
    gamma: Fraction = doc("GAE discount.", 1.0)
    lam: Fraction = doc("GAE lambda.", 0.95)
    eps_clip: PosFloat = doc("PPO policy ratio clip.", 0.2)
    value_clip: NonNegFloat = doc("Value clip around old values (0 disables).", 0.2)
    kl_coef: NonNegFloat = doc("KL penalty coefficient against the reference (0: no KL term, and no reference actor is "
                         "started, as in verl).", 0.1)
    kl_estimator: Literal["k1", "k2", "k3"] = doc(
        "KL estimator: k1 (log ratio), k2 (squared), k3 (unbiased, non-negative). As a loss term "
        "(kl_in_reward false) use k3 or k2: k1's gradient is zero in expectation (verl's advice: low_var_kl, i.e. "
        "k3, for the loss); k1 is then rejected.", "k1")
    kl_in_reward: bool = doc("Put the KL penalty into the per-token reward (seed) instead of a loss term.", True)
    adaptive_kl: bool = doc("Adapt kl_coef toward target_kl (Ziegler et al.).", False)
    target_kl: PosFloat = doc("Target KL per sequence for adaptive_kl.", 6.0)
    kl_horizon: PosInt = doc("Horizon of the adaptive KL controller.", 10000)
    whiten_advantages: bool = doc("Normalise advantages to mean 0, std 1 per batch.", True)
    reward_clip: NonNegFloat = doc("Clip rewards to [-reward_clip, reward_clip] (0 disables).", 10.0)
    normalize_reward: bool = doc("Running mean/std normalisation of rewards.", False)
    entropy_coef: NonNegFloat = doc("Entropy bonus coefficient (0: metric only).", 0.0)
    ptx_coef: NonNegFloat = doc("Weight of the pretraining (ptx) loss mixed into the actor loss.", 0.0)
    ptx_batch_size: PosInt = doc(
        "ptx rows per actor micro-batch per data-parallel rank (ptx_batch_size x micro-batches x dp rows per "
        "update step); the ptx term is ptx_coef x the mean next-token loss over all of a step's ptx tokens.", 1)
    mode: Literal["sync", "async"] = doc("sync: collect then update; async: generators keep producing while learners update.", "sync")
    max_staleness: NonNegInt = doc("async: drop experiences older than this many weight versions.", 1)
    tis_cap: PosFloat = doc("async: cap of the truncated importance-sampling ratio learner/generator.", 2.0)
    shared_prompt_forward: bool = doc(
        "Actor update: run each group's repeated prompt once (KV cache reused by its n samples): P + nR tokens "
        "per group instead of n(P + R), same loss and gradient. Used when n_samples_per_prompt > 1 with actor "
        "plugins ddp/zero2/zero2_cpu without grad_checkpoint (the shardformer forwards of '3d' have no KV cache).",
        True)
    update_autocast: Literal["off", "bf16", "auto"] = doc(
        "Update: run the policy's forward (and so its backward), and the critic's, under bf16 autocast, fp32 "
        "weights, optimizer, logprob and value math kept (1.5x faster steps where the CPU computes bf16 natively; see "
        "relay.learners.autocast). 'auto': bf16 on GPUs and CPUs with AVX512_BF16/AMX, off on AVX2-only CPUs "
        "(bf16 is emulated there). Changes the numbers at the ~1e-2 level: old logprobs then come from the "
        "update's own forward (old_logprobs 'auto' with num_update_steps 1: ratio exactly 1) or the learner's "
        "fp32 recompute (the first step's ratio near 1, not exactly 1). 'off' keeps runs bit-reproducible.",
        "off")
    old_logprobs: Literal["auto", "learner", "generator", "loss"] = doc(
        "Source of the PPO ratio's old logprobs: 'learner' (the actor group recomputes them on the episode before "
        "its first update: ratio exactly 1), 'generator' (vLLM's sampling logprobs: saves one actor forward per "
        "episode; sync mode and generation.temperature 1 only: vLLM reports logprobs of the raw logits), 'loss' "
        "(the update's own forward, detached: ratio exactly 1 and no extra forward; num_update_steps 1 only, "
        "where the policy has not moved before its one optimizer step; async mode computes its importance "
        "weights there too) or 'auto' (generator in sync mode when generation.dtype and the actor's "
        "mixed_precision are both fp32, update_autocast is off and the temperature is 1, where the two agree to "
        "~1e-6; else loss when num_update_steps is 1; else learner).",
        "auto")
    overlap_critic: bool = doc(
        "Run each update step's critic step at the same time as the actor's (both groups compute at once, as "
        "OpenRLHF does) instead of after it. Placement timeshare then shares each node's cores over the actor and "
        "critic ranks together. The two steps share no state, so only the timing changes (and, in timeshare, each "
        "rank's thread count, which can move float rounding).", True)
    max_nonfinite_steps: PosInt = doc(
        "An actor or critic optimizer step with a non-finite loss or gradient is skipped (weights untouched, "
        "counted as nonfinite_skipped); after this many update steps in a row with a skip the run stops with "
        "an error naming the episode.", 3)


@dataclass
class PPOEvalConfig(Group):
    """Held-out evaluation during PPO (`eval_dataset`): the policy's sampled answers to held-out prompts, scored
    by the run's reward source, with KL to the reference when the run has one (at temperature 1)."""

    num_prompts: PosInt = doc("Held-out prompts used per evaluation (the first N of eval_dataset).", 64)
    n_samples: PosInt = doc("Answers sampled per held-out prompt.", 4)
    temperature: NonNegFloat = doc("Sampling temperature of the evaluation (1.0 also gives the KL estimate; 0 = greedy, one answer).", 1.0)
    max_new_tokens: NonNegInt = doc("Longest answer (0: generation.max_new_tokens).", 0)
    pass_threshold: Annotated[float, Range()] | None = doc("An answer passes when its reward >= this; reports eval/pass_rate (e.g. 1.0 for a 0/1 rule).", None)
    show_samples: NonNegInt = doc("Answers per evaluation written to SAVE_DIR/eval_samples.jsonl (and one printed).", 3)


@dataclass
class PPOConfig(Group):
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
    reference: ReferenceConfig = doc("Reference actor resources.", factory=ReferenceConfig)
    buffer: BufferConfig = doc("ExperienceBuffer actor resources.", factory=BufferConfig)
    placement: PlacementMode = doc(
        "How roles share the cluster (checked against its nodes before any actor starts). 'auto': 'timeshare' for "
        "a sync run on a cluster without GPUs whose generators have no node_pin or custom resources, else "
        "'separate' (the run logs which and why). 'separate': every role "
        "reserves its own resources. 'colocate': the reference lives in an actor-learner rank's bundle and a "
        "reward model (kind=model) in a critic rank's (the actor's without a critic), sharing that rank's GPU "
        "(reference.num_gpus / reward.num_gpus are their shares; the rank reserves the rest). Saves the scorers' "
        "GPUs at a memory cost: the scorer's weights and activations sit beside the rank's weights, gradients "
        "and optimizer state, so leave room (ZeRO, offload, smaller micro-batches) or the rank runs out of memory. "
        "'timeshare' (CPU, sync mode): generators sit in the actor-learner ranks' bundles and reserve no CPUs of "
        "their own; generation and update take turns, and each learner rank trains with every core its node "
        "gives it (cores / learner ranks on the node; actor and critic ranks share them when algo.overlap_critic) "
        "instead of actor_learner.num_threads, handing back after the update.",
        "auto")
    algo: PPOAlgoConfig = doc("Algorithm.", factory=PPOAlgoConfig)
    logging: LoggingConfig = doc("Metrics and logging.", factory=LoggingConfig)
    cluster: ClusterConfig = doc("Ray cluster.", factory=ClusterConfig)
    prompt_dataset: StrList = doc("Prepared prompt folders (`relay prepare prompt`).", factory=list)
    eval_dataset: StrList = doc("Prepared held-out prompt folders; evaluated before training, every eval_interval "
                                  "episodes and at the end (eval/* metrics).", factory=list)
    eval_interval: NonNegInt = doc("Evaluate on eval_dataset every N episodes (0: only before training and at the end).", 0)
    eval: PPOEvalConfig = doc("Held-out evaluation settings.", factory=PPOEvalConfig)
    pretrain_dataset: StrList = doc("Prepared ptx folders (`relay prepare ptx`), used when ptx_coef > 0.", factory=list)
    conversation_template_config: str | None = doc(
        "Conversation template JSON (`relay prepare` format): its stop_ids end generation and count as EOS for "
        "rewards, and the prompt folders must have been prepared with the same template. Default: the template "
        "the prompt folders were prepared with (prepared.json), else the tokenizer's eos.", None)
    buffer_limit: NonNegInt = doc("ExperienceBuffer capacity in experiences: at least one episode's worth (0: one "
                                  "episode's worth, two in async mode).", 0)
    checkpoint_path: str | None = doc(
        "Resume from this checkpoint folder, a run folder (its newest complete checkpoint), or 'auto': save_dir's "
        "newest complete checkpoint, else a fresh start (what `--resume auto` sets).", None)
    save_dir: str = doc("Output folder.", "outputs/ppo")
    save_interval: NonNegInt = doc("Save every N episodes (0: by time only, see save_every_minutes). A checkpoint "
                                   "is also written at the end and when the run is stopped by a signal.", 0)
    save_every_minutes: NonNegFloat = doc(
        "Also save when this many minutes have passed since the last checkpoint (checked after each episode), so "
        "a killed run loses at most about this much work (0: off).", 30.0)
    keep_checkpoints: NonNegInt = doc("Keep the newest N checkpoints in SAVE_DIR/checkpoints; older ones are "
                                      "deleted after each save (0: keep all).", 2)
    stop_grace_s: NonNegFloat = doc(
        "On SIGTERM or SIGINT (`ray job stop`, preemption, Ctrl-C) the run saves a checkpoint after the current "
        "episode and exits, telling how to resume; if that takes longer than this many seconds it exits anyway "
        "(0: no limit).", 60.0)
    config_file: str | None = doc("Write the resolved config here (default SAVE_DIR/config.yaml).", None)
    seed: Seed = doc("Random seed.", 42)


# --------------------------------------------------------------------------------------------- derived values
def ppo_buffer_size(cfg: PPOConfig) -> int:
    """Experiences one episode collects: num_collect_steps x experience_batch_size x n_samples_per_prompt."""
    return cfg.algo.num_collect_steps * cfg.algo.experience_batch_size * cfg.generation.n_samples_per_prompt


def forward_micro_batch(algo: PPOAlgoConfig) -> int:
    """Rows per no-grad learner forward per rank (algo.forward_micro_batch_size; 0: train_batch_size)."""
    return algo.forward_micro_batch_size or algo.train_batch_size


def needs_reference(cfg: PPOConfig) -> bool:
    """A reference policy is only worth its memory and forward passes when a KL term uses it."""
    return cfg.algo.kl_coef > 0


def learner_temperature(cfg: PPOConfig) -> float:
    """The temperature learners and the reference divide logits by: the sampling temperature (1 for greedy)."""
    t = cfg.generation.temperature
    return t if t > 0 else 1.0


def old_logprobs_source(cfg: PPOConfig) -> Literal["learner", "generator", "loss"]:
    """Where the PPO ratio's old logprobs come from (see PPOAlgoConfig.old_logprobs), 'auto' resolved."""
    a = cfg.algo
    if a.old_logprobs != "auto":
        return a.old_logprobs
    if (a.mode == "sync" and cfg.generation.dtype == "float32" and cfg.actor_learner.mixed_precision == "fp32"
            and a.update_autocast == "off" and learner_temperature(cfg) == 1.0):
        return "generator"
    return "loss" if a.num_update_steps == 1 else "learner"


# Plugins whose model runs Hugging Face's own forward (with a KV cache): the shared-prompt forwards need one.
PLAIN_FORWARD_PLUGINS = ("ddp", "zero2", "zero2_cpu")


def actor_shares_prompts(cfg: PPOConfig) -> bool:
    """Whether the actor update may run repeated prompts once (see PPOAlgoConfig.shared_prompt_forward)."""
    lc = cfg.actor_learner
    return (cfg.algo.shared_prompt_forward and cfg.generation.n_samples_per_prompt > 1
            and lc.plugin in PLAIN_FORWARD_PLUGINS and not lc.grad_checkpoint)
