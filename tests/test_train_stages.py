"""SFT, reward model and DPO end to end: the `relay sft|rm|dpo` driver loop on a real 2-rank learner group
(Ray actors + ColossalAI, gloo), tiny Llama, small fixtures.

One learner group serves the module (`train(..., group=)` rebuilds it per run), which saves ~10-20 s of actor
start-up per run on a busy 2-core machine; the driver code is the same as `relay sft` runs.
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

pytest.importorskip("colossalai")

from relay.config import load_config  # noqa: E402
from relay.launch.prepare_cmd import PrepareOptions, prepare  # noqa: E402
from relay.launch.train import train  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]

POSITIVE = ["Sure, I would be glad to help you with that.", "Of course! Happy to help, here is how.",
            "Great question, thanks for asking so politely.", "Absolutely, let me explain it step by step."]
NEGATIVE = ["no", "go away", "whatever lol", "not my problem"]
QUESTIONS = ["Can you help me?", "How do I cook rice?", "What is a list?", "Where is the station?",
             "Why is the sky blue?", "Could you fix my code?", "What time is it?", "Tell me a joke"]


class Killed(BaseException):
    """Stands in for a kill: like KeyboardInterrupt/SystemExit, not an Exception."""


def sft_rows(n: int) -> list[dict]:
    """A memorisation set: n fixed question/answer conversations."""
    return [{"messages": [{"from": "human", "content": QUESTIONS[i % len(QUESTIONS)]},
                          {"from": "assistant", "content": f"Answer number {i}: {POSITIVE[i % 4]}"}]} for i in range(n)]


def preference_rows(n: int, seed: int) -> list[dict]:
    """Separable pairs: chosen replies are polite sentences, rejected ones short brush-offs."""
    rng = random.Random(seed)
    return [{"context": [{"from": "human", "content": rng.choice(QUESTIONS)}],
             "chosen": [{"from": "assistant", "content": rng.choice(POSITIVE)}],
             "rejected": [{"from": "assistant", "content": rng.choice(NEGATIVE)}]} for _ in range(n)]


def prepared(kind: str, rows: list[dict], out: Path, tokenizer: Path) -> str:
    raw = out.with_suffix(".jsonl")
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepare(PrepareOptions(kind, [str(raw)], str(out), tokenizer=str(tokenizer), max_length=128, progress=False))
    return str(out)


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_llama_dir) -> dict[str, str]:
    root = tmp_path_factory.mktemp("train-data")
    return {
        "sft": prepared("sft", sft_rows(8), root / "sft", tiny_llama_dir),
        "pref": prepared("preference", preference_rows(48, seed=0), root / "pref", tiny_llama_dir),
        "pref_eval": prepared("preference", preference_rows(16, seed=1), root / "pref_eval", tiny_llama_dir),
    }


@pytest.fixture(scope="module")
def group(ray_session, tiny_llama_dir):
    from relay.learners.group import LearnerGroup

    g = LearnerGroup.create(2, tiny_llama_dir, role="test-train", timeout_s=300)
    yield g
    g.shutdown()


def run(stage: str, group, model: Path, save_dir: Path, *sets: str):
    cfg = load_config(stage, None, [f"model.pretrain={model}", "learner.num_ranks=2", f"save_dir={save_dir}", *sets])
    return train(cfg, stage, group=group)


def metrics(save_dir: Path, with_step0: bool = False) -> list[dict]:
    """metrics.jsonl rows; the held-out evaluation before training (step 0) only when asked for."""
    rows = [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines()]
    return rows if with_step0 else [r for r in rows if r["step"] > 0]


def test_sft_memorises_with_grad_checkpointing(group, tiny_llama_dir, data, tmp_path):
    out = tmp_path / "sft"
    result = run("sft", group, tiny_llama_dir, out, f"dataset={data['sft']}", f"eval_dataset={data['sft']}",
                 "batch_size=2", "max_epochs=12", "optim.lr=3e-3", "optim.warmup_steps=2",
                 "learner.grad_checkpoint=true", "save_interval=10", "logging.log_interval=0")
    before, *rows = metrics(out, with_step0=True)
    assert before["step"] == 0 and set(before) >= {"eval/loss"} and "loss" not in before  # held-out, before training
    assert before["eval/loss"] == pytest.approx(math.log(1024), rel=0.05)
    assert [r["step"] for r in rows] == list(range(1, 25))  # 8 samples / global batch 4 = 2 steps per epoch
    assert rows[0]["loss"] == pytest.approx(math.log(1024), rel=0.05)  # random init: uniform over the vocab
    assert rows[-1]["loss"] <= rows[0]["loss"] / 2, (rows[0]["loss"], rows[-1]["loss"])
    assert rows[-1]["eval/loss"] <= before["eval/loss"] / 2
    for key in ("epoch", "lr", "loss", "samples_per_s", "tokens_per_s"):
        assert key in rows[0]
    assert rows[0]["lr"] < rows[1]["lr"] and rows[-1]["lr"] < rows[1]["lr"]  # warm-up, then decay
    # Checkpoints every 10 steps and at the end, the last keep_checkpoints (2) kept; plots, TensorBoard events and
    # the resolved config beside them.
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step-00000020", "step-00000024"]
    assert {p.name for p in (out / "plots").glob("*.png")} >= {"loss.png", "lr.png"}
    assert list((out / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    assert load_config("sft", out / "config.yaml").max_epochs == 12
    # The final folder is a plain HF model: it loads with transformers and has learnt the answers.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert result.final == out / "model"
    model = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out / "model")
    text = tok.apply_chat_template([{"role": "user", "content": QUESTIONS[3]}], tokenize=False, add_generation_prompt=True)
    ids = tok(text + "Answer number 3: " + POSITIVE[3] + "<|im_end|>", return_tensors="pt").input_ids
    labels = ids.clone()
    labels[:, : len(tok(text).input_ids)] = -100  # score the reply only, as training did
    with torch.no_grad():
        assert float(model(ids, labels=labels).loss) < rows[0]["loss"] / 2


@pytest.mark.parametrize("loss_type", ["log_sig", "log_exp"])
def test_reward_model_separates_pairs(group, tiny_llama_dir, data, tmp_path, loss_type):
    from relay.models.heads import CriticModel

    out = tmp_path / f"rm-{loss_type}"
    # log_exp also covers LoRA (adapters + a fully trained value head on zero2, merged into the saved model).
    lora = ["lora.lora_rank=8", "lora.lora_alpha=16", "optim.lr=5e-3"] if loss_type == "log_exp" else ["optim.lr=1e-3"]
    run("rm", group, tiny_llama_dir, out, f"dataset={data['pref']}", f"eval_dataset={data['pref_eval']}",
        f"loss_type={loss_type}", "learner.plugin=zero2", "batch_size=4", "max_epochs=2", "eval_interval=3",
        "logging.log_interval=0", *lora)
    rows = metrics(out)
    last = rows[-1]
    assert last["eval/acc"] > 0.9 and last["train/acc"] > 0.9, last
    assert last["eval/reward_chosen"] > last["eval/reward_rejected"]
    assert last["eval/loss"] < rows[0]["loss"]
    assert {"reward_chosen", "reward_rejected", "train/acc"} <= rows[0].keys()
    assert [r["step"] for r in rows if "eval/acc" in r] == [3, 6, 9, 12]
    before = metrics(out, with_step0=True)[0]
    assert before["step"] == 0 and before["eval/acc"] < last["eval/acc"]  # the held-out curve starts untrained
    # The saved reward model scores held-out pairs the same way outside Ray.
    from relay.data.shards import load_prepared

    rm = CriticModel.from_pretrained(out / "model")
    rm.eval()
    pairs = load_prepared(data["pref_eval"]).select(range(8))
    with torch.no_grad():
        for row in pairs:
            scores = [float(rm(torch.tensor([row[f"{side}_input_ids"]]))[0, -1]) for side in ("chosen", "rejected")]
            assert scores[0] > scores[1]


def test_dpo_starts_at_ln2_and_learns(group, tiny_llama_dir, data, tmp_path):
    common = [f"dataset={data['pref']}", "batch_size=2", "max_steps=6", "optim.lr=1e-3", "beta=0.1",
              "logging.log_interval=0"]
    # Reference as a second, frozen model in each worker.
    run("dpo", group, tiny_llama_dir, tmp_path / "ref-model", *common, f"eval_dataset={data['pref_eval']}")
    rows = metrics(tmp_path / "ref-model")
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference
    assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-4)
    assert rows[-1]["rewards/accuracy"] > rows[0]["rewards/accuracy"]
    assert rows[-1]["rewards/margins"] > 0 and rows[-1]["loss"] < rows[0]["loss"]
    assert rows[-1]["eval/rewards/accuracy"] > 0.9
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy"):
        assert key in rows[0]
    # Reference logprobs precomputed once (the group's own forward before training), and the same global batch
    # as 2 accumulated micro-batches of 1 pair per rank: the same run.
    run("dpo", group, tiny_llama_dir, tmp_path / "precomputed", *common, "precompute_ref_logprobs=true",
        "batch_size=1", "accumulation_steps=2")
    again = metrics(tmp_path / "precomputed")
    assert [r["loss"] for r in again] == pytest.approx([r["loss"] for r in rows], abs=1e-4)
    assert (tmp_path / "precomputed" / "plots" / "accuracy.png").exists()


def test_dpo_loss_types_and_lora_adapter(group, tiny_llama_dir, data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    common = [f"dataset={data['pref']}", "batch_size=2", "max_steps=2", "logging.log_interval=0"]
    for loss_type in ("ipo", "simpo"):
        run("dpo", group, tiny_llama_dir, tmp_path / loss_type, *common, f"loss_type={loss_type}")
        assert all(math.isfinite(r["loss"]) for r in metrics(tmp_path / loss_type))
    # LoRA, merge_lora_weights off: the final output is the peft adapter beside its base model.
    out = tmp_path / "lora"
    run("dpo", group, tiny_llama_dir, out, *common, "lora.lora_rank=4", "lora.merge_lora_weights=false",
        "optim.lr=5e-3", "precompute_ref_logprobs=true")
    assert metrics(out)[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # LoRA B starts at 0
    assert (out / "adapter" / "adapter_config.json").exists() and not (out / "model").exists()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, out / "adapter").merge_and_unload().state_dict()
    saved = AutoModelForCausalLM.from_pretrained(out / "checkpoints" / "step-00000002" / "model").state_dict()
    assert max(float((merged[k] - saved[k]).abs().max()) for k in saved) < 1e-6


RESUME_CASES = {
    "ddp": [],
    # LoRA adapters restored from the checkpoint; dropout masks repeat because each step seeds the workers.
    "zero2-lora-dropout": ["learner.plugin=zero2", "lora.lora_rank=4", "lora.lora_dropout=0.2"],
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_is_exact_and_a_failed_save_keeps_the_last_checkpoint(group, tiny_llama_dir, data, tmp_path, monkeypatch, case):
    from safetensors.torch import load_file

    from relay.learners import checkpoint as ckpt
    from relay.learners.checkpoint_store import latest_checkpoint

    common = [f"dataset={data['sft']}", "batch_size=2", "max_epochs=2", "max_steps=4", "save_interval=2", "optim.lr=3e-3",
              "optim.warmup_steps=1", "logging.log_interval=0", *RESUME_CASES[case]]
    run("sft", group, tiny_llama_dir, tmp_path / "straight", *common)

    # Second run: the step-4 save dies half-way (after the learners wrote model and optimizer).
    real = ckpt.save_trainer_state

    def dies_at_step_4(folder, state):
        if state["step"] == 4:
            raise Killed("killed while saving step 4")
        return real(folder, state)

    monkeypatch.setattr(ckpt, "save_trainer_state", dies_at_step_4)
    out = tmp_path / "interrupted"
    with pytest.raises(Killed):
        run("sft", group, tiny_llama_dir, out, *common)
    monkeypatch.setattr(ckpt, "save_trainer_state", real)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002"]
    assert latest_checkpoint(out) == out / "checkpoints" / "step-00000002"
    # What a SIGKILL mid-write leaves: a half-written temp folder. Resuming ignores and removes it.
    leftover = out / "checkpoints" / ".step-00000004.tmp-999999"
    (leftover / "model").mkdir(parents=True)

    run("sft", group, tiny_llama_dir, out, *common, f"checkpoint_path={out}")
    assert not leftover.exists()
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # the resumed run replaced the lost tail
    straight_rows = metrics(tmp_path / "straight")
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in straight_rows], abs=1e-6)
    a = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    b = load_file(out / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst < 1e-6, worst
    state = json.loads((out / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["data"]["epoch"] == 1
