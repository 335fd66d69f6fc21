"""Chunked token logprobs (`relay.learners.logprobs`) against the one-shot log-softmax formula: values, entropy
and gradients, fp32/bf16/fp64 inputs, temperature, strided inputs, determinism. No Ray."""
from __future__ import annotations

import pytest
import torch

from relay.learners.logprobs import chunked_logprobs, reference_logprobs


def _case(dtype: torch.dtype, B: int = 3, T: int = 7, V: int = 50, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T + 1, V, generator=g) * 3).to(dtype)
    tokens = torch.randint(0, V, (B, T), generator=g)
    upstream = torch.randn(B, T, generator=g)
    return logits, tokens, upstream


def _grads(fn, logits, tokens, upstream, temperature):
    """(logp, entropy, d(sum upstream*logp)/d logits) with logits sliced as the PPO loss slices them."""
    leaf = logits.clone().requires_grad_(True)
    logp, entropy = fn(leaf[:, :-1], tokens, temperature)  # a strided view, as response_logits gives
    (logp * upstream).sum().backward()
    return logp.detach(), entropy, leaf.grad


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_fp32_matches_reference(chunk, temperature):
    logits, tokens, up = _case(torch.float32)
    lp, ent, grad = _grads(lambda x, t, T: chunked_logprobs(x, t, T, chunk=chunk), logits, tokens, up, temperature)
    ref_lp, ref_ent, ref_grad = _grads(reference_logprobs, logits, tokens, up, temperature)
    assert lp.dtype == torch.float32 and lp.shape == tokens.shape
    torch.testing.assert_close(lp, ref_lp, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)
    assert grad[:, -1].abs().sum() == 0  # the position predicting nothing gets no gradient


def test_bf16_logits_give_fp32_logprobs_and_bf16_grads():
    logits, tokens, up = _case(torch.bfloat16)
    lp, ent, grad = _grads(lambda x, t, T: chunked_logprobs(x, t, T, chunk=4), logits, tokens, up, 1.0)
    ref_lp, ref_ent, ref_grad = _grads(reference_logprobs, logits, tokens, up, 1.0)
    assert lp.dtype == torch.float32 and grad.dtype == torch.bfloat16
    # Same bf16 inputs, fp32 math on both sides: only the summation order differs.
    torch.testing.assert_close(lp, ref_lp, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=1e-2, atol=1e-3)


def test_gradcheck_fp64():
    logits, tokens, _ = _case(torch.float64, B=2, T=3, V=6)
    x = logits[:, :-1].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: chunked_logprobs(z, tokens, 0.8, chunk=2)[0], (x,))


def test_two_dimensional_input_and_wrong_token_changes_value():
    logits, tokens, _ = _case(torch.float32)
    flat, flat_tok = logits[:, :-1].reshape(-1, logits.shape[-1]), tokens.reshape(-1)
    lp2, _ = chunked_logprobs(flat, flat_tok)
    lp3, _ = chunked_logprobs(logits[:, :-1], tokens)
    torch.testing.assert_close(lp2, lp3.reshape(-1), rtol=0, atol=0)
    other, _ = chunked_logprobs(flat, (flat_tok + 1) % logits.shape[-1])
    assert not torch.allclose(other, lp2)
    assert (lp2 <= 0).all()


def test_deterministic_bitwise():
    logits, tokens, up = _case(torch.float32, B=4, T=20, V=300, seed=3)
    runs = [_grads(lambda x, t, T: chunked_logprobs(x, t, T, chunk=8), logits, tokens, up, 1.0) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)
