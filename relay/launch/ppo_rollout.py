"""PPO rollouts: generator results -> padded tensors -> scored `Experience` (reference logprobs, reward, critic
values, KL-penalised token rewards, advantages). Used by the driver in `relay.launch.ppo`.

Scoring overlaps its remote parts: the reference and reward calls are sent first (their own actors), then the
critic group's forward runs while they compute, in micro-batches of `algo.forward_micro_batch_size` rows per
rank (as the actor's logprob forwards), so an episode's scoring needs no more learner memory than one micro-batch.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from relay.algos.advantages import compute_advantages
from relay.algos.kl import kl_estimate
from relay.algos.masked import masked_mean
from relay.buffer.experience import Experience
from relay.config import forward_micro_batch


@dataclass
class Rollout:
    """Generated samples as tensors: prompt left-padded to P, response right-padded to A (S = P + A)."""

    sequences: torch.Tensor  # [B, S]
    attention_mask: torch.Tensor  # [B, S]
    action_mask: torch.Tensor  # [B, A]
    gen_logprobs: torch.Tensor  # [B, A] generator logprobs of the sampled tokens
    weight_version: torch.Tensor  # [B]
    sample_ids: list[str]
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    finish_reasons: list[str]

    def __len__(self) -> int:
        return self.sequences.shape[0]

    @property
    def num_tokens(self) -> int:
        return int(self.action_mask.sum())


def build_rollout(results: Sequence[Any], pad_id: int) -> Rollout:
    """PromptResults (each with n samples, kept contiguous: grpo/rloo groups rely on it) -> a `Rollout`."""
    samples, ids = [], []
    for r in results:
        samples += r.samples
        ids += r.sample_ids()
    P = max(len(s.prompt_token_ids) for s in samples)
    A = max(max(len(s.token_ids) for s in samples), 1)
    B = len(samples)
    seq = torch.full((B, P + A), pad_id, dtype=torch.long)
    attn = torch.zeros((B, P + A), dtype=torch.long)
    amask = torch.zeros((B, A), dtype=torch.long)
    glp = torch.zeros((B, A), dtype=torch.float32)
    for i, s in enumerate(samples):
        p, a = len(s.prompt_token_ids), len(s.token_ids)
        seq[i, P - p : P] = torch.tensor(s.prompt_token_ids, dtype=torch.long)
        attn[i, P - p : P + a] = 1
        if a:
            seq[i, P : P + a] = torch.tensor(s.token_ids, dtype=torch.long)
            amask[i, :a] = 1
            glp[i, :a] = torch.tensor(s.logprobs, dtype=torch.float32)
    return Rollout(
        sequences=seq, attention_mask=attn, action_mask=amask, gen_logprobs=glp,
        weight_version=torch.tensor([s.weight_version for s in samples], dtype=torch.long), sample_ids=ids,
        prompt_ids=[list(s.prompt_token_ids) for s in samples], response_ids=[list(s.token_ids) for s in samples],
        finish_reasons=[s.finish_reason for s in samples],
    )


@dataclass
class RunningMoments:
    """Running mean/std of rewards (Chan et al. parallel update) for `normalize_reward`."""

    mean: float = 0.0
    var: float = 1.0
    count: float = 1e-4

    def update(self, x: torch.Tensor) -> None:
        n = x.numel()
        if n == 0:
            return
        b_mean, b_var = float(x.float().mean()), float(x.float().var(unbiased=False))
        delta, total = b_mean - self.mean, self.count + n
        self.mean += delta * n / total
        self.var = (self.var * self.count + b_var * n + delta**2 * self.count * n / total) / total
        self.count = total

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / math.sqrt(self.var + 1e-8)


@dataclass
class Scorers:
    """What scoring needs: the reference, reward and (optional) critic handles plus the algorithm options."""

    ref: Any | None  # relay.actors.scorers.ReferenceClient; None when no KL term needs it
    reward: Any  # relay.actors.rewards.RewardClient
    critic: Any | None  # LearnerGroup (gae) or None (grpo/rloo)
    algo: Any  # relay.config.PPOAlgoConfig
    group_size: int
    eos_token_ids: list[int]
    timeout_s: float = 1800.0
    moments: RunningMoments = field(default_factory=RunningMoments)
    temperature: float = 1.0  # learners' and reference's logits / temperature (`relay.config.learner_temperature`)
    actor: Any | None = None  # actor LearnerGroup: the KL's policy logprobs when temperature != 1


def score_rollout(r: Rollout, sc: Scorers, kl_coef: float) -> tuple[Experience, dict[str, float]]:
    """Reference logprobs, rewards and values for a rollout -> (Experience, metrics of this batch)."""
    A = r.action_mask.shape[1]
    inputs = {"input_ids": r.sequences, "attention_mask": r.attention_mask}
    ref_ref = sc.ref.logprobs_async(inputs, last=A, temperature=sc.temperature) if sc.ref is not None else None
    reward_ref = sc.reward.score_ids_async(r.prompt_ids, r.response_ids, finish_reasons=r.finish_reasons,
                                           eos_token_ids=sc.eos_token_ids)
    values = None
    if sc.critic is not None:
        from relay.learners.ppo import response_values

        values = response_values(sc.critic.forward_values(inputs, micro_batch_size=forward_micro_batch(sc.algo)),
                                 A) * r.action_mask
    # the clients' waits: Ray re-runs a call whose scorer died on the restarted actor; ActorLost once it gave up
    ref_lp = None if ref_ref is None else sc.ref.result(ref_ref)[:, -A:] * r.action_mask
    raw_scores = torch.tensor(sc.reward.result(reward_ref), dtype=torch.float32)
    scores = raw_scores
    a = sc.algo
    if a.normalize_reward:
        sc.moments.update(scores)
        scores = sc.moments.normalize(scores)
    if a.reward_clip > 0:
        scores = scores.clamp(-a.reward_clip, a.reward_clip)
    mask = r.action_mask.float()
    kl = torch.zeros_like(mask)
    if ref_lp is not None:
        kl = kl_estimate(policy_logprobs(r, sc, inputs), ref_lp, a.kl_estimator) * mask
    adv, returns, token_rewards = compute_advantages(
        a.advantage_estimator, scores=scores, action_mask=r.action_mask, values=values, kl=kl,
        kl_coef=kl_coef if a.kl_in_reward else 0.0, gamma=a.gamma, lam=a.lam, group_size=sc.group_size,
        whiten=a.whiten_advantages,
    )
    exp = Experience(
        sequences=r.sequences, attention_mask=r.attention_mask, action_mask=r.action_mask,
        old_logprobs=r.gen_logprobs, ref_logprobs=ref_lp, values=values, rewards=token_rewards, scores=scores,
        advantages=adv * mask, returns=returns * mask, weight_version=r.weight_version, sample_ids=list(r.sample_ids),
    )
    lengths = r.action_mask.sum(1).float()
    metrics = {
        "reward_mean": float(raw_scores.mean()),
        "reward_std": float(raw_scores.std()) if len(raw_scores) > 1 else 0.0,
        "kl": float((kl.sum(1)).mean()),  # per sequence, as the adaptive controller's target
        "kl_token": float(masked_mean(kl, mask)),
        "response_length": float(lengths.mean()),
        "eos_rate": float(sum(f == "stop" for f in r.finish_reasons) / max(1, len(r))),
    }
    if values is not None:
        metrics["value_mean"] = float(masked_mean(values, mask))
    return exp, metrics


def policy_logprobs(r: Rollout, sc: Scorers, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The sampling policy's logprobs for the KL against the reference: the generator's (raw logits) at
    temperature 1; else the actor group's of logits / temperature (vLLM reports raw-logit logprobs only), the
    weights that sampled this batch in sync mode."""
    if sc.temperature == 1.0 or sc.actor is None:
        return r.gen_logprobs
    A = r.action_mask.shape[1]
    return sc.actor.forward_logprobs(inputs, temperature=sc.temperature, last=A,
                                     micro_batch_size=forward_micro_batch(sc.algo)) * r.action_mask


def sampling_config(cfg: Any, episode: int, stop_ids: Sequence[int] = ()) -> Any:
    """The episode's `SamplingConfig`: generation settings, the template's stop ids, a per-episode seed."""
    from relay.actors.sampling import SamplingConfig

    g = cfg.generation
    return SamplingConfig(n=g.n_samples_per_prompt, temperature=g.temperature, top_p=g.top_p,
                          top_k=None if g.top_k < 1 else g.top_k, max_tokens=g.max_new_tokens,
                          stop_token_ids=tuple(stop_ids), seed=cfg.seed * 1_000_003 + episode * 7919)


def learner_batch(exp: Experience) -> dict[str, torch.Tensor]:
    """The tensors the PPO losses read (names as `relay.learners.ppo` expects)."""
    batch = {
        "input_ids": exp.sequences, "attention_mask": exp.attention_mask, "action_mask": exp.action_mask,
        "old_logprobs": exp.old_logprobs, "advantages": exp.advantages, "returns": exp.returns,
    }
    if exp.ref_logprobs is not None:
        batch["ref_logprobs"] = exp.ref_logprobs
    if exp.values is not None:
        batch["old_values"] = exp.values
    return batch
