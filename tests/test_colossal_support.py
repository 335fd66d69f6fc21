"""Plugin support rules (pure: no Ray, no ColossalAI process group)."""
from __future__ import annotations

import pytest

from relay.config.plugin_rules import check_plugin_support
from relay.learners.plugins import make_plugin


def errors(**kw):
    base = dict(plugin="ddp", tp=1, pp=1, sp=1, zero_stage=0, precision="fp32", lora_rank=0, device="cpu")
    base.update(kw)
    return check_plugin_support(**base)


@pytest.mark.parametrize(
    "kw",
    [
        dict(plugin="ddp"),
        dict(plugin="zero2", precision="bf16"),
        dict(plugin="zero2_cpu"),
        dict(plugin="zero2", lora_rank=8),
        dict(plugin="ddp", lora_rank=8),
        dict(plugin="3d", tp=2, num_ranks=4),
        dict(plugin="3d", tp=2, zero_stage=1, precision="bf16"),
        dict(plugin="3d", tp=1, zero_stage=2, precision="bf16"),
        dict(plugin="gemini", precision="bf16", device="cuda"),
        dict(plugin="gemini_auto", precision="fp16", device="cuda"),
        dict(plugin="zero2", precision="fp16", device="cuda"),
    ],
)
def test_supported(kw):
    assert errors(**kw) == []


@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(plugin="fsdp"), "unknown"),
        (dict(plugin="gemini", precision="bf16"), "CUDA memory chunks"),
        (dict(plugin="gemini_auto", precision="bf16"), "use 'zero2_cpu'"),
        (dict(plugin="gemini", device="cuda"), "rejects fp32"),
        (dict(plugin="gemini", precision="bf16", device="cuda", lora_rank=8), "does not support LoRA"),
        (dict(plugin="3d", tp=2, pp=2), "transformers 4.51"),
        (dict(plugin="3d", sp=2), "sequence parallelism"),
        (dict(plugin="zero2", tp=2), "needs plugin '3d'"),
        (dict(plugin="ddp", tp=2), "needs plugin '3d'"),
        (dict(plugin="3d", tp=2, zero_stage=1), "needs precision bf16 or fp16"),
        (dict(plugin="3d", tp=2, lora_rank=8), "enable_lora"),
        (dict(plugin="3d", tp=2, num_ranks=3), "divisible by tp=2"),
        (dict(plugin="ddp", precision="bf16"), "use plugin 'zero2'"),
        (dict(plugin="zero2", precision="fp16"), "not supported on CPU"),
        (dict(plugin="3d", zero_stage=3, precision="bf16"), "zero_stage=3"),
        (dict(precision="int8"), "precision 'int8'"),
        (dict(device="tpu"), "device 'tpu'"),
        (dict(tp=0), "tp=0"),
        (dict(lora_rank=-1), "lora_rank=-1"),
    ],
)
def test_rejected(kw, needle):
    errs = errors(**kw)
    assert errs and any(needle in e for e in errs), errs


def test_all_reasons_reported():
    errs = errors(plugin="3d", tp=2, pp=2, sp=2, zero_stage=1, lora_rank=4)
    assert len(errs) == 4  # pp, sp, zero+fp32, lora+tp


@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(plugin="gemini", precision="bf16"), "Gemini is designed around CUDA memory chunks"),
        (dict(plugin="gemini_auto", precision="bf16"), "Gemini is designed around CUDA memory chunks"),
        (dict(plugin="3d", tp=1, pp=2), "pipeline parallelism is not supported"),
        (dict(plugin="3d", tp=1, sp=2), "sequence parallelism is not supported"),
    ],
)
def test_make_plugin_rejects_before_building(kw, needle):
    # Raised before ColossalAI or torch.distributed is touched, so no process group is needed.
    with pytest.raises(ValueError, match=needle):
        make_plugin(device="cpu", **kw)


def test_learner_group_rejects_before_any_actor(tmp_path):
    from relay.learners.group import LearnerGroup

    # No Ray session: create() must refuse before starting anything.
    with pytest.raises(ValueError, match="CUDA memory chunks"):
        LearnerGroup.create(2, tmp_path, plugin="gemini", precision="bf16")
    with pytest.raises(ValueError, match="pipeline parallelism"):
        LearnerGroup.create(2, tmp_path, plugin="3d", tp=1, pp=2)
