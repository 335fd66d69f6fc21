"""`relay sft|rm|dpo` driver: steps the learners skipped for a non-finite loss or gradient are counted, and the
run stops after `max_nonfinite_steps` in a row (not at the first one, and not after having stepped). The
learner group is a stand-in here; tests/test_learner_accumulation.py checks the skip on real learners."""
from __future__ import annotations

import json

import pytest

from relay.config import load_config
from relay.launch.prepare_cmd import PrepareOptions, prepare
from relay.launch.train import train


class SkippingGroup:
    """Answers train_step with a scripted sequence of skipped (NaN) and finite steps."""

    def __init__(self, skips: list[bool]):
        self.skips, self.calls = list(skips), 0

    def rebuild(self, **changes):
        return {}

    def set_lr(self, lr):
        pass

    def train_step(self, batch, loss, micro_batches=1, **kw):
        skip = self.skips[self.calls]
        self.calls += 1
        return {"loss": float("nan") if skip else 1.0, "nonfinite_skipped": float(skip), "step": self.calls}


def test_sft_skips_and_stops_after_the_limit(tmp_path, tiny_llama_dir):
    raw = tmp_path / "sft.jsonl"
    rows = [{"messages": [{"from": "human", "content": f"question {i}"}, {"from": "assistant", "content": f"answer {i}"}]}
            for i in range(8)]
    raw.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepare(PrepareOptions("sft", [str(raw)], str(tmp_path / "sft"), tokenizer=str(tiny_llama_dir), max_length=64,
                           progress=False))
    cfg = load_config("sft", None, [f"model.pretrain={tiny_llama_dir}", f"dataset={tmp_path / 'sft'}", "batch_size=2",
                                    "max_epochs=2", "max_nonfinite_steps=3", f"save_dir={tmp_path / 'run'}",
                                    "logging.use_tensorboard=false"])
    group = SkippingGroup([True, False, True, True, True, False, False, False])
    with pytest.raises(FloatingPointError, match=r"step 5 .*3 optimizer steps in a row .*max_nonfinite_steps=3"):
        train(cfg, "sft", group=group)
    assert group.calls == 5
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite_skipped"] for r in logged] == [1.0, 0.0, 1.0, 1.0, 1.0]
