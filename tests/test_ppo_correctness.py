"""PPO driver and loss corrections without Ray: sampling temperature in every logprob, the conversation
template's stop ids, step bookkeeping (metric aggregation, the non-finite guard). References are written here
from the formulas."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from relay.config import PPOAlgoConfig, PPOConfig, build

T = 0.7


def _model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _batch(seed: int = 0, B: int = 3, P: int = 5, A: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 1024, (B, P + A), generator=g)
    attn = torch.ones_like(ids)
    attn[0, :2] = 0  # left padding
    act = torch.ones(B, A)
    act[1, 2:] = 0
    attn[1, P + 2 :] = 0
    return {"input_ids": ids, "attention_mask": attn, "action_mask": act}


def tempered_logprobs(model, batch, A: int, temperature: float) -> torch.Tensor:
    """log_softmax(logits / T) of the last A tokens, from the formula (positions skip left padding)."""
    mask = batch["attention_mask"]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=pos).logits.float()
    logp = torch.log_softmax(logits[:, -A - 1 : -1] / temperature, -1)
    return logp.gather(-1, batch["input_ids"][:, -A:, None])[..., 0]


# ------------------------------------------------------------------------------------------ temperature
def test_actor_loss_uses_the_sampling_temperature(tiny_llama_dir):
    """With T = 0.7 the loss's logprobs are log_softmax(logits / 0.7): old logprobs computed so give ratio 1,
    and the gradient is the formula's (clip + entropy over the tempered distribution)."""
    from relay.learners.ppo import ppo_actor_loss

    torch.manual_seed(0)
    model = _model(tiny_llama_dir)
    batch = _batch()
    A = batch["action_mask"].shape[1]
    with torch.no_grad():
        want = tempered_logprobs(model, batch, A, T)
    batch.update(old_logprobs=want - 0.05, advantages=torch.randn(3, A))
    loss, m = ppo_actor_loss(model, batch, clip_eps=0.2, entropy_coef=0.01, temperature=T)
    mask = batch["action_mask"]
    assert abs(m["ratio"] - float((torch.exp(torch.tensor(0.05)) * mask).sum() / mask.sum())) < 1e-5
    assert abs(m["logprob_diff"] - 0.05) < 1e-5
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    lp = tempered_logprobs(model, batch, A, T)
    ratio = torch.exp(lp - batch["old_logprobs"])
    adv = batch["advantages"]
    pg = (-torch.min(ratio * adv, ratio.clamp(0.8, 1.2) * adv) * mask).sum() / mask.sum()
    pos = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=pos).logits
    logp_all = torch.log_softmax(logits.float()[:, -A - 1 : -1] / T, -1)
    entropy = (-(logp_all.exp() * logp_all).sum(-1) * mask).sum() / mask.sum()
    ref = pg - 0.01 * entropy
    assert abs(float(loss.detach()) - float(ref.detach())) < 1e-5
    assert abs(m["entropy"] - float(entropy)) < 1e-5
    ref.backward()
    worst = max(float((got[n] - p.grad).norm() / p.grad.norm().clamp(min=1e-12)) for n, p in model.named_parameters())
    assert worst < 1e-4


@pytest.mark.parametrize("tis_cap", [0.0, 1.02])
def test_old_logprobs_from_the_loss_forward_are_the_policy_gradient(tiny_llama_dir, tis_cap):
    """algo.old_logprobs 'loss': the ratio's old logprobs are the loss forward's own, detached, so the loss is
    -mean(A) at ratio 1 and its gradient is the policy gradient -mean(w x A x grad log pi) (w = 1 in sync mode;
    async: the truncated IS weight min(pi / pi_generator, cap), the generator's logprobs in `old_logprobs`)."""
    from relay.learners.ppo import ppo_actor_loss

    model = _model(tiny_llama_dir)
    batch = _batch(2)
    A = batch["action_mask"].shape[1]
    with torch.no_grad():
        want = tempered_logprobs(model, batch, A, T)
    gen = want + 0.03 * torch.randn(want.shape, generator=torch.Generator().manual_seed(3))  # a stale sampler
    batch.update(old_logprobs=gen, advantages=torch.randn(3, A, generator=torch.Generator().manual_seed(4)))
    loss, m = ppo_actor_loss(model, batch, clip_eps=0.2, temperature=T, old_from_forward=True, tis_cap=tis_cap)
    mask, adv = batch["action_mask"], batch["advantages"]
    assert m["ratio"] == 1.0 and m["approx_kl"] == 0.0 and m["clip_frac"] == 0.0
    assert abs(m["logprob_diff"] - float(((want - gen).abs() * mask).sum() / mask.sum())) < 1e-5
    w = torch.exp(want - gen).clamp(max=tis_cap) if tis_cap else torch.ones_like(want)
    assert (tis_cap > 0) == ("is_weight_mean" in m)
    if tis_cap:
        assert bool((w < tis_cap).any() and (w == tis_cap).any())  # some weights truncated, some not
        assert abs(m["is_weight_mean"] - float((w * mask).sum() / mask.sum())) < 1e-5
    assert abs(float(loss.detach()) + float((w * adv * mask).sum() / mask.sum())) < 1e-5
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = -(w * adv * tempered_logprobs(model, batch, A, T) * mask).sum() / mask.sum()
    ref.backward()
    worst = max(float((got[n] - p.grad).norm() / p.grad.norm().clamp(min=1e-12)) for n, p in model.named_parameters())
    assert worst < 1e-4


def test_reference_scorer_and_old_logprob_recompute_use_the_temperature(tiny_llama_dir):
    """The reference's logprobs and the actor group's old-logprob recompute are those of logits / T."""
    from relay.actors.scorers import ReferenceServer
    from relay.launch.ppo_update import PPOUpdates
    from relay.learners.lossfn import last_token_logprobs

    model = _model(tiny_llama_dir)
    batch = _batch(1)
    A = batch["action_mask"].shape[1]
    with torch.no_grad():
        want = tempered_logprobs(model, batch, A, T)
    server = ReferenceServer(str(tiny_llama_dir))  # the actor's class, run in-process
    got = server.logprobs({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}, last=A,
                          temperature=T)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    seen = []

    class Actor:  # stands in for the actor group: the same forward, on this process's model
        def forward_logprobs(self, b, temperature=1.0, last=None, micro_batch_size=0):
            seen.append((temperature, micro_batch_size))
            with torch.no_grad():
                return last_token_logprobs(model, b, last, temperature)

    cfg = build(PPOConfig, {"generation": {"temperature": T}, "algo": {"forward_micro_batch_size": 2}})
    system = SimpleNamespace(cfg=cfg, actor=Actor())
    b = dict(batch, old_logprobs=torch.zeros(3, A))
    PPOUpdates._recompute_old_logprobs(system, b, batch["action_mask"], async_mode=False)
    assert seen == [(T, 2)]  # the old logprobs run in the configured micro-batches
    torch.testing.assert_close(b["old_logprobs"], want * batch["action_mask"], rtol=1e-5, atol=1e-5)


def test_reward_kl_uses_tempered_policy_logprobs():
    """With T != 1 the KL against the (tempered) reference pairs it with the actor's tempered logprobs, not
    the generator's raw-logit ones; at T = 1 the generator's are used as they are."""
    from relay.launch.ppo_rollout import Scorers, policy_logprobs

    r = SimpleNamespace(action_mask=torch.tensor([[1, 1, 0]]), gen_logprobs=torch.tensor([[-1.0, -2.0, 0.0]]))
    calls = []

    class Actor:
        def forward_logprobs(self, inputs, temperature=1.0, last=None, micro_batch_size=0):
            calls.append((temperature, last, micro_batch_size))
            return torch.tensor([[-0.5, -0.6, -0.7]])

    algo = PPOAlgoConfig(train_batch_size=5)  # forward_micro_batch_size 0: the train micro-batch
    sc = Scorers(None, None, None, algo, 1, [2], temperature=T, actor=Actor())
    assert policy_logprobs(r, sc, {})[0].tolist() == pytest.approx([-0.5, -0.6, 0.0])
    assert calls == [(T, 3, 5)]
    sc1 = Scorers(None, None, None, None, 1, [2], temperature=1.0, actor=Actor())
    assert torch.equal(policy_logprobs(r, sc1, {}), r.gen_logprobs)


def test_weight_sync_sends_the_engines_dtype():
    """A bf16/fp16 engine gets its weights in its own dtype (half the bytes); fp32 and 'auto' get them as held."""
    from relay.launch.ppo import PPOSystem

    class Pool:
        def push_weights(self, send, version, rewind=False):
            return {"dtype": send(f"push v{version}")}

    class Actor:  # the learner group's sender: returns the dtype it was asked for
        def publish_weights(self, push, dtype=None):
            assert push == "push v3"
            return dtype

    for dtype, want in (("float32", None), ("auto", None), ("bfloat16", "bfloat16"), ("float16", "float16")):
        system = SimpleNamespace(cfg=build(PPOConfig, {"generation": {"dtype": dtype}}), pool=Pool(), actor=Actor(),
                                 state=SimpleNamespace(version=3))
        PPOSystem.sync_weights(system)
        assert system.last_sync == {"dtype": want}, dtype


# -------------------------------------------------------------------------------------------- stop ids
def _prompt_folder(tmp_path, name: str, template: dict | None):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "prepared.json").write_text(json.dumps({"kind": "prompt", "template_config": template}))
    return folder


def test_template_stop_ids_reach_sampling_and_rewards(tmp_path, tiny_llama_dir):
    """Prompts prepared with a template whose stop id (77) is not the tokenizer's eos (2): generation stops at
    77 (the driver's SamplingConfig carries it) and a response ending in 77 counts as finished for rewards."""
    from transformers import AutoTokenizer

    from relay.actors.reward_rules import ends_with_eos
    from relay.launch.ppo_rollout import sampling_config
    from relay.launch.ppo_template import resolve_stop_ids

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    assert tok.eos_token_id == 2
    template = {"chat_template": None, "system_message": None, "end_of_assistant": "<|im_end|>", "stop_ids": [77]}
    prompts = _prompt_folder(tmp_path, "prompts", template)
    cfg = build(PPOConfig, {"prompt_dataset": [str(prompts)], "generation": {"temperature": 0.9}})
    stops = resolve_stop_ids(cfg, tok)
    assert stops.stop_ids == [77] and stops.eos_ids == [77, 2]
    sampling = sampling_config(cfg, 3, stops.stop_ids)
    assert sampling.stop_token_ids == (77,) and sampling.temperature == 0.9
    assert ends_with_eos("p", "r", response_ids=[5, 9, 77], eos_token_ids=stops.eos_ids) == 1.0
    assert ends_with_eos("p", "r", response_ids=[5, 9, 78], eos_token_ids=stops.eos_ids) == 0.0

    # an explicit template config wins, and must match the prompts' template
    same = tmp_path / "same.json"
    same.write_text(json.dumps({**template, "stop_ids": [77, 78]}))
    cfg.conversation_template_config = str(same)
    assert resolve_stop_ids(cfg, tok).stop_ids == [77, 78]
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**template, "chat_template": "{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}"}))
    cfg.conversation_template_config = str(other)
    with pytest.raises(ValueError, match="conversation_template_config: the prompts in .* another chat template"):
        resolve_stop_ids(cfg, tok)
    # no template anywhere: the tokenizer's eos
    bare = build(PPOConfig, {"prompt_dataset": [str(_prompt_folder(tmp_path, "bare", None))]})
    assert resolve_stop_ids(bare, tok).stop_ids == [2]


# ----------------------------------------------------------------------------------------- bookkeeping
def test_step_stats_weigh_metrics_by_units_and_sum_contributions():
    from relay.learners.accumulate import StepStats

    ranks = []
    for micro in ([(0.1, {"pg": 0.1, "frac": 1.0}, 1.0), (0.3, {"pg": 0.3, "frac": 0.0}, 3.0)],
                  [(0.2, {"pg": 0.2, "frac": 0.5}, 4.0)]):
        s = StepStats(frozenset({"pg"}))
        for loss, metrics, w in micro:
            s.add(loss, metrics, w)
        ranks.append(s)
    assert ranks[0].local() == pytest.approx({"loss": 0.4, "pg": 0.4, "frac": 0.25})
    packed = []  # each rank's vector; dist.all_reduce would hand every rank their sum
    for r in ranks:
        r.reduce(lambda v: packed.append(v) or v, 2)
    total = [a + b for a, b in zip(*packed)]
    out = ranks[0].reduce(lambda v: total, 2)
    # loss and summed contributions: mean over ranks; frac: weighted by units over both ranks (1*1 + 4*0.5)/8
    assert out == pytest.approx({"loss": 0.3, "pg": 0.3, "frac": 3.0 / 8.0})


def test_nonfinite_guard_stops_after_the_limit_in_a_row():
    from relay.learners.accumulate import NonfiniteGuard

    guard = NonfiniteGuard(3, "algo.max_nonfinite_steps")
    for skipped in (True, True, False, True, True):
        guard.update(skipped, "episode 1")
    assert guard.streak == 2 and guard.total == 4
    with pytest.raises(FloatingPointError, match=r"episode 7: 3 optimizer steps in a row .*algo.max_nonfinite_steps=3"):
        guard.update(True, "episode 7")


def test_ppo_update_stops_after_repeated_nonfinite_steps():
    """The driver's update loop counts the learners' skips and stops the run naming the episode."""
    from relay.launch.ppo_update import PPOUpdates

    cfg = build(PPOConfig, {"algo": {"advantage_estimator": "grpo", "num_update_steps": 2, "max_nonfinite_steps": 3,
                                     "experience_batch_size": 2, "train_batch_size": 4},
                            "generation": {"n_samples_per_prompt": 2}})

    class Actor:
        def set_lr(self, lr):
            pass

        def forward_logprobs(self, b, temperature=1.0, last=None, micro_batch_size=0):
            return torch.zeros(b["input_ids"].shape[0], last)

        def start_train_step(self, batch, loss=None, micro_batches=1, **kw):  # the group's start/finish pair
            return {"loss": float("nan"), "approx_kl": 0.0, "logprob_diff": 0.0, "nonfinite_skipped": 1.0, "step": 0}

        def finish(self, pending):
            return pending

    class Exp(SimpleNamespace):
        def __len__(self):
            return 4

    exp = Exp(sequences=torch.ones(4, 6, dtype=torch.long), attention_mask=torch.ones(4, 6),
              action_mask=torch.ones(4, 2), old_logprobs=torch.zeros(4, 2), advantages=torch.zeros(4, 2),
              returns=torch.zeros(4, 2), ref_logprobs=None, values=None)

    class System(PPOUpdates):  # the update mixin on stand-ins for the actors
        def __init__(self):
            self.cfg, self.actor, self.critic, self.ptx, self.nonfinite = cfg, Actor(), None, None, None
            self.state, self.kl_ctl = SimpleNamespace(version=0, episode=4), SimpleNamespace(value=0.0)

    system = System()
    out = system._update(exp)
    assert out["nonfinite_skipped"] == 2.0  # episode 5: two skipped steps, the run goes on
    system.state.episode = 5
    with pytest.raises(FloatingPointError, match="episode 6, update step 1: 3 optimizer steps in a row"):
        system._update(exp)
