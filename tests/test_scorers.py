"""Scorers on their device and dtype (relay.actors.scoring): dtype resolution per device and CPU, micro-batched
scoring equal to one batch, bf16 scoring close to fp32 with bf16 weights. Tiny models (tests/conftest.py), no
Ray: the actors wrap these cores (`ReferenceServer`, `RewardServer`); tests/test_ppo_e2e.py checks that the
settings reach the running reference actor."""
from __future__ import annotations

import pytest
import torch

from relay.actors.scoring import SCORER_DTYPES, resolve_scorer_dtype, row_slices

# ------------------------------------------------------------------------------------------ dtype resolution


@pytest.mark.parametrize("setting, device, native, want", [
    ("auto", "cpu", True, "float32"),  # bf16 on CPU only when asked for
    ("auto", "cpu", False, "float32"),
    ("auto", "cuda", True, "bfloat16"),
    ("auto", "cuda", False, "float16"),  # a GPU without bf16 (e.g. V100)
    ("float32", "cpu", False, "float32"),
    ("float32", "cuda", True, "float32"),
    ("bfloat16", "cpu", True, "bfloat16"),  # AVX512_BF16 / AMX
    ("bfloat16", "cuda", True, "bfloat16"),
    ("float16", "cuda", True, "float16"),
])
def test_dtype_resolution(setting, device, native, want):
    assert resolve_scorer_dtype(setting, device, native, "reference.dtype") == want


@pytest.mark.parametrize("setting, device, native, needle", [
    ("float16", "cpu", True, "reference.dtype=float16 runs only on a GPU"),
    ("bfloat16", "cpu", False, "reference.dtype=bfloat16: this cpu (x86_64 AVX2) has no native bf16"),
    ("bfloat16", "cuda", False, "use float16 or float32"),
    ("int8", "cpu", True, "reference.dtype='int8': expected one of auto, float32, bfloat16, float16"),
])
def test_dtype_that_cannot_run_there_names_the_field(setting, device, native, needle):
    with pytest.raises(ValueError) as err:
        resolve_scorer_dtype(setting, device, native, "reference.dtype", hardware="x86_64 AVX2")
    assert needle in str(err.value)


def test_config_choices_match_the_scorers():
    from typing import get_args

    from relay.config.ppo import ReferenceConfig, RewardConfig, ScorerDtype

    assert set(get_args(ScorerDtype)) == set(SCORER_DTYPES)
    assert ReferenceConfig().dtype == RewardConfig().dtype == "auto"


def test_emulated_bf16_cpu_stops_the_scorer_before_loading(monkeypatch, tiny_llama_dir):
    """RELAY_CPU_CAPABILITY=avx2 makes this CPU look like one without native bf16: the real startup path
    (torch_device + relay.cpu) refuses, naming the field; float16 on CPU likewise."""
    from relay.actors.rewards import ModelReward
    from relay.actors.scorers import ReferenceScorer

    monkeypatch.setenv("RELAY_CPU_CAPABILITY", "avx2")
    with pytest.raises(ValueError, match=r"reference.dtype=bfloat16: this cpu \(x86_64 AVX2.*no native bf16"):
        ReferenceScorer(str(tiny_llama_dir), "bfloat16")
    with pytest.raises(ValueError, match="reward.dtype=float16 runs only on a GPU"):
        ModelReward(str(tiny_llama_dir), dtype="float16")
    with pytest.raises(ValueError, match="reference.micro_batch_size must be >= 1"):
        ReferenceScorer(str(tiny_llama_dir), "float32", micro_batch_size=0)


def test_row_slices():
    assert row_slices(7, 3) == [slice(0, 3), slice(3, 6), slice(6, 7)]
    assert row_slices(0, 4) == [] and row_slices(2, 16) == [slice(0, 2)]


# ------------------------------------------------------------------------------------------ scoring


def _padded_batch(rows: int = 7, width: int = 20):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 1024, (rows, width), generator=g)
    mask = torch.ones_like(ids)
    for r, pad in enumerate([0, 4, 0, 9, 2, 0, 6][:rows]):  # left padding, as the rollout builds it
        mask[r, :pad] = 0
    return ids * mask, mask


def _reward_ids():
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 1024, (n,), generator=g).tolist() for n in (3, 1, 7, 5, 12)]
    responses = [torch.randint(3, 1024, (n,), generator=g).tolist() for n in (4, 9, 1, 6, 3)]
    return {"prompt_ids": prompts, "response_ids": responses}


@pytest.fixture(scope="module")
def reward_model_dir(tiny_llama_dir, tmp_path_factory):
    """A reward-model folder with a saved value head (a plain LM folder would get a fresh random head per load)."""
    from relay.models.heads import CriticModel

    out = tmp_path_factory.mktemp("rm")
    CriticModel.from_pretrained(tiny_llama_dir, seed=0).save_pretrained(out)
    return str(out)


def test_micro_batches_score_like_one_batch(tiny_llama_dir, reward_model_dir):
    """fp32: 3 rows per forward (7 rows: 3 + 3 + 1) gives one batch's scores to float rounding (per-row math is
    the same; only the matmul shapes differ)."""
    from relay.actors.rewards import ModelReward
    from relay.actors.scorers import ReferenceScorer

    ids, mask = _padded_batch()
    ref = ReferenceScorer(str(tiny_llama_dir), "float32", micro_batch_size=16)
    one = ref.logprobs(ids, mask, last=8)
    ref.micro_batch_size = 3
    parts = ref.logprobs(ids, mask, last=8)
    assert one.shape == parts.shape == (7, 8) and parts.dtype == torch.float32
    torch.testing.assert_close(parts, one, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref.logprobs(ids, mask)[:, -8:], one, rtol=1e-5, atol=1e-5)  # all columns too

    rm = ModelReward(reward_model_dir, batch_size=16, dtype="float32")
    info = _reward_ids()
    whole = rm.score([""] * 5, [""] * 5, **info)
    rm.batch_size = 2
    assert rm.score([""] * 5, [""] * 5, **info) == pytest.approx(whole, abs=1e-5)


@pytest.mark.skipif(not __import__("relay.cpu", fromlist=["bf16_is_fast"]).bf16_is_fast(),
                    reason="this CPU has no native bf16 (AVX512_BF16/AMX): bfloat16 scorers are refused here")
def test_bf16_scoring_is_close_to_fp32_with_bf16_weights(tiny_llama_dir, reward_model_dir):
    """bf16 keeps 8 significant bits (rounding 2^-9, about 0.2% of each stored value); through the tiny model's
    2 layers and a 1024-way log-softmax this moves logprobs near -7 by 1e-3 on average, 3e-3 at most (measured).
    The tolerances (0.05 per logprob, 0.01 mean; 0.01 per reward of size ~0.1, measured 7e-4) leave 10x margin
    and still fail for a wrong model, position or temperature (differences of 0.1 and more). Results must
    differ from fp32 at all, or bf16 did not really run."""
    from relay.actors.rewards import ModelReward
    from relay.actors.scorers import ReferenceScorer

    ids, mask = _padded_batch()
    fp32 = ReferenceScorer(str(tiny_llama_dir), "float32").logprobs(ids, mask, last=8)
    ref = ReferenceScorer(str(tiny_llama_dir), "bfloat16", micro_batch_size=4)
    assert {p.dtype for p in ref.model.parameters()} == {torch.bfloat16}
    assert (ref.precision.device, ref.precision.dtype) == ("cpu", "bfloat16")
    got = ref.logprobs(ids, mask, last=8)
    assert got.dtype == torch.float32 and got.device.type == "cpu"  # fp32 CPU results whatever the model's dtype
    diff = (got - fp32).abs()
    assert 0 < diff.max() < 0.05 and diff.mean() < 0.01, (diff.max(), diff.mean())

    info = _reward_ids()
    want = ModelReward(reward_model_dir, dtype="float32").score([""] * 5, [""] * 5, **info)
    rm = ModelReward(reward_model_dir, batch_size=2, dtype="bfloat16")
    assert {p.dtype for p in rm.model.parameters()} == {torch.bfloat16}
    got_r = rm.score([""] * 5, [""] * 5, **info)
    assert all(isinstance(v, float) for v in got_r) and got_r != want
    assert got_r == pytest.approx(want, abs=0.01)
