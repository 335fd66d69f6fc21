"""Reward sources: Python rules (per sample, batched, built-ins, errors), the model hook, and the relay/reward
Ray actor. The HTTP source has its own file, tests/test_reward_http.py."""
from __future__ import annotations

import pytest

from relay.actors.rewards import (
    HttpReward,
    RewardError,
    RewardSpec,
    RuleReward,
    contains_text,
    ends_with_eos,
    length_penalty,
    make_reward_source,
)

PROMPTS = ["hi", "tell me", "why"]
RESPONSES = ["hello<|im_end|>", "a story", "because!"]


# ------------------------------------------------------------------------------------------ rules


def test_rule_per_sample_gets_only_the_info_it_names():
    assert RuleReward("sample_rules:text_length").score(PROMPTS, RESPONSES) == [15.0, 7.0, 8.0]
    rule = RuleReward("sample_rules:with_ids")
    got = rule.score(PROMPTS, RESPONSES, response_ids=[[1, 2], [3], []], finish_reasons=["stop", "length", "stop"],
                     eos_token_ids=[2])
    assert got == [102.0, 1.0, 100.0]
    everything = RuleReward("sample_rules:sees_everything").score(
        PROMPTS[:1], RESPONSES[:1], prompt_ids=[[1]], response_ids=[[2]], finish_reasons=["stop"], eos_token_ids=[2])
    assert everything == [4.0]  # **info receives prompt_ids, response_ids, finish_reason, eos_token_ids


def test_batched_rule_and_callable():
    assert RuleReward("sample_rules:rank_in_batch").score(PROMPTS, RESPONSES) == [2.0, 0.0, 1.0]
    assert RuleReward(lambda p, r: 0.5).score(["a"], ["b"]) == [0.5]
    with pytest.raises(RewardError, match="must return 3 numbers"):
        RuleReward("sample_rules:wrong_count").score(PROMPTS, RESPONSES)


@pytest.mark.parametrize("spec, message", [
    ("no_colon", "expected 'module:function'"),
    ("a:b:c", "expected 'module:function'"),
    ("relay.no_such_module:fn", "cannot import module 'relay.no_such_module'"),
    ("sample_rules:missing", "has no attribute 'missing'"),
    ("sample_rules:not_a_function", "is a int, not a function"),
])
def test_rule_import_errors_are_clear(spec, message):
    with pytest.raises(RewardError, match=message):
        RuleReward(spec)


@pytest.mark.parametrize("name, message", [
    ("returns_text", r"returned 'good' \(str\); a reward must be a number"),
    ("returns_none", "returned None"),
    ("returns_nan", "must be finite"),
    ("raises", "raised KeyError on sample 0"),
])
def test_rule_bad_results_are_clear(name, message):
    with pytest.raises(RewardError, match=message):
        RuleReward(f"sample_rules:{name}").score(PROMPTS, RESPONSES)


def test_builtin_rules():
    rule = RuleReward("relay.actors.rewards:ends_with_eos")  # what configs/ppo_tiny.yaml names
    assert rule.score(PROMPTS, RESPONSES) == [1.0, 0.0, 0.0]  # text fallback: EOS marker at the end
    ids = [[5, 9], [5, 2], []]
    assert rule.score(PROMPTS, RESPONSES, response_ids=ids, eos_token_ids=[2]) == [0.0, 1.0, 0.0]  # ids win
    assert ends_with_eos("p", "x</s>  ") == 1.0
    assert length_penalty("p", "a b c") == pytest.approx(-0.03)
    assert RuleReward("relay.actors.rewards:length_penalty").score(["p"], ["x"], response_ids=[[1] * 10]) == [-0.1]
    assert RuleReward("relay.actors.rewards:contains_text", kwargs={"text": "story"}).score(
        PROMPTS, RESPONSES) == [0.0, 1.0, 0.0]
    assert contains_text("p", "wow!") == 1.0
    frac = RuleReward("relay.actors.rewards:token_fraction", kwargs={"token_id": 7})
    assert frac.score(["p", "q"], ["", ""], response_ids=[[7, 1, 7, 7], []]) == [0.75, 0.0]
    with pytest.raises(RewardError, match="needs token_id"):
        RuleReward("relay.actors.rewards:token_fraction").score(["p"], ["r"], response_ids=[[1]])


def test_score_checks_lengths_and_info_keys():
    rule = RuleReward("sample_rules:text_length")
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        rule.score(["a", "b"], ["c"])
    with pytest.raises(ValueError, match="response_ids has 1 entries for 2 samples"):
        rule.score(["a", "b"], ["c", "d"], response_ids=[[1]])
    with pytest.raises(ValueError, match="unknown info keys"):
        rule.score(["a"], ["c"], extra=[1])


def test_make_reward_source_from_config():
    from relay.config import RewardConfig

    src = make_reward_source(RewardConfig(kind="rule", rule="relay.actors.rewards:ends_with_eos"))
    assert isinstance(src, RuleReward)
    assert isinstance(make_reward_source({"kind": "http", "url": "http://127.0.0.1:9/x"}), HttpReward)
    for bad, msg in [(RewardSpec(kind="rule"), "needs reward.rule"), (RewardSpec(kind="http"), "needs reward.url"),
                     (RewardSpec(kind="model"), "needs reward.model"), (RewardSpec(kind="vibes"), "must be model")]:
        with pytest.raises(ValueError, match=msg):
            make_reward_source(bad)


# ------------------------------------------------------------------------------------------ model hook


def test_model_reward_scores_last_token(tiny_llama_dir):
    heads = pytest.importorskip("relay.models.heads")
    if not hasattr(heads, "CriticModel"):
        pytest.skip("relay.models.heads has no CriticModel yet")
    from relay.actors.rewards import ModelReward

    rm = ModelReward(str(tiny_llama_dir), batch_size=2)
    ids = dict(prompt_ids=[[5, 6, 7], [8], [9, 10]], response_ids=[[11, 12], [13, 14, 15, 16], [17]])
    got = rm.score(["", "", ""], ["", "", ""], **ids)
    one = rm.score([""], [""], prompt_ids=ids["prompt_ids"][1:2], response_ids=ids["response_ids"][1:2])
    assert len(got) == 3 and got[1] == pytest.approx(one[0], abs=1e-5)  # padding does not change a score
    assert rm.score(["hello"], [" world"]) == rm.score(["hello"], [" world"])  # text path tokenizes
    # a bundled name resolves as everywhere else (reward.model=tiny-llama, smollm2), no hub lookup
    assert ModelReward("tiny-llama", batch_size=2).folder == str(tiny_llama_dir)


# ------------------------------------------------------------------------------------------ actor


def test_reward_actor_rule_and_ids(ray_session, tiny_llama_dir):
    from relay.actors.rewards import start_reward_actor
    from relay.config import RewardConfig
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    client = start_reward_actor(RewardConfig(kind="rule", rule="relay.actors.rewards:ends_with_eos"),
                                tokenizer=str(tiny_llama_dir), name="reward-test", num_cpus=0.1)
    try:
        assert ray_session.get_actor("relay/reward-test", namespace="relay") is not None
        assert client.score(PROMPTS, RESPONSES) == [1.0, 0.0, 0.0]
        eos = tok.eos_token_id
        got = client.score_ids([[5, 6], [7]], [[8, eos], [9, 10]], finish_reasons=["stop", "length"])
        assert got == [1.0, 0.0]
        assert client.stats()["samples"] == 5
    finally:
        client.kill()


def test_reward_actor_bad_rule_fails_at_start(ray_session):
    from relay.actors.rewards import start_reward_actor

    with pytest.raises(Exception, match="cannot import module"):
        start_reward_actor({"kind": "rule", "rule": "relay.nope:fn"}, name="reward-bad", num_cpus=0.1, timeout_s=60)


def test_reward_actor_unloadable_tokenizer_fails_at_start(ray_session, tmp_path):
    """The tokenizer that decodes ids loads while the actor starts (with the run's other actors), so a folder
    without one fails there rather than at the first episode's scoring."""
    from relay.actors.rewards import start_reward_actor

    with pytest.raises(Exception, match=str(tmp_path)):
        start_reward_actor({"kind": "rule", "rule": "relay.actors.rewards:ends_with_eos"}, tokenizer=str(tmp_path),
                           name="reward-bad-tok", num_cpus=0.1, timeout_s=60)
    with pytest.raises(ValueError):
        ray_session.get_actor("relay/reward-bad-tok", namespace="relay")
