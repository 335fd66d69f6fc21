"""Fault matrix, the restart budget: a restartable actor comes back `max_restarts` times, and the next death is
one clear error naming it (relay.restarts.ActorLost), not a raw Ray traceback. Real Ray, no models (a rule
reward and the buffer start in about a second each)."""
from __future__ import annotations

import os
import signal
import time

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # gone for good before the next call (the raylet reaps it)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


def test_reward_comes_back_then_gives_up_naming_itself(ray_session):
    from relay.actors.rewards import start_reward_actor
    from relay.restarts import ActorLost

    client = start_reward_actor({"kind": "rule", "rule": "relay.actors.rewards:length_penalty"},
                                name="reward-budget", num_cpus=0.1, timeout_s=60, max_restarts=1)
    try:
        assert client.score(["p"], ["abc"]) == client.score(["p"], ["abc"])
        first = client.info()["pid"]
        _kill(first)
        t0 = time.monotonic()
        before = client.score(["p"], ["abc"])  # queued or re-run until the restarted actor answers
        back_s = time.monotonic() - t0
        second = client.info()["pid"]
        assert second != first and client.info()["calls"] == 1  # a fresh process: its counters start again
        print(f"\n[fault] relay/reward-budget SIGKILLed: next call answered after {back_s:.1f} s by a new process")
        _kill(second)
        with pytest.raises(ActorLost, match=r"relay/reward-budget died .*cluster.max_restarts=1") as err:
            client.score(["p"], ["abc"])
        print(f"[fault] after the budget: {str(err.value)[:160]} (cause: {type(err.value.__cause__).__name__})")
        assert len(before) == 1
    finally:
        client.kill()


def test_buffer_exchange_gives_up_naming_the_buffer(ray_session):
    """A buffer started without restarts: the exchange's first failed call is the end, with the actor named."""
    import torch

    from relay.buffer.actor import start_buffer
    from relay.buffer.experience import Experience
    from relay.launch.ppo_buffer import exchange
    from relay.restarts import ActorLost

    buffer = start_buffer(8, name="buffer-budget", num_cpus=0.1, timeout_s=60, max_restarts=0)
    exp = Experience(
        sequences=torch.ones(2, 4, dtype=torch.long), attention_mask=torch.ones(2, 4, dtype=torch.long),
        action_mask=torch.ones(2, 2, dtype=torch.long), old_logprobs=torch.zeros(2, 2), ref_logprobs=None,
        values=None, rewards=torch.zeros(2, 2), scores=torch.zeros(2), advantages=torch.zeros(2, 2),
        returns=torch.zeros(2, 2), weight_version=torch.zeros(2, dtype=torch.long), sample_ids=["a", "b"])
    try:
        out = exchange(buffer, exp, version=0, max_staleness=None, max_restarts=0)
        assert sorted(s for b in out.taken for s in b.sample_ids) == ["a", "b"] and out.attempts == 1
        _kill(buffer.info()["pid"])
        with pytest.raises(ActorLost, match=r"relay/buffer-budget died .*cluster.max_restarts=0"):
            exchange(buffer, exp, version=0, max_staleness=None, max_restarts=0)
    finally:
        buffer.kill()
