"""`relay sft|rm|dpo`: one driver loop for the three supervised stages, run by a learner group.

The driver (this process; under `ray job submit` the job's entrypoint) loads prepared data, builds each global
batch (batch_size x accumulation_steps x data-parallel ranks, right-padded), sets the learning rate
(warm-up, then cosine) and calls `LearnerGroup.train_step` with the stage's loss (relay.learners.sft / rm /
dpo, run inside the workers). It logs one metrics.jsonl line per optimizer step (+ TensorBoard, wandb),
evaluates on eval_dataset, and checkpoints atomically:

    SAVE_DIR/config.yaml                      resolved config
    SAVE_DIR/metrics.jsonl, logs/, plots/     metrics, TensorBoard/wandb, `relay plot` charts
    SAVE_DIR/checkpoints/step-XXXXXXXX/       model/ (HF safetensors), optimizer/, adapter/ (LoRA),
                                              trainer_state.json + rng.safetensors, COMPLETE
    SAVE_DIR/model/ (or adapter/)             the final model: transformers and vLLM load it; with LoRA and
                                              merge_lora_weights=false the peft adapter beside its base

`checkpoint_path` (a checkpoint, a run folder, or `auto`: SAVE_DIR's newest) resumes exactly: weights, optimizer,
step, data position, RNG. Checkpoints come every save_interval steps and save_every_minutes, the newest
keep_checkpoints stay; a SIGTERM/SIGINT stops the loop after the current step with a checkpoint
(relay.launch.safe_points).
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from relay.config import PLAIN_FORWARD_PLUGINS, DPOConfig, RMConfig, SFTConfig, TrainConfig, save_config, to_dict
from relay.launch import safe_points
from relay.launch.train_data import collate, evaluate, load_samples, reference_logps, token_count
from relay.learners import checkpoint as ckpt
from relay.learners import checkpoint_store as store
from relay.learners.checkpoint_resume import LEARNER_FILES, STATE_FILES, find_resume
from relay.learners.accumulate import NonfiniteGuard
from relay.learners.dpo import dpo_train_loss
from relay.learners.rm import rm_loss
from relay.learners.schedule import lr_at
from relay.learners.sft import sft_loss


@dataclass(frozen=True)
class Stage:
    name: str  # sft | rm | dpo
    kind: str  # learner model kind
    data_kind: str  # prepared data kind
    loss: Callable[..., Any]


STAGES = {
    "sft": Stage("sft", "causal_lm", "sft", sft_loss),
    "rm": Stage("rm", "critic", "preference", rm_loss),
    "dpo": Stage("dpo", "causal_lm", "preference", dpo_train_loss),
}


SHOWN_EVAL = ("eval/loss", "eval/acc", "eval/rewards/accuracy", "eval/rewards/margins")


def log(stage: str, msg: str) -> None:
    from tqdm import tqdm  # a line between progress-bar redraws, not through the bar

    tqdm.write(f"[relay {stage}] {msg}", file=sys.stdout)
    sys.stdout.flush()


# ----------------------------------------------------------------------------------------------- model
def pad_token_id(model_path: str, tokenizer_dir: str | None) -> int:
    """Padding id for batches (masked everywhere, so any id in the vocabulary works): the tokenizer's pad,
    else its eos, else the model config's."""
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer_dir or model_path)
        if tok.pad_token_id is not None:
            return int(tok.pad_token_id)
        if tok.eos_token_id is not None:
            return int(tok.eos_token_id)
    except (OSError, ValueError):
        pass
    cfg = json.loads((Path(model_path) / "config.json").read_text())
    value = cfg.get("pad_token_id", cfg.get("eos_token_id")) or 0
    return int(value[0] if isinstance(value, list) else value)


def attention_choice(use_flash_attn: bool, on_gpu: bool) -> tuple[str, str]:
    """(attn_implementation, why): flash-attn when asked for, installed and on GPU; PyTorch SDPA otherwise."""
    if not use_flash_attn:
        return "sdpa", "use_flash_attn is off"
    if importlib.util.find_spec("flash_attn") is None:
        return "sdpa", "flash-attn is not installed"
    if not on_gpu:
        return "sdpa", "flash-attn needs a GPU"
    return "flash_attention_2", "flash-attn is installed"


def learner_options(cfg: TrainConfig, stage: Stage, attn: str) -> dict[str, Any]:
    """LearnerSpec fields from the config."""
    lc, oc, lo = cfg.learner, cfg.optim, cfg.lora
    return dict(
        kind=stage.kind, plugin=lc.plugin, tp=lc.tp, pp=lc.pp, sp=lc.sp, zero_stage=lc.zero_stage,
        precision=lc.mixed_precision, max_norm=oc.grad_clip, lr=oc.lr, weight_decay=oc.weight_decay,
        betas=tuple(oc.betas), eps=oc.eps, lora_rank=lo.lora_rank, lora_alpha=float(lo.lora_alpha),
        lora_dropout=lo.lora_dropout, lora_target_modules=tuple(lo.lora_target_modules),
        grad_checkpoint=lc.grad_checkpoint, seed=cfg.seed, attn_implementation=attn,
    )


def loss_kwargs(cfg: TrainConfig, stage: Stage, reference_path: str | None, attn: str) -> dict[str, Any]:
    kw: dict[str, Any] = {"num_threads": cfg.learner.num_threads}
    if isinstance(cfg, RMConfig):
        kw["loss_type"] = cfg.loss_type
    if isinstance(cfg, DPOConfig):
        kw.update(beta=cfg.beta, loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing, gamma=cfg.gamma)
        kw["shared_prompt"] = (cfg.shared_prompt_forward and cfg.learner.plugin in PLAIN_FORWARD_PLUGINS
                               and not cfg.learner.grad_checkpoint)
        if not cfg.precompute_ref_logprobs and cfg.loss_type != "simpo":
            kw.update(reference_path=reference_path, reference_attn=attn)
    return kw


# ------------------------------------------------------------------------------------------ checkpoints
def save_checkpoint(group: Any, save_dir: str | Path, step: int, state: dict[str, Any],
                    keep: int = 0) -> store.SaveReport:
    """Write checkpoints/step-N atomically (a kill mid-write leaves only a hidden temp folder behind), then
    delete older checkpoints beyond the newest `keep` (0: keep all)."""
    def write(tmp: Path) -> None:
        group.save_checkpoint(tmp)
        ckpt.save_trainer_state(tmp, state)

    return store.save_with_retention(store.checkpoint_dir(save_dir, step), write, keep)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json", "chat_template.jinja")


def export_final(checkpoint: Path, save_dir: Path, cfg: TrainConfig, model_path: str) -> Path:
    """SAVE_DIR/model (merged weights, HF folder), or SAVE_DIR/adapter for LoRA with merge_lora_weights off."""
    adapter_only = cfg.lora.lora_rank > 0 and not cfg.lora.merge_lora_weights
    name = "adapter" if adapter_only else "model"
    # The learners copy the model folder's tokenizer into model/; an explicit tokenizer_dir wins.
    tok_src = cfg.model.tokenizer_dir or (model_path if adapter_only else None)
    tokenizer = [f for f in Path(tok_src).iterdir() if f.name in TOKENIZER_FILES] if tok_src else []
    return store.publish_folder(checkpoint / name, save_dir / name, tokenizer)


# ------------------------------------------------------------------------------------------------ driver
@dataclass
class TrainResult:
    save_dir: Path
    steps: int
    final: Path | None
    checkpoint: Path | None
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped: bool = False  # by a signal, at a safe point (the run continues with `--resume auto`)


def data_parallel_size(cfg: TrainConfig) -> int:
    return max(cfg.learner.num_ranks // (cfg.learner.tp * cfg.learner.pp), 1)


def train(cfg: TrainConfig, stage_name: str, group: Any = None) -> TrainResult:
    """Run one stage. With `group`, reuse that learner group (rebuilt for this run, left running)."""
    from tqdm import tqdm

    from relay.data.batches import BatchOrder
    from relay.launch import cluster
    from relay.learners.group import LearnerGroup
    from relay.metrics import MetricsLogger
    from relay.models.local import local_folder
    from relay.models.smollm2 import resolve_model_path

    stage = STAGES[stage_name]
    save_dir = Path(cfg.save_dir).absolute()
    save_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, save_dir / "config.yaml")
    if cfg.config_file:
        save_config(cfg, cfg.config_file)
    if removed := store.clean_stale(save_dir):
        log(stage.name, store.stale_line(removed))
    resume = find_resume(cfg.checkpoint_path, save_dir, LEARNER_FILES + STATE_FILES, lambda m: log(stage.name, m))
    resumed = ckpt.load_trainer_state(resume, restore=False) if resume else None
    if resumed and resumed.get("stage") != stage.name:
        raise ValueError(f"checkpoint_path: {resume} is a {resumed.get('stage')} checkpoint, not {stage.name}")

    model_path = resolve_model_path(cfg.model.pretrain, "model.pretrain")
    if cfg.model.tokenizer_dir:  # used at the end (export), so refuse a hub id now, not after training
        local_folder(cfg.model.tokenizer_dir, "model.tokenizer_dir")
    pad_id = pad_token_id(model_path, cfg.model.tokenizer_dir)
    train_set = load_samples(cfg.dataset, stage.data_kind, cfg.max_length)
    eval_set = load_samples(cfg.eval_dataset, stage.data_kind, cfg.max_length) if cfg.eval_dataset else None
    vocab = json.loads((Path(model_path) / "config.json").read_text()).get("vocab_size")
    if vocab and train_set.max_id() >= vocab:
        raise ValueError(f"dataset: token id {train_set.max_id()} >= the model's vocab_size {vocab}: prepared with another tokenizer?")
    dp = data_parallel_size(cfg)
    global_batch = cfg.batch_size * cfg.accumulation_steps * dp
    order = BatchOrder(len(train_set), global_batch, seed=cfg.seed)
    total = order.batches_per_epoch * cfg.max_epochs
    total = min(total, cfg.max_steps) if cfg.max_steps else total
    log(stage.name, f"{len(train_set)} samples ({train_set.dropped} dropped: no trained token within max_length), "
        f"global batch {global_batch} = {cfg.batch_size} x {cfg.accumulation_steps} accumulation x {dp} dp ranks, "
        f"{total} optimizer steps")

    on_gpu = cfg.learner.num_gpus_per_rank > 0
    attn, why = attention_choice(cfg.learner.use_flash_attn, on_gpu)
    log(stage.name, f"attention: {attn} ({why})")
    if cfg.learner.mixed_precision == "bf16" and not on_gpu:
        from relay.cpu import bf16_slow_reason

        if (slow := bf16_slow_reason()) is not None:
            log(stage.name, f"learner.mixed_precision: bf16 kept, but {slow}")
    reference_path = None
    if isinstance(cfg, DPOConfig) and cfg.loss_type != "simpo":
        reference_path = (resolve_model_path(cfg.reference_model, "reference_model") if cfg.reference_model
                          else model_path)
    # The group computes reference logprobs before it trains (eval split; train split when precomputing): a
    # different reference model is built first and swapped for the policy afterwards.
    group_ref = bool(reference_path) and (cfg.precompute_ref_logprobs or eval_set is not None)
    first_path = reference_path if group_ref and reference_path != model_path else model_path
    opts = learner_options(cfg, stage, attn)

    own_group = group is None
    t0 = time.time()
    if own_group:
        cluster.init_ray(cfg.cluster.address, num_cpus=cfg.cluster.num_cpus, dashboard_host=cfg.cluster.dashboard_host)
        group = LearnerGroup.create(
            cfg.learner.num_ranks, first_path, role=f"{stage.name}-learner", run=Path(cfg.save_dir).name or None,
            num_cpus=cfg.learner.num_cpus_per_rank, num_gpus=cfg.learner.num_gpus_per_rank or None,
            resources=cfg.learner.resources_per_rank, node_pin=cfg.learner.node_pin,
            strategy=cfg.learner.placement_strategy, timeout_s=cfg.cluster.timeout_s, **opts,
        )
    else:
        group.rebuild(model_path=str(first_path), **opts)
    log(stage.name, f"learner group: {cfg.learner.num_ranks} ranks, plugin {cfg.learner.plugin}, ready in {time.time() - t0:.1f} s")
    logger = None
    stop = safe_points.active()
    # If the stop's grace period runs out mid-save, the process exits at once: remove the temp folders first.
    forget_cleanup = stop.add_cleanup(lambda: store.clean_stale(save_dir)) if stop else None
    try:
        start = int(resumed["step"]) if resumed else 0
        if resumed:
            order.load_state_dict(resumed["data"])
            if resumed.get("total_steps") != total:
                log(stage.name, f"warning: the checkpoint's run planned {resumed.get('total_steps')} steps, this one "
                    f"{total}: the lr schedule will differ from an uninterrupted run")
        chunk = 2 * global_batch
        train_ref = eval_ref = None
        if group_ref:
            t1 = time.time()
            if eval_set is not None:
                eval_ref = reference_logps(group, eval_set, list(range(len(eval_set))), pad_id, chunk)
            if cfg.precompute_ref_logprobs:
                probe = BatchOrder(len(train_set), global_batch, seed=cfg.seed)
                probe.load_state_dict(order.state_dict())
                visit = sorted({i for _ in range(start, total) for i in probe.next_batch()})
                train_ref = reference_logps(group, train_set, visit, pad_id, chunk)
            log(stage.name, f"reference logprobs computed in {time.time() - t1:.1f} s")
            if first_path != model_path:
                group.rebuild(model_path=str(model_path), **opts)
        if resume:
            group.load_checkpoint(resume)
            ckpt.load_trainer_state(resume, restore=True)
            log(stage.name, f"resumed from {resume} at step {start}")
        logger = MetricsLogger(
            save_dir, cfg.logging.log_dir, cfg.logging.use_tensorboard, cfg.logging.use_wandb,
            cfg.logging.wandb_project, run_name=f"{stage.name}-{save_dir.name}", config=to_dict(cfg),
            resume_step=start + 1 if resumed else None, note=lambda m: log(stage.name, m),
        )
        kw = loss_kwargs(cfg, stage, reference_path, attn)
        history: list[dict[str, Any]] = []
        last_saved: Path | None = resume
        eval_every = cfg.eval_interval or cfg.save_interval

        def state(step: int) -> dict[str, Any]:
            return {"step": step, "stage": stage.name, "total_steps": total, "data": order.state_dict()}

        if eval_set is not None and start == 0 and stage.name != "dpo":
            # where training starts from, so the held-out curve has its first point (DPO's is known: a policy
            # equal to its reference has margin 0)
            first = evaluate(group, cfg, stage.name, eval_set, pad_id, chunk, eval_ref)
            logger.log(0, first)
            log(stage.name, "before training: " + " ".join(f"{k} {v:.4g}" for k, v in first.items() if k in SHOWN_EVAL))
        guard = NonfiniteGuard(cfg.max_nonfinite_steps, "max_nonfinite_steps")
        schedule = safe_points.SaveSchedule(cfg.save_interval, cfg.save_every_minutes)
        saved_step = start if resume and store.belongs_to(resume, save_dir) else 0  # already in SAVE_DIR

        def save(done: int) -> Path:
            nonlocal saved_step
            report = save_checkpoint(group, save_dir, done, state(done), cfg.keep_checkpoints)
            schedule.saved()
            saved_step = done
            log(stage.name, report.line())
            return report.path

        bar = tqdm(total=total, initial=start, desc=f"relay {stage.name}", disable=not sys.stderr.isatty())
        for step in range(start, total):
            if stop is not None and stop.requested:  # safe point: between optimizer steps
                if step > saved_step:
                    last_saved = save(step)
                stop.finish(f"after step {step} of {total}", last_saved)  # `relay` prints it with the resume command
                bar.close()
                return TrainResult(save_dir, step, None, last_saved, history, stopped=True)
            lr = lr_at(step, cfg.optim.lr, total, cfg.optim.warmup_steps, cfg.optim.min_lr_ratio)
            group.set_lr(lr)
            idx = order.next_batch()
            batch = collate(train_set, idx, pad_id, stage.name)
            if train_ref is not None:
                batch["ref_chosen_logps"], batch["ref_rejected_logps"] = train_ref[idx, 0], train_ref[idx, 1]
            t1 = time.time()
            out = group.train_step(
                batch, stage.loss, micro_batches=cfg.accumulation_steps, **kw, step_seed=hash((cfg.seed, step))
            )
            dt = time.time() - t1
            for key in ("step", "step_started", "step_ended"):
                out.pop(key, None)
            record = {"epoch": round(order.epoch + order.position / order.batches_per_epoch, 4), "lr": lr, **out,
                      "samples_per_s": len(idx) / dt, "tokens_per_s": token_count(batch) / dt, "step_time": dt}
            done = step + 1
            if eval_set is not None and ((eval_every and done % eval_every == 0) or done == total):
                record.update(evaluate(group, cfg, stage.name, eval_set, pad_id, chunk, eval_ref))
            history.append(logger.log(done, record))
            bar.update(1)
            bar.set_postfix(loss=f"{out['loss']:.4f}")
            if cfg.logging.log_interval and (done % cfg.logging.log_interval == 0 or done == total):
                shown = " ".join(f"{k} {v:.4g}" for k, v in record.items() if k in ("loss", "lr", "train/acc", "rewards/accuracy", "samples_per_s", *SHOWN_EVAL))
                log(stage.name, f"step {done}/{total} epoch {record['epoch']:.2f} {shown}")
            # A non-finite step was skipped by the learners (weights untouched); stop after too many in a row.
            guard.update(out.get("nonfinite_skipped", 0.0) > 0, f"step {done} (loss {out['loss']})")
            if schedule.due(done) or done == total:
                last_saved = save(done)
        bar.close()
        final = export_final(last_saved, save_dir, cfg, model_path) if last_saved else None
        if final:
            log(stage.name, f"final model: {final}")
        logger.close()
        logger = None
        if history:
            from relay.launch.plot_cmd import plot_run

            plot_run(save_dir)
        return TrainResult(save_dir, total, final, last_saved, history)
    finally:
        if forget_cleanup is not None:
            forget_cleanup()
        if logger is not None:
            logger.close()
        if own_group:
            group.shutdown()


def run(cfg: TrainConfig, stage_name: str) -> int:
    import ray

    started = not ray.is_initialized() and not (cfg.cluster.address or os.environ.get("RAY_ADDRESS"))
    try:
        result = train(cfg, stage_name)
    except FileNotFoundError as err:  # data, model or checkpoint paths: say so without a traceback
        print(f"relay {stage_name}: error: {err} (prepared data comes from `relay prepare ...` or `relay data demo "
              "outputs/data -t tiny`; under `ray job submit` give absolute paths)", file=sys.stderr)
        return 2
    finally:
        if started and ray.is_initialized():
            ray.shutdown()  # the local cluster this run started
    if result.stopped:
        return 0  # `relay` (pipeline_cmd) prints how to resume and exits with the signal's code
    log(stage_name, f"done: {result.steps} steps; outputs in {result.save_dir}")
    return 0


def run_sft(cfg: SFTConfig) -> int:
    return run(cfg, "sft")


def run_rm(cfg: RMConfig) -> int:
    return run(cfg, "rm")


def run_dpo(cfg: DPOConfig) -> int:
    return run(cfg, "dpo")
