"""bf16 autocast for the actor and critic update (`relay.learners.autocast`, algo.update_autocast): resolution per CPU,
the loss's forward really runs bf16 while weights and gradients stay fp32, and the loss stays close to fp32.
No Ray."""
from __future__ import annotations

import pytest
import torch

from relay.config import load_config, old_logprobs_source
from relay.learners.autocast import resolve_autocast
from relay.learners.lossfn import causal_logits, token_logprobs
from relay.learners.ppo import ppo_actor_loss


def test_resolution(monkeypatch):
    assert resolve_autocast("off") is None and resolve_autocast(None) is None
    assert resolve_autocast("bf16") == "bf16"
    assert resolve_autocast("auto", on_gpu=True) == "bf16"
    monkeypatch.setenv("RELAY_CPU_CAPABILITY", "avx2")  # AVX2-only view: bf16 emulated, auto stays off
    assert resolve_autocast("auto") is None
    with pytest.warns(RuntimeWarning, match="update_autocast=bf16: bf16 is emulated on this CPU"):
        assert resolve_autocast("bf16") == "bf16"  # explicit: kept, with a warning
    with pytest.raises(ValueError, match="autocast='fp8'"):
        resolve_autocast("fp8")


def test_autocast_rules_out_generator_old_logprobs():
    cfg = load_config("ppo", None, ["generation.dtype=float32"])
    assert old_logprobs_source(cfg) == "generator"
    cfg = load_config("ppo", None, ["generation.dtype=float32", "algo.update_autocast=auto"])
    assert old_logprobs_source(cfg) == "loss"  # the default num_update_steps 1: the loss's own forward


def _batch(model):
    torch.manual_seed(0)
    ids = torch.randint(3, 1000, (4, 12))
    attn = torch.ones_like(ids)
    attn[0, :3] = 0
    A = 5
    batch = {"input_ids": ids, "attention_mask": attn}
    with torch.no_grad():
        own = token_logprobs(causal_logits(model, batch), ids)[:, -A:]
    batch.update(action_mask=torch.ones(4, A), old_logprobs=own, advantages=torch.randn(4, A))
    return batch


def test_bf16_forward_fp32_weights_and_close_loss(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    batch = _batch(model)
    seen = []
    hook = model.lm_head.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    fp32_loss, fp32_m = ppo_actor_loss(model, batch)
    bf16_loss, bf16_m = ppo_actor_loss(model, batch, autocast="bf16")
    hook.remove()
    assert seen == [torch.float32, torch.bfloat16]
    assert bf16_loss.dtype == torch.float32
    bf16_loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # fp32 old logprobs: ratio exactly 1 without autocast, near 1 with it
    assert abs(fp32_m["ratio"] - 1) < 1e-6
    assert abs(bf16_m["ratio"] - 1) < 5e-2 and bf16_m["ratio"] != fp32_m["ratio"]
    assert abs(float(bf16_loss.detach()) - float(fp32_loss.detach())) < 5e-2


def test_critic_forward_under_autocast_keeps_fp32_values(tiny_llama_dir):
    from relay.learners.ppo import ppo_critic_loss
    from relay.models.heads import CriticModel

    critic = CriticModel.from_pretrained(str(tiny_llama_dir), dtype=torch.float32, seed=3).train()
    torch.manual_seed(0)
    ids = torch.randint(3, 1000, (4, 12))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "action_mask": torch.ones(4, 5),
             "old_values": torch.zeros(4, 5), "returns": torch.randn(4, 5)}
    seen = []
    hooks = [critic.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(("mlp", o.dtype))),
             critic.value_head.register_forward_hook(lambda m, i, o: seen.append(("head", o.dtype)))]
    fp32_loss, _ = ppo_critic_loss(critic, batch)
    bf16_loss, _ = ppo_critic_loss(critic, batch, autocast="bf16")
    for h in hooks:
        h.remove()
    assert seen == [("mlp", torch.float32), ("head", torch.float32), ("mlp", torch.bfloat16), ("head", torch.float32)]
    bf16_loss.backward()
    assert all(p.grad is None or (p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all())
               for p in critic.parameters())
    assert critic.value_head.weight.grad is not None
    fp32, bf16 = float(fp32_loss.detach()), float(bf16_loss.detach())
    assert 0 < abs(bf16 - fp32) < 5e-2 * max(1.0, abs(fp32))
