"""Held-out answers: generate a policy's answers to held-out prompts through vLLM generators, score them with a
reward source, and (with a reference at temperature 1) estimate KL(policy || reference). Shared by PPO's
`eval_interval` and `relay eval`; the arithmetic lives in `relay.evals.scores`."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from relay.actors.sampling import GenerationResult, SamplingConfig
from relay.evals.scores import answer_rewards, length_stats, per_prompt_means, sequence_kl

# prompts, sampling -> one list of samples per prompt, in prompt order
GenerateFn = Callable[[list[list[int]], SamplingConfig], list[list[GenerationResult]]]


@dataclass
class AnswerEvalResult:
    metrics: dict[str, float]
    per_prompt: list[float]  # mean reward per held-out prompt (for effect sizes across runs)
    samples: list[dict[str, Any]]  # a few decoded answers with their rewards


def pool_generate(pool: Any, tag: str, timeout_s: float) -> GenerateFn:
    """A `GenerateFn` over a `GeneratorPool` (ids tagged so they never collide with training prompts)."""

    def generate(prompts: list[list[int]], sampling: SamplingConfig) -> list[list[GenerationResult]]:
        ids = [f"{tag}-{i}" for i in range(len(prompts))]
        return [r.samples for r in pool.generate(prompts, sampling, ids=ids, timeout_s=timeout_s)]

    return generate


def client_generate(client: Any, timeout_s: float) -> GenerateFn:
    """A `GenerateFn` over one generator actor (`GeneratorClient`)."""

    def generate(prompts: list[list[int]], sampling: SamplingConfig) -> list[list[GenerationResult]]:
        flat = client.generate(prompts, sampling, timeout_s=timeout_s)
        grouped: list[list[GenerationResult]] = [[] for _ in prompts]
        for s in flat:
            grouped[s.prompt_index].append(s)
        return [sorted(g, key=lambda s: s.sample_index) for g in grouped]

    return generate


def padded(samples: Sequence[GenerationResult], pad_id: int) -> dict[str, torch.Tensor]:
    """Prompt left-padded, response right-padded: input_ids/attention_mask [N, P+A], action_mask and the
    generator's logprobs [N, A] (the layout the reference scorer and learners read)."""
    P = max(len(s.prompt_token_ids) for s in samples)
    A = max(1, max(len(s.token_ids) for s in samples))
    ids = torch.full((len(samples), P + A), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    act = torch.zeros((len(samples), A), dtype=torch.long)
    lp = torch.zeros((len(samples), A), dtype=torch.float32)
    for i, s in enumerate(samples):
        p, a = len(s.prompt_token_ids), len(s.token_ids)
        ids[i, P - p:P] = torch.tensor(s.prompt_token_ids)
        attn[i, P - p:P + a] = 1
        if a:
            ids[i, P:P + a] = torch.tensor(s.token_ids)
            act[i, :a] = 1
            lp[i, :a] = torch.tensor(s.logprobs, dtype=torch.float32)
    return {"input_ids": ids, "attention_mask": attn, "action_mask": act, "logprobs": lp}


def evaluate_answers(generate: GenerateFn, prompts: list[list[int]], sampling: SamplingConfig, reward: Any,
                     ref: Any | None = None, tokenizer: Any = None, pad_id: int = 0,
                     eos_token_ids: list[int] | None = None, pass_threshold: float | None = None,
                     show: int = 3) -> AnswerEvalResult:
    """Answers to `prompts` -> reward mean, spread across prompts, pass rate, length, KL to `ref` (only at
    temperature 1, where the generator's logprobs are the policy's) and `show` decoded samples."""
    from relay.cluster.calls import get

    groups = generate(prompts, sampling)
    flat = [s for g in groups for s in g]
    # reward and reference score in their own actors at the same time
    reward_ref = reward.score_ids_async([s.prompt_token_ids for s in flat], [s.token_ids for s in flat],
                                        finish_reasons=[s.finish_reason for s in flat], eos_token_ids=eos_token_ids)
    kl_ref = batch = None
    if ref is not None and sampling.temperature == 1.0:
        batch = padded(flat, pad_id)
        A = batch["action_mask"].shape[1]
        kl_ref = ref.logprobs_async({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}, last=A)
    timeout = getattr(reward, "timeout_s", 1800.0)
    rewards = get(reward_ref, timeout, "relay/reward.score_ids")
    grouped, k = [], 0
    for g in groups:
        grouped.append(list(rewards[k:k + len(g)]))
        k += len(g)
    metrics = answer_rewards(grouped, pass_threshold)
    metrics.update(length_stats([len(s.token_ids) for s in flat], [s.finish_reason == "stop" for s in flat]))
    if kl_ref is not None:
        ref_lp = get(kl_ref, getattr(ref, "timeout_s", 1800.0), "relay/ref.logprobs")
        metrics.update(sequence_kl(batch["logprobs"], ref_lp[:, -A:], batch["action_mask"]))
    samples = []
    for g, r in list(zip(groups, grouped))[:show]:
        if not g:
            continue
        s = g[0]
        text = (lambda ids: tokenizer.decode(ids, skip_special_tokens=True)) if tokenizer is not None else str
        samples.append({"prompt": text(s.prompt_token_ids)[-300:], "answer": text(s.token_ids), "reward": r[0]})
    return AnswerEvalResult(metrics, per_prompt_means(grouped), samples)


def eval_sampling(n: int, temperature: float, max_tokens: int, stop_ids: Sequence[int], seed: int) -> SamplingConfig:
    """Sampling for held-out answers: a fixed seed, so two evaluations differ only by the weights."""
    return SamplingConfig(n=n if temperature > 0 else 1, temperature=temperature, max_tokens=max_tokens,
                          stop_token_ids=tuple(stop_ids), seed=seed)
