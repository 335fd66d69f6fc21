"""`relay demo` presets and its targets table (pure logic; the demo itself runs in `make demo`)."""
import io

import pytest
from rich.console import Console

from relay.config import load_config
from relay.launch import demo


@pytest.mark.parametrize("name", [None, "quick", "learn"])
def test_every_demo_stage_config_validates_under_each_preset(name, tmp_path):
    preset = demo.load_preset(name) if name else {}
    overrides = demo.stage_overrides(tmp_path, tmp_path / "data", tmp_path / "model", preset)
    for stage in demo.STAGES:
        cfg = load_config(demo.PIPELINE[stage], demo.CONFIGS / f"demo_{stage}.yaml", overrides[stage])
        assert str(cfg.save_dir) == str(tmp_path / stage)
    args = demo.data_args(preset)
    assert args[args.index("--prompt-heldout") + 1] == str(preset.get("data", {}).get("prompt-heldout", 64))
    from relay.launch.eval_cmd import EvalSettings

    for key in ("eval", "eval_arithmetic"):  # the final eval's settings build (a preset may resize them)
        sizes = demo.eval_sizes(preset, key)
        s = EvalSettings(prompts="p", reference="r", baseline="sft", **sizes)
        assert s.num_prompts == preset.get(key, {}).get("num_prompts", demo.EVAL_SIZES[key]["num_prompts"])


def test_learn_preset_is_longer_and_measures_ppo_on_enough_prompts():
    learn = demo.load_preset("learn")
    default = load_config("ppo", demo.CONFIGS / "demo_ppo.yaml")
    longer = load_config("ppo", demo.CONFIGS / "demo_ppo.yaml", learn["ppo"])
    assert longer.algo.num_episodes > default.algo.num_episodes
    assert learn["eval"]["num_prompts"] >= 64  # the PPO target's own condition
    grpo = load_config("ppo", demo.CONFIGS / "demo_grpo.yaml", learn["grpo"])
    assert grpo.eval.num_prompts >= 64 and grpo.eval_interval > 0  # GRPO's target comes from its stage's evals


def test_targets_take_relay_eval_first_then_the_stage_last_eval():
    console = Console(file=io.StringIO(), width=200)
    results = {"ppo": {"effect_sd": 1.2}, "rm": {}}
    last = {"rm": {"eval/acc": 0.85}, "dpo": {"eval/rewards/accuracy": 0.6}, "ppo": {"eval/effect_sd": 0.1},
            "grpo": {}}
    met = demo.check_targets(results, last, console)
    text = console.file.getvalue()
    assert met == 2  # rm 0.85 >= 0.8 from its stage, ppo 1.2 from relay eval (not the stage's 0.1); dpo 0.6 < 0.7
    assert "rm stage's last eval" in text and "relay eval" in text and "GRPO" not in text
