"""Typed configs: presets load, overrides coerce, bad values are rejected naming the field. No Ray."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from relay.config import (
    PIPELINES,
    ConfigError,
    PPOConfig,
    SFTConfig,
    apply_overrides,
    field_reference,
    load_config,
    ppo_buffer_size,
    save_config,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("preset", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_presets_load_and_validate(preset):
    from relay.launch.demo import PIPELINE

    parts = preset.stem.split("_")
    pipeline = PIPELINE[parts[1]] if parts[0] == "demo" else parts[0]
    cfg = load_config(pipeline, preset)
    assert isinstance(cfg, PIPELINES[pipeline])


def test_overrides_are_coerced_to_field_types():
    cfg = load_config(
        "sft",
        overrides=["learner.plugin=zero2", "learner.num_ranks=2", "optim.lr=3e-4", "lora.lora_rank=8",
                   "dataset=a", "learner.grad_checkpoint=true", "lora.lora_target_modules=[q_proj, v_proj]"],
    )
    assert cfg.learner.plugin == "zero2" and cfg.learner.num_ranks == 2
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.lora.lora_rank == 8 and cfg.dataset == ["a"] and cfg.learner.grad_checkpoint is True
    assert cfg.lora.lora_target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    "override, field",
    [
        ("learner.plugin=zero3", "learner.plugin"),
        ("learner.num_ranks=abc", "learner.num_ranks"),
        ("learner.num_ranks=0", "learner.num_ranks"),
        ("optim.lr=-1", "optim.lr"),
        ("batch_size=0", "batch_size"),
        ("learner.mixed_precision=fp8", "learner.mixed_precision"),
        ("learner.grad_checkpoint=maybe", "learner.grad_checkpoint"),
        ("learner.plugni=ddp", "learner.plugni"),
    ],
)
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_config("sft", overrides=[override])
    assert field in str(err.value)


def test_misspelled_field_suggests_the_right_one():
    with pytest.raises(ConfigError, match="did you mean 'plugin'"):
        load_config("sft", overrides=["learner.plugni=ddp"])


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["learner.plugin=gemini"], "CUDA"),
        (["learner.plugin=3d", "learner.pp=2", "learner.num_ranks=2"], "transformers"),
        (["learner.plugin=3d", "learner.sp=2", "learner.num_ranks=2"], "transformers"),
        (["learner.plugin=ddp", "learner.tp=2", "learner.num_ranks=2"], "3d"),
        (["learner.plugin=3d", "learner.tp=2", "learner.num_ranks=3"], "divisible"),
    ],
)
def test_unsupported_plugin_choices_fail_at_validation(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config("sft", overrides=overrides)
    assert needle in str(err.value) and "learner." in str(err.value)


def test_ppo_buffer_identity_is_checked():
    cfg = load_config("ppo", CONFIGS / "ppo_tiny.yaml")
    assert ppo_buffer_size(cfg) == 8
    with pytest.raises(ConfigError, match="buffer-size identity"):
        load_config("ppo", CONFIGS / "ppo_tiny.yaml", ["algo.train_batch_size=8"])
    # 4 prompts x 2 samples = 8 = 8 x 1 accumulation x 1 dp group
    ok = load_config("ppo", CONFIGS / "ppo_tiny.yaml", [
        "algo.experience_batch_size=4", "generation.n_samples_per_prompt=2",
        "algo.train_batch_size=8", "algo.accumulation_steps=1"])
    assert ppo_buffer_size(ok) == 8


def test_grpo_needs_groups():
    with pytest.raises(ConfigError, match="n_samples_per_prompt"):
        load_config("ppo", CONFIGS / "ppo_tiny.yaml", ["algo.advantage_estimator=grpo"])


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config("dpo", overrides=["beta=0.2", "loss_type=ipo"])
    path = save_config(cfg, tmp_path / "c.yaml")
    again = load_config("dpo", path)
    assert again == cfg


def test_every_field_is_documented():
    for cls in PIPELINES.values():
        for name, _, _, help_text in field_reference(cls):
            assert help_text.strip(), f"{cls.__name__}.{name} has no documentation"


def test_apply_overrides_rejects_malformed():
    with pytest.raises(ConfigError, match="FIELD=VALUE"):
        apply_overrides({}, ["learner.plugin"])


def test_defaults_are_valid():
    from relay.config import validate

    validate(SFTConfig())
    validate(PPOConfig())


def _relay(*args):
    return subprocess.run([sys.executable, "-m", "relay.launch.cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_help_lists_fields():
    out = _relay("ppo", "--help")
    assert out.returncode == 0, out.stderr
    assert "actor_learner.plugin" in out.stdout and "algo.kl_coef" in out.stdout
    assert _relay("--help").returncode == 0


def test_cli_rejects_bad_field_fast():
    out = _relay("ppo", "--config", str(CONFIGS / "ppo_tiny.yaml"), "--set", "actor_learner.tp=abc")
    assert out.returncode == 2
    assert "actor_learner.tp" in out.stderr


def test_config_reference_is_up_to_date():
    from relay.launch.config_docs import DOC_PATH, render

    assert DOC_PATH.read_text() == render(), "docs/CONFIG.md is stale: run python -m relay.launch.config_docs"


def test_cli_prints_the_resolved_config():
    import yaml

    out = _relay("ppo", "--config", str(CONFIGS / "ppo_tiny.yaml"), "--print-config", "--set", "algo.kl_coef=0.3")
    assert out.returncode == 0, out.stderr
    printed = yaml.safe_load(out.stdout)
    assert printed["algo"]["kl_coef"] == 0.3 and printed["actor_learner"]["tp"] == 2


def test_async_staleness_must_cover_the_update_steps():
    with pytest.raises(ConfigError, match="algo.max_staleness"):
        load_config("ppo", CONFIGS / "ppo_tiny_grpo.yaml", ["algo.mode=async", "algo.max_staleness=1"])
    assert load_config("ppo", CONFIGS / "ppo_tiny_grpo.yaml", ["algo.mode=async", "algo.max_staleness=2"])


def test_old_logprobs_source_and_reference_need():
    from relay.config import needs_reference, old_logprobs_source

    cfg = load_config("ppo", CONFIGS / "ppo_tiny.yaml")
    assert old_logprobs_source(cfg) == "generator" and needs_reference(cfg)  # sync, fp32 generator and learner
    bf16 = load_config("ppo", CONFIGS / "ppo_tiny.yaml", ["generation.dtype=bfloat16"])
    assert old_logprobs_source(bf16) == "loss"  # one optimizer step per episode: the loss's own forward
    two_steps = load_config("ppo", CONFIGS / "ppo_tiny.yaml", ["generation.dtype=bfloat16", "algo.num_update_steps=2"])
    assert old_logprobs_source(two_steps) == "learner"
    asyn = load_config("ppo", CONFIGS / "ppo_tiny.yaml", ["algo.mode=async"])
    assert old_logprobs_source(asyn) == "loss"
    forced = load_config("ppo", CONFIGS / "ppo_tiny.yaml", ["algo.old_logprobs=learner"])
    assert old_logprobs_source(forced) == "learner"
    assert not needs_reference(load_config("ppo", CONFIGS / "ppo_tiny.yaml", ["algo.kl_coef=0"]))
    with pytest.raises(ConfigError, match="algo.old_logprobs"):
        load_config("ppo", CONFIGS / "ppo_tiny.yaml", ["algo.mode=async", "algo.old_logprobs=generator"])
    with pytest.raises(ConfigError, match="algo.old_logprobs: 'loss' needs algo.num_update_steps 1 \\(got 2\\)"):
        load_config("ppo", CONFIGS / "ppo_tiny.yaml", ["algo.old_logprobs=loss", "algo.num_update_steps=2"])
    assert old_logprobs_source(load_config("ppo", CONFIGS / "ppo_tiny.yaml", ["algo.old_logprobs=loss"])) == "loss"


def test_k1_kl_as_a_loss_term_is_rejected():
    """k1's expected gradient is zero: as a loss term (kl_in_reward false) the penalty would not act."""
    with pytest.raises(ConfigError, match=r"algo.kl_estimator: k1 as a loss term .* use k3 .* or k2"):
        load_config("ppo", CONFIGS / "ppo_tiny.yaml", ["algo.kl_in_reward=false", "algo.kl_estimator=k1"])
    for ok in (["algo.kl_in_reward=false", "algo.kl_estimator=k3"], ["algo.kl_in_reward=false", "algo.kl_estimator=k2"],
               ["algo.kl_in_reward=true", "algo.kl_estimator=k1"], ["algo.kl_in_reward=false", "algo.kl_coef=0"]):
        load_config("ppo", CONFIGS / "ppo_tiny.yaml", ok)


def test_temperature_makes_old_logprobs_the_learners():
    """The generators report raw-logit logprobs: with T != 1 'auto' does not use them (the learner's or the
    loss's forward instead), 'generator' and async mode (its importance weights) are rejected."""
    from relay.config import learner_temperature, old_logprobs_source

    hot = load_config("ppo", CONFIGS / "ppo_tiny.yaml", ["generation.temperature=0.7", "algo.num_update_steps=2"])
    assert learner_temperature(hot) == 0.7 and old_logprobs_source(hot) == "learner"
    greedy = load_config("ppo", CONFIGS / "ppo_tiny.yaml", ["generation.temperature=0"])
    assert learner_temperature(greedy) == 1.0 and old_logprobs_source(greedy) == "generator"
    with pytest.raises(ConfigError, match="algo.old_logprobs: 'generator' needs generation.temperature 1"):
        load_config("ppo", CONFIGS / "ppo_tiny.yaml", ["generation.temperature=0.7", "algo.old_logprobs=generator"])
    with pytest.raises(ConfigError, match="algo.mode: async needs generation.temperature 1"):
        load_config("ppo", CONFIGS / "ppo_tiny_grpo.yaml", ["generation.temperature=0.7", "algo.mode=async",
                                                            "algo.max_staleness=2"])


def test_nonfinite_limit_and_template_file_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="algo.max_nonfinite_steps: must be >= 1"):
        load_config("ppo", CONFIGS / "ppo_tiny.yaml", ["algo.max_nonfinite_steps=0"])
    with pytest.raises(ConfigError, match="max_nonfinite_steps: must be >= 1"):
        load_config("sft", overrides=["max_nonfinite_steps=0"])
    with pytest.raises(ConfigError, match="conversation_template_config: .* is not a file"):
        load_config("ppo", CONFIGS / "ppo_tiny.yaml", [f"conversation_template_config={tmp_path / 'none.json'}"])


def test_scorer_dtype_and_micro_batch_are_checked():
    """reference/reward dtype and micro_batch_size: choices and range by field, float16 only with a GPU."""
    tiny = CONFIGS / "ppo_tiny.yaml"
    for bad, needle in [("reference.dtype=fp8", "reference.dtype"), ("reward.micro_batch_size=0", "reward.micro_batch_size"),
                        ("reference.micro_batch_size=0", "reference.micro_batch_size: must be >= 1")]:
        with pytest.raises(ConfigError, match=needle):
            load_config("ppo", tiny, [bad])
    with pytest.raises(ConfigError, match="reward.dtype: float16 runs only on a GPU, and reward.num_gpus is 0"):
        load_config("ppo", tiny, ["reward.dtype=float16"])
    cfg = load_config("ppo", tiny, ["reference.dtype=bfloat16", "reference.micro_batch_size=4",
                                    "reward.dtype=float16", "reward.num_gpus=1"])
    assert (cfg.reference.dtype, cfg.reference.micro_batch_size, cfg.reward.dtype) == ("bfloat16", 4, "float16")


def test_cli_config_error_is_one_line_naming_field_and_origin():
    out = _relay("sft", "--set", "seed=nan", "--print-config")
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert lines[0] == "relay sft: invalid config: seed: must be a finite number, got nan (from --set seed=nan)"
