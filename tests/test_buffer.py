"""ExperienceBuffer: the pure store (duplicates, limit, staleness, shuffled passes, counters, padding trim),
then the real `relay/buffer` Ray actor (blocking put released by take, concurrent producers, sync and async
use), each checking that nothing is lost or counted twice."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from relay.buffer.actor import BufferFull, ExperienceStore, trim
from relay.buffer.experience import Experience


def _exp(ids, version=0, prompt_lens=None, resp_lens=None, P=4, A=3, values=True):
    """A batch with left-padded prompts (real lengths `prompt_lens`) and right-padded responses."""
    B = len(ids)
    prompt_lens = prompt_lens or [P] * B
    resp_lens = resp_lens or [A] * B
    seq = torch.zeros(B, P + A, dtype=torch.long)
    attn = torch.zeros(B, P + A, dtype=torch.long)
    act = torch.zeros(B, A)
    for i, (p, a) in enumerate(zip(prompt_lens, resp_lens)):
        seq[i, P - p:P] = torch.arange(1, p + 1) + 10 * i
        seq[i, P:P + a] = torch.arange(100, 100 + a)
        attn[i, P - p:P + a] = 1
        act[i, :a] = 1
    resp = (torch.arange(B * A, dtype=torch.float32).reshape(B, A) + 1) * act
    return Experience(
        sequences=seq, attention_mask=attn, action_mask=act, old_logprobs=-resp, ref_logprobs=-resp,
        values=resp.clone() if values else None, rewards=resp.clone(), scores=torch.arange(B, dtype=torch.float32),
        advantages=resp.clone(), returns=resp.clone(), weight_version=torch.full((B,), version, dtype=torch.long),
        sample_ids=list(ids))


def test_put_rejects_duplicates_across_time_and_within_a_batch():
    store = ExperienceStore(limit=10)
    r = store.put(_exp(["a", "b", "a"]))
    assert (r.accepted, r.duplicates, r.size) == (2, 1, 2)
    assert store.put(_exp(["b", "c"])).accepted == 1
    store.take(3)
    assert store.put(_exp(["a", "d"])).accepted == 1  # "a" was taken: still a duplicate
    s = store.stats()
    assert (s["put"], s["duplicates"], s["taken"], s["size"]) == (4, 3, 3, 1) and s["balanced"]


def test_limit_is_all_or_nothing():
    store = ExperienceStore(limit=4)
    store.put(_exp(["a", "b", "c"]))
    with pytest.raises(BufferFull):
        store.put(_exp(["d", "e"]))
    assert len(store) == 3 and store.stats()["put"] == 3
    assert store.put(_exp(["a", "d"])).accepted == 1  # only the new one needs room
    with pytest.raises(ValueError, match="can never fit"):
        store.put(_exp([f"x{i}" for i in range(5)]))
    with pytest.raises(ValueError):
        ExperienceStore(limit=0)


def test_staleness_stats_and_eviction():
    store = ExperienceStore(limit=20)
    for v in range(4):
        store.put(_exp([f"v{v}-{i}" for i in range(2)], version=v))
    s = store.stats(current_version=3)
    assert s["staleness_max"] == 3 and s["staleness_mean"] == pytest.approx(1.5)
    assert (s["version_min"], s["version_max"]) == (0, 3)
    assert store.evict_stale(current_version=3, max_staleness=1) == 4  # versions 0 and 1 dropped
    s = store.stats(current_version=3)
    assert s["size"] == 4 and s["dropped"] == 4 and s["staleness_max"] == 1 and s["balanced"]
    assert store.evict_stale(current_version=3, max_staleness=1) == 0


def test_shuffled_passes_cover_every_sample_once_and_follow_the_seed():
    store = ExperienceStore(limit=100, seed=0)
    ids = [f"s{i}" for i in range(23)]
    store.put(_exp(ids[:10]))
    store.put(_exp(ids[10:]))
    passes = []
    for epoch in range(3):
        batches = store.sample(batch_size=5, seed=epoch)
        assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
        flat = [s for b in batches for s in b.sample_ids]
        assert sorted(flat) == sorted(ids)  # each sample exactly once per pass
        passes.append(flat)
    assert passes[0] != passes[1] and passes[0] != ids
    assert [s for b in store.sample(5, seed=1) for s in b.sample_ids] == passes[1]  # seeded = reproducible
    assert [s for b in store.sample(5, shuffle=False) for s in b.sample_ids] == ids
    assert len(store.sample(5, seed=0, drop_last=True)) == 4
    s = store.stats()
    assert s["size"] == 23 and s["passes"] == 6 and s["sampled"] == 23 * 6 - 3


def test_samples_keep_their_data_through_store_and_collate():
    store = ExperienceStore(limit=10, pad_token_id=0)
    e = _exp(["a", "b", "c"], version=2, prompt_lens=[4, 2, 1], resp_lens=[3, 1, 2])
    store.put(e)
    got = store.take_all(shuffle=False)[0]
    assert got.sample_ids == ["a", "b", "c"]
    assert torch.equal(got.sequences, e.sequences) and torch.equal(got.attention_mask, e.attention_mask)
    for name in ("action_mask", "old_logprobs", "values", "advantages", "scores", "weight_version"):
        assert torch.equal(getattr(got, name), getattr(e, name)), name


def test_trim_drops_padding_columns_only():
    e = _exp(["a", "b"], prompt_lens=[2, 4], resp_lens=[1, 3], P=6, A=5).split()[0]
    t = trim(e)
    assert t.sequences.shape == (1, 3) and t.action_mask.shape == (1, 1)
    assert t.sequences.tolist() == [[1, 2, 100]] and t.attention_mask.sum() == 3
    assert t.values.shape == (1, 1) and torch.equal(t.scores, e.scores)
    assert trim(t) is t
    no_values = _exp(["x"], values=False).split()[0]
    assert trim(no_values).values is None


def test_take_is_fifo_and_clear_counts():
    store = ExperienceStore(limit=10)
    store.put(_exp(["a", "b"], version=0))
    store.put(_exp(["c", "d"], version=1))
    assert store.take(3).sample_ids == ["a", "b", "c"]
    assert store.take(5).sample_ids == ["d"] and store.take(1) is None
    store.put(_exp(["e", "f"]))
    assert store.clear() == 2
    s = store.stats()
    assert (s["put"], s["taken"], s["cleared"], s["size"]) == (6, 4, 2, 0) and s["balanced"]


def test_clear_forget_lets_a_rewound_run_put_the_same_ids_again():
    store = ExperienceStore(limit=10)
    store.put(_exp(["e2-0", "e2-1"]))
    store.take_all()
    assert store.put(_exp(["e2-0", "e2-1"])).accepted == 0  # seen: a repeat is dropped
    store.clear(forget=True)
    assert store.put(_exp(["e2-0", "e2-1"])).accepted == 2
    assert [str(i) for b in store.take_all() for i in b.sample_ids] == ["e2-0", "e2-1"]


# ------------------------------------------------------------------------------------------ Ray actor


@pytest.fixture
def buffer(ray_session):
    from relay.buffer.actor import start_buffer

    buf = start_buffer(limit=8, name="buffer", seed=0, put_timeout_s=30, num_cpus=0.1, timeout_s=60)
    yield buf
    buf.kill()
    time.sleep(0.5)  # let the name free up for the next test


def test_actor_is_named_and_sync_mode_round_trip(buffer, ray_session):
    assert ray_session.get_actor("relay/buffer", namespace="relay") is not None
    buffer.put(_exp([f"e0-{i}" for i in range(4)], version=0))
    buffer.put(_exp([f"e1-{i}" for i in range(4)], version=0))
    for epoch in range(2):  # PPO epochs over one episode
        batches = buffer.sample(3, seed=epoch)
        assert sorted(s for b in batches for s in b.sample_ids) == sorted(
            [f"e0-{i}" for i in range(4)] + [f"e1-{i}" for i in range(4)])
    assert buffer.clear() == 8
    s = buffer.stats(current_version=1)
    assert s["put"] == 8 and s["cleared"] == 8 and s["size"] == 0 and s["balanced"]


def test_actor_put_blocks_until_take_frees_room(buffer):
    buffer.put(_exp([f"a{i}" for i in range(6)]))
    with pytest.raises(BufferFull):
        buffer.put(_exp([f"b{i}" for i in range(4)]), timeout_s=0.2)
    assert buffer.size() == 6
    ref = buffer.put_async(_exp([f"b{i}" for i in range(4)]), timeout_s=30)
    import ray

    ready, _ = ray.wait([ref], timeout=1.0)
    assert not ready, "put should wait while the buffer is full"
    taken = buffer.take(3)
    assert taken.sample_ids == ["a0", "a1", "a2"]
    result = ray.get(ref, timeout=30)
    assert result.accepted == 4 and buffer.size() == 7
    with pytest.raises(ValueError, match="can never fit"):
        buffer.put(_exp([f"z{i}" for i in range(9)]))


def test_actor_async_mode_many_producers_nothing_lost_or_doubled(buffer):
    """4 producer threads put 40 batches (with deliberate re-puts) while a learner takes, evicting stale
    samples as the version advances: every sample ends up taken or dropped exactly once."""
    version = {"v": 0}
    produced: set[str] = set()
    lock = threading.Lock()

    def producer(k: int) -> None:
        for j in range(10):
            ids = [f"p{k}-{j}-{i}" for i in range(3)]
            exp = _exp(ids, version=version["v"])
            buffer.put(exp, timeout_s=30)
            if j % 3 == 0:
                assert buffer.put(exp, timeout_s=30).accepted == 0  # a retry is harmless
            with lock:
                produced.update(ids)

    threads = [threading.Thread(target=producer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    taken: list[str] = []
    dropped = 0
    deadline = time.monotonic() + 120
    while (any(t.is_alive() for t in threads) or buffer.size()) and time.monotonic() < deadline:
        dropped += buffer.evict_stale(version["v"], max_staleness=1)
        batch = buffer.take(4, timeout_s=0.2)
        if batch is not None:
            taken.extend(batch.sample_ids)
            version["v"] += 1  # one "update" per batch taken
    for t in threads:
        t.join(timeout=10)
    s = buffer.stats(version["v"])
    assert len(produced) == 120
    assert len(taken) == len(set(taken)), "a sample was taken twice"
    assert len(taken) + dropped == 120 and set(taken) <= produced
    assert s["put"] == 120 and s["taken"] == len(taken) and s["dropped"] == dropped and s["balanced"]
    assert s["duplicates"] == 4 * 4 * 3 and s["size"] == 0  # 4 re-puts of 3 samples per producer
