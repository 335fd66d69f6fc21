"""Every field of every config rejects bad values, generated from the type and range the field declares; every
numeric field declares a range. No Ray."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from relay.config import PIPELINES, ConfigError, PPOConfig, load_config, validate
from relay.config.fields import FieldKind, field_kinds, is_group, paths_overlap

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# Numeric fields whose only range is "finite": any reward can be a pass threshold.
UNBOUNDED = {"eval.pass_threshold"}


def leaves(cls: type, prefix: str = "") -> Iterator[tuple[str, FieldKind]]:
    for name, (_, kind) in field_kinds(cls).items():
        path = f"{prefix}.{name}" if prefix else name
        if is_group(kind):
            yield from leaves(kind.base, path)
        else:
            yield path, kind


def _outside(kind: FieldKind) -> list[Any]:
    """Values just outside a numeric field's declared bounds."""
    b = kind.range.bounds() if kind.range else {}
    step = 1 if kind.base is int else 0.5
    out = []
    if "gt" in b:
        out.append(b["gt"])
    if "ge" in b:
        out.append(b["ge"] - step)
    if "lt" in b:
        out.append(b["lt"])
    if "le" in b:
        out.append(b["le"] + step)
    return [kind.base(v) for v in out]


def bad_values(kind: FieldKind) -> list[Any]:
    """Values the field must reject: out of range, non-finite, or of the wrong type."""
    wrong_type: list[Any] = [{"a": 1}]
    if kind.numeric:
        out = [math.nan, math.inf, -math.inf, "nan", "abc", True, [1], *_outside(kind)]
        return out + ([2.5] if kind.base is int else [])
    if kind.choices:
        return [f"not-{kind.choices[0]}", [kind.choices[0]], *wrong_type]
    if kind.base is bool:
        return ["maybe", 2, [True], *wrong_type]
    if kind.base is str:
        return [[], *wrong_type]
    if kind.base is dict:  # custom resources: numeric values >= 0, no names Ray reserves
        return [{"a": v} for v in bad_values(kind.item)[:3] + _outside(kind.item)] + [{"CPU": 1}, {"GPU": 1}, "abc", [1]]
    if kind.item is not None and kind.item.numeric:
        item_ok = kind.item.range.bounds().get("ge", 0) if kind.item.range else 0
        n = kind.length[0] if kind.length else 1
        bad_items = [[v] + [item_ok] * (n - 1) for v in bad_values(kind.item)[:3] + _outside(kind.item)]
        return bad_items + ([[item_ok] * (n + 1)] if kind.length else []) + ["abc", *wrong_type]
    if kind.item is not None:
        return [[{"a": 1}], *wrong_type]
    raise AssertionError(f"no bad values for {kind}: add a case")


def _nested(path: str, value: Any) -> dict[str, Any]:
    data: dict[str, Any] = {}
    node = data
    *groups, last = path.split(".")
    for part in groups:
        node = node.setdefault(part, {})
    node[last] = value
    return data


CASES = [(pipeline, path, kind) for pipeline, cls in PIPELINES.items() for path, kind in leaves(cls)]


@pytest.mark.parametrize("pipeline, path, kind", CASES, ids=[f"{p}-{f}" for p, f, _ in CASES])
def test_field_rejects_bad_values_naming_field_and_file(pipeline, path, kind, tmp_path):
    values = bad_values(kind) + ([] if kind.optional else [None])
    for i, value in enumerate(values):
        preset = tmp_path / f"bad{i}.yaml"
        preset.write_text(yaml.safe_dump(_nested(path, value)))
        with pytest.raises(ConfigError) as err:
            load_config(pipeline, preset)
        problems = err.value.problems
        assert problems and all(paths_overlap(p, path) for p, _ in problems), (value, str(err.value))
        assert path in str(err.value) and str(preset) in str(err.value), (value, str(err.value))


@pytest.mark.parametrize("pipeline", sorted(PIPELINES))
def test_every_numeric_field_declares_a_range(pipeline):
    for path, kind in leaves(PIPELINES[pipeline]):
        numeric = kind if kind.numeric else kind.item if kind.item and kind.item.numeric else None
        if numeric is None:
            continue
        assert numeric.range is not None, f"{path}: declare its range, e.g. Annotated[int, Range(ge=1)]"
        assert numeric.range.bounds() or path in UNBOUNDED, f"{path}: no bounds declared (finite only)"


@pytest.mark.parametrize("pipeline", sorted(PIPELINES))
def test_defaults_lie_inside_the_declared_ranges(pipeline):
    validate(PIPELINES[pipeline]())


def test_a_config_built_in_code_is_checked_too():
    cfg = PPOConfig()
    cfg.actor_optim = dataclasses.replace(cfg.actor_optim, lr=math.nan)
    with pytest.raises(ConfigError, match="actor_optim.lr: must be a finite number"):
        validate(cfg)


@pytest.mark.parametrize("overrides, field", [
    (["optim.lr=nan"], "optim.lr"),
    (["seed=nan"], "seed"),
    (["seed=.inf"], "seed"),
    (["max_length=nan"], "max_length"),
    (["learner.num_ranks=true"], "learner.num_ranks"),
])
def test_issue_values_for_training_stages(overrides, field):
    with pytest.raises(ConfigError, match=f"{field}: .*from --set"):
        load_config("sft", overrides=overrides)


@pytest.mark.parametrize("overrides, field", [
    (["generation.temperature=0", "generation.n_samples_per_prompt=2", "algo.experience_batch_size=4"],
     "generation.temperature"),
    (["algo.target_kl=0"], "algo.target_kl"),
    (["buffer_limit=-3"], "buffer_limit"),
    (["buffer_limit=3"], "buffer_limit"),  # smaller than one episode (8 experiences)
    (["generation.max_prompt_length=0"], "generation.max_prompt_length"),
    (["algo.tis_cap=-1"], "algo.tis_cap"),
    (["cluster.timeout_s=0"], "cluster.timeout_s"),
    (["reward.timeout_s=0"], "reward.timeout_s"),
    (["reward.retries=-1"], "reward.retries"),
    (["algo.ptx_batch_size=0"], "algo.ptx_batch_size"),
    (["algo.num_episodes=nan"], "algo.num_episodes"),
    (["generation.top_p=0"], "generation.top_p"),
    (["algo.lam=1.5"], "algo.lam"),
    (["reward.kind=http", "reward.url=http://127.0.0.1:1/r", "reward.max_outage_s=900", "cluster.timeout_s=600"],
     "reward.max_outage_s"),  # the driver would time out before the outage limit
    (["reward.max_response_bytes=0"], "reward.max_response_bytes"),
])
def test_issue_values_for_ppo(overrides, field):
    with pytest.raises(ConfigError) as err:
        load_config("ppo", CONFIGS / "ppo_tiny.yaml", overrides)
    assert f"{field}: " in str(err.value) and "ppo_tiny.yaml" in str(err.value)


def test_greedy_single_sample_and_numeric_text_stay_valid():
    cfg = load_config("ppo", CONFIGS / "ppo_tiny.yaml", ["generation.temperature=0", "buffer_limit=16"])
    assert cfg.generation.temperature == 0.0 and cfg.buffer_limit == 16
    sft = load_config("sft", overrides=["optim.lr=3e-4", "max_steps=1e3", "learner.num_cpus_per_rank=2"])
    assert sft.max_steps == 1000 and isinstance(sft.max_steps, int) and sft.learner.num_cpus_per_rank == 2.0
