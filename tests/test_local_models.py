"""Hub ids are refused: every model or tokenizer setting must be a local folder or a bundled name, and a hub id
gives one line naming the setting, before transformers (which would reach for the network) is called; and
`trust_remote_code` is off unless a config turns it on. No Ray: the PPO check runs before Ray would start."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from relay.data.tokenizers import load_tokenizer
from relay.models.local import NotLocalError, local_folder
from relay.models.smollm2 import resolve_model_path

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
RELAY = Path(__file__).resolve().parents[1] / "relay"


@pytest.fixture
def no_hub(monkeypatch):
    """transformers' loaders fail the test if reached (that is where a hub id would go to the network)."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError(f"from_pretrained reached with {args!r}")

    for cls in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM, transformers.AutoConfig):
        monkeypatch.setattr(cls, "from_pretrained", refuse)


def test_local_folder(tmp_path):
    assert local_folder(tmp_path, "x") == str(tmp_path)
    with pytest.raises(NotLocalError) as info:
        local_folder(HUB_ID, "actor.pretrain")
    msg = str(info.value)
    assert msg.startswith(f"actor.pretrain: '{HUB_ID}' looks like a hub id") and "\n" not in msg
    assert "local folders only" in msg and "relay models prepare smollm2" in msg
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(NotLocalError, match=r"'\./nope' is not a local folder"):
        local_folder("./nope", "model.pretrain")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(NotLocalError):  # a file is not a model folder
        local_folder(tmp_path / "file.txt", "model.pretrain")


def test_resolve_model_path_names_the_setting(no_hub):
    with pytest.raises(NotLocalError, match=r"^critic.pretrain: .*hub id.*smollm2, tiny-llama, tiny-qwen2"):
        resolve_model_path(HUB_ID, "critic.pretrain")


def test_load_tokenizer_refuses_hub_ids(no_hub):
    with pytest.raises(NotLocalError, match=r"^--tokenizer: .*hub id.*smollm2, tiny, gpt2"):
        load_tokenizer(HUB_ID, "--tokenizer")
    with pytest.raises(NotLocalError, match=r"^tokenizer: 'gpt2-large' is not a local folder"):
        load_tokenizer("gpt2-large")


def test_relay_prepare_tokenizer_hub_id_is_one_line(tmp_path, capsys, no_hub):
    from relay.launch.cli import main

    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": "hello"}]}) + "\n")
    out = tmp_path / "out"
    code = main(["prepare", "sft", "-i", str(data), "-o", str(out), "--tokenizer", HUB_ID])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1, err
    assert err[0].startswith(f"relay prepare: error: --tokenizer: '{HUB_ID}' looks like a hub id")
    assert "never downloaded from a hub" in err[0]
    assert "Traceback" not in err[0] and not out.exists()  # refused before OUT was made


def test_ppo_refuses_a_hub_tokenizer_before_ray(tmp_path, monkeypatch, tiny_llama_dir, no_hub):
    from relay.config import load_config
    from relay.launch import cluster
    from relay.launch.ppo import PPOSystem

    monkeypatch.setattr(cluster, "init_ray", lambda *a, **k: pytest.fail("Ray started before the check"))
    configs = RELAY.parent / "configs"
    cfg = load_config("ppo", configs / "ppo_tiny.yaml", [f"save_dir={tmp_path / 'run'}",
                                                         f"actor.pretrain={tiny_llama_dir}",
                                                         f"actor.tokenizer_dir={HUB_ID}"])
    with pytest.raises(NotLocalError, match=r"^actor.tokenizer_dir: .*hub id"):
        PPOSystem(cfg).start()
    cfg.actor.tokenizer_dir = None
    cfg.critic.pretrain = HUB_ID
    cfg.algo.advantage_estimator = "gae"
    with pytest.raises(NotLocalError, match=r"^critic.pretrain: .*hub id"):
        PPOSystem(cfg).start()


def test_trust_remote_code_is_off_unless_configured():
    from relay.actors.generator import GeneratorConfig
    from relay.config import ModelConfig

    assert ModelConfig().trust_remote_code is False and GeneratorConfig(model="m").trust_remote_code is False
    # no call in relay/ turns it on by itself: every trust_remote_code= argument is a config value, never True
    hard_on = []
    for path in RELAY.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
                if isinstance(node.value, ast.Constant) and node.value.value is not False:
                    hard_on.append(f"{path.relative_to(RELAY)}:{node.value.lineno}")
    assert hard_on == []
