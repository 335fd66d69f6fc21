"""Configs of the supervised stages: SFT, reward model and DPO."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from relay.config.fields import Group, NonNegFloat, NonNegInt, PosFloat, PosInt, Range, Seed, StrList, doc
from relay.config.groups import ClusterConfig, LearnerConfig, LoggingConfig, LoraConfig, ModelConfig, OptimConfig


@dataclass
class TrainConfig(Group):
    """Fields every supervised stage (SFT, RM, DPO) shares: the seed's training arguments."""

    model: ModelConfig = doc("Model to train.", factory=ModelConfig)
    learner: LearnerConfig = doc("Learner group and ColossalAI plugin.", factory=LearnerConfig)
    optim: OptimConfig = doc("Optimizer and schedule.", factory=OptimConfig)
    lora: LoraConfig = doc("LoRA options.", factory=LoraConfig)
    logging: LoggingConfig = doc("Metrics and logging.", factory=LoggingConfig)
    cluster: ClusterConfig = doc("Ray cluster.", factory=ClusterConfig)
    dataset: StrList = doc("Prepared data folders (output of `relay prepare`).", factory=list)
    eval_dataset: StrList = doc("Prepared evaluation folders (optional).", factory=list)
    checkpoint_path: str | None = doc(
        "Resume (model, optimizer, scheduler, data position, RNG) from this checkpoint folder, a run folder (its "
        "newest complete checkpoint), or 'auto': save_dir's newest complete checkpoint, else a fresh start "
        "(what `--resume auto` sets).", None)
    save_dir: str = doc("Output folder: checkpoints, final model, metrics.jsonl, plots.", "outputs/run")
    save_interval: NonNegInt = doc("Save a checkpoint every N optimizer steps (0: by time only, see "
                                   "save_every_minutes). A checkpoint is also written at the end and when the run "
                                   "is stopped by a signal.", 0)
    save_every_minutes: NonNegFloat = doc(
        "Also save when this many minutes have passed since the last checkpoint (checked after each optimizer "
        "step), so a killed run loses at most about this much work whatever a step costs (0: off).", 30.0)
    keep_checkpoints: NonNegInt = doc("Keep the newest N checkpoints in SAVE_DIR/checkpoints; older ones are "
                                      "deleted after each save (0: keep all).", 2)
    stop_grace_s: NonNegFloat = doc(
        "On SIGTERM or SIGINT (`ray job stop`, preemption, Ctrl-C) the run saves a checkpoint after the current "
        "step and exits, telling how to resume; if that takes longer than this many seconds it exits anyway "
        "(0: no limit).", 60.0)
    eval_interval: NonNegInt = doc("Evaluate on eval_dataset every N optimizer steps (0: at each checkpoint and at the end).", 0)
    config_file: str | None = doc("Write the resolved config here as YAML (default SAVE_DIR/config.yaml).", None)
    batch_size: PosInt = doc("Micro-batch size per data-parallel rank.", 4)
    max_epochs: PosInt = doc("Passes over the training data.", 1)
    max_steps: NonNegInt = doc("Stop after this many optimizer steps (0: no limit).", 0)
    accumulation_steps: PosInt = doc("Micro-batches per optimizer step.", 1)
    max_length: PosInt = doc("Truncate samples to this many tokens.", 512)
    seed: Seed = doc("Random seed (data order, init of new heads, dropout).", 42)
    max_nonfinite_steps: PosInt = doc(
        "Optimizer steps whose loss or gradient is non-finite are skipped (weights and optimizer state untouched, "
        "counted as nonfinite_skipped in the metrics); after this many in a row the run stops with an error.", 3)


@dataclass
class SFTConfig(TrainConfig):
    """Stage 1: supervised fine-tuning, cross entropy on assistant tokens only."""


@dataclass
class RMConfig(TrainConfig):
    """Stage 2: reward model = backbone + one linear value head, trained on preference pairs."""

    loss_type: Literal["log_sig", "log_exp"] = doc(
        "Pairwise loss: log_sig = -log sigmoid(r_c - r_r); log_exp = log(1 + exp(r_r - r_c)).", "log_sig")


@dataclass
class DPOConfig(TrainConfig):
    """Direct preference optimisation against a frozen reference."""

    beta: PosFloat = doc("Inverse temperature of the implicit reward.", 0.1)
    loss_type: Literal["sigmoid", "ipo", "simpo"] = doc("sigmoid (DPO), ipo, or simpo (reference-free, length-normalised).", "sigmoid")
    gamma: NonNegFloat = doc("SimPO target reward margin.", 0.5)
    label_smoothing: Annotated[float, Range(ge=0, lt=0.5)] = doc("Conservative DPO label smoothing (sigmoid loss only).", 0.0)
    reference_model: str | None = doc("Reference model folder; default: the initial policy (model.pretrain).", None)
    precompute_ref_logprobs: bool = doc("Compute reference logprobs once before training and free the reference.", False)
    shared_prompt_forward: bool = doc(
        "Run each pair's shared prompt once (KV cache repeated for the chosen and rejected replies): p + 2r tokens "
        "per pair instead of 2(p + r), same loss and gradient. Used with plugins ddp/zero2/zero2_cpu without "
        "grad_checkpoint (the shardformer forwards of '3d' and checkpointing turn the cache off); pairs whose "
        "prompts differ use the stacked forward.", True)
