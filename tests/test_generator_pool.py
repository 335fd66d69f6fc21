"""GeneratorPool: pure bookkeeping (DispatchLedger) without Ray, then one module-scoped pool of real vLLM
generators on the tiny Llama: scaling 1 -> 2 (from another process, through `relay scale`) -> 1 while prompts
are being generated, a generator killed by PID (SIGKILL) with work pending, and weight versions throughout.
Every scenario checks that each prompt was answered exactly once."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from relay.actors.ledger import DONE, EXHAUSTED, IN_FLIGHT, QUEUED, DispatchLedger
from relay.actors.weight_push import local_sender

pytestmark = pytest.mark.usefixtures("no_kept_transfer_folder")

# ------------------------------------------------------------------------------------------ ledger (pure)


def test_ledger_chunks_are_contiguous_runs_of_one_group():
    led = DispatchLedger()
    led.add(["a0", "a1", "a2"], group="A")
    led.add(["b0", "b1"], group="B")
    c1 = led.take("w0", 2)
    assert c1.prompt_ids == ("a0", "a1") and c1.first_position == 0 and c1.group == "A"
    c2 = led.take("w1", 5)  # stops at the group boundary
    assert c2.prompt_ids == ("a2",) and c2.first_position == 2
    c3 = led.take("w0", 5)
    assert c3.prompt_ids == ("b0", "b1") and c3.group == "B"
    assert led.take("w0", 5) is None
    led.check()
    assert led.state("a0") == IN_FLIGHT and led.queued == 0 and led.in_flight == 5


def test_ledger_failed_chunk_is_requeued_in_order_and_late_reply_ignored():
    led = DispatchLedger()
    led.add([f"p{i}" for i in range(6)])
    c1, c2 = led.take("w0", 3), led.take("w1", 3)
    requeued, exhausted = led.fail(c1.chunk_id)
    assert requeued == ["p0", "p1", "p2"] and exhausted == []
    assert led.state("p0") == QUEUED and led.counts.reassigned == 3
    assert led.complete(c1.chunk_id) is None and led.counts.stale == 1  # the dead worker's late reply
    assert led.complete(c2.chunk_id).prompt_ids == ("p3", "p4", "p5")
    c3 = led.take("w2", 10)
    assert c3.prompt_ids == ("p0", "p1", "p2") and c3.first_position == 0
    assert led.attempts("p0") == 2
    led.complete(c3.chunk_id)
    led.check()
    assert led.unfinished() == 0 and led.counts.completed == 6
    assert led.counts.by_worker == {"w1": 3, "w2": 3}


def test_ledger_release_worker_and_requeue_merges_by_submission_order():
    led = DispatchLedger()
    led.add(list(range(10)))
    a, b, c = led.take("w0", 3), led.take("w1", 3), led.take("w0", 2)
    assert led.release_worker("w0") == [0, 1, 2, 6, 7]
    assert list(led._queue) == [0, 1, 2, 6, 7, 8, 9]
    nxt = led.take("w2", 10)
    assert nxt.prompt_ids == (0, 1, 2)  # a gap (3..5 are in flight on w1) ends the run
    led.check()
    assert led.complete(a.chunk_id) is None and led.complete(c.chunk_id) is None
    assert led.complete(b.chunk_id) is not None


def test_ledger_exhausts_after_max_attempts_and_rejects_duplicates():
    led = DispatchLedger(max_attempts=2)
    led.add(["x", "y"])
    with pytest.raises(ValueError):
        led.add(["x"])
    with pytest.raises(ValueError):
        led.add(["z", "z"])
    assert led.fail(led.take("w", 2).chunk_id) == (["x", "y"], [])
    assert led.fail(led.take("w", 2).chunk_id) == ([], ["x", "y"])
    assert led.state("x") == EXHAUSTED and led.counts.exhausted == 2
    led.check()
    led.forget(["x", "y"])
    led.add(["x"])  # forgotten ids may be submitted again
    with pytest.raises(ValueError):
        led.forget(["x"])  # not done


def test_ledger_random_schedule_never_loses_or_doubles():
    rng = random.Random(0)
    led = DispatchLedger(max_attempts=100)
    done: list[str] = []
    n = 0
    for step in range(2000):
        op = rng.random()
        if op < 0.15:
            led.add([f"q{n + i}" for i in range(rng.randint(1, 5))], group=step)
            n = led.counts.submitted
        elif op < 0.5:
            led.take(f"w{rng.randint(0, 3)}", rng.randint(1, 4))
        elif op < 0.8 and led.live_chunks():
            chunk = led.complete(rng.choice(led.live_chunks()).chunk_id)
            done.extend(chunk.prompt_ids)
        elif op < 0.9 and led.live_chunks():
            led.fail(rng.choice(led.live_chunks()).chunk_id)
        else:
            led.release_worker(f"w{rng.randint(0, 3)}")
        led.check()
    while led.unfinished():
        chunk = led.take("w", 100) or led.live_chunks()[0]
        done.extend(led.complete(chunk.chunk_id).prompt_ids)
    assert sorted(done) == sorted(f"q{i}" for i in range(n)) and len(done) == len(set(done))
    assert all(led.state(p) == DONE for p in done)


# ------------------------------------------------------------------------------------------ stall timeout (no Ray)


def test_pool_options_stall_timeout_defaults_to_twice_the_chunk_timeout_and_is_validated():
    from relay.actors.pool import PoolOptions
    from relay.actors.pool_types import stalled

    assert PoolOptions().stall_limit_s() == 1200.0
    assert PoolOptions(generate_timeout_s=30).stall_limit_s() == 60.0
    assert PoolOptions(generate_timeout_s=30, stall_timeout_s=5).stall_limit_s() == 5.0
    for field in ("stall_timeout_s", "generate_timeout_s", "start_timeout_s", "weight_timeout_s",
                  "health_interval_s", "control_poll_s"):
        for bad in (0, -1.0, float("nan"), float("inf"), "10", True):
            with pytest.raises(ValueError, match=f"PoolOptions.{field}"):
                PoolOptions(**{field: bad})
    for bad in (dict(max_attempts=0), dict(max_failures=-1)):
        with pytest.raises(ValueError):
            PoolOptions(**bad)
    # a wait counts from its own start or the last progress, whichever is later
    assert not stalled(started=100, progress_at=0, now=150, limit_s=60)
    assert stalled(started=0, progress_at=10, now=71, limit_s=60)
    assert not stalled(started=0, progress_at=20, now=71, limit_s=60)


class FakeTime:
    """Stands in for the `time` module inside relay.actors.pool: a clock that moves only when told."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def _bare_pool(monkeypatch, **options):
    """A GeneratorPool that starts no generators (no Ray) and whose `_step` the test scripts."""
    from relay.actors import pool as pool_mod

    clock = FakeTime()
    monkeypatch.setattr(pool_mod, "time", clock)
    monkeypatch.setattr(pool_mod.GeneratorPool, "_reconcile", lambda self: None)
    pool = pool_mod.GeneratorPool(object(), 1, pool_mod.PoolOptions(**options), wait=False)
    return pool, clock


def _finish_all(pool) -> None:
    from relay.actors.pool import PromptResult

    chunk = pool._ledger.take("w", 1000)
    pool._ledger.complete(chunk.chunk_id)
    for pid in chunk.prompt_ids:
        pool._done[pid] = PromptResult(pid, [], 0, "w", 1)


def test_generate_without_timeout_gives_up_when_the_pool_makes_no_progress(monkeypatch):
    from relay.cluster.calls import RemoteCallTimeout

    pool, clock = _bare_pool(monkeypatch, generate_timeout_s=30)  # stall limit 60 s
    steps = []

    def step(timeout):  # nothing ever finishes
        steps.append(clock.now)
        clock.now += timeout

    pool._step = step
    start = clock.now
    with pytest.raises(RemoteCallTimeout, match=r"no progress in 60 s .* 3 of 3 prompts not done"):
        pool.generate([[1], [2], [3]])
    assert 60 < clock.now - start <= 60.5 and len(steps) == 121  # stepped until just past the limit
    assert pool.pending() == 3  # the prompts stay queued for a later collect


def test_generate_without_timeout_waits_as_long_as_the_pool_progresses(monkeypatch):
    pool, clock = _bare_pool(monkeypatch, generate_timeout_s=30)

    def step(timeout):  # progress every 50 s (a generator became active, a chunk finished), done at 300 s
        clock.now += timeout
        if clock.now - start >= 300:
            _finish_all(pool)
        elif (clock.now - start) % 50 == 0:
            pool._progress_at = clock.now

    pool._step = step
    start = clock.now
    results = pool.generate([[1], [2]], ids=["a", "b"])
    assert [r.prompt_id for r in results] == ["a", "b"] and clock.now - start == 300


def test_an_explicit_timeout_replaces_the_stall_limit(monkeypatch):
    from relay.cluster.calls import RemoteCallTimeout

    pool, clock = _bare_pool(monkeypatch, generate_timeout_s=30)

    def step(timeout):
        clock.now += timeout

    pool._step = step
    start = clock.now
    with pytest.raises(RemoteCallTimeout, match="not done in 100 s"):
        pool.generate([[1]], timeout_s=100)
    assert clock.now - start > 100


class _Method:
    """`actor.<method>.remote(...)` of a stand-in actor: records the call, returns a token."""

    def __init__(self, calls: list, name: str):
        self.calls, self.name = calls, name

    def remote(self, *args, **kwargs):
        self.calls.append((self.name, args, kwargs))
        return f"ref-{len(self.calls)}"


class _StandIn:
    def __init__(self):
        self.calls: list = []

    def __getattr__(self, name):
        return _Method(self.__dict__["calls"], name)


def _member(pool, name, state, node):
    from relay.actors.pool_types import _Member

    m = _Member(len(pool._members), name, _StandIn(), state=state, node_id=node)
    pool._members[name] = m
    return m


def test_push_takes_a_sender_not_weights_and_keeps_only_refs(monkeypatch):
    """The driver-side API: a state dict is refused (the weights must not pass through the driver); the
    sender gets handles, node ids and names of the active generators and must keep its buckets; the pool keeps
    only the refs it returns (not in the report), and a generator left loading gets them."""
    from relay.actors.pool import PoolOptions

    with pytest.raises(ValueError, match="PoolOptions.push_strategy must be one of auto, shm, object_store"):
        PoolOptions(push_strategy="files")
    pool, _ = _bare_pool(monkeypatch, push_strategy="auto")
    with pytest.raises(TypeError, match="not the weights"):
        pool.push_weights({"w": [0.0, 0.0]}, version=1)  # a state dict (no torch needed to tell)
    a = _member(pool, "g-0", "active", "node-A")
    b = _member(pool, "g-1", "active", "node-B")
    waiting = _member(pool, "g-2", "loading", "node-B")  # no load in flight: waits for a push
    got = []

    def send(push):
        got.append(push)
        return {"version": push.version, "failures": {}, "late": [], "blobs": ["blob-0", "blob-1"]}

    report = pool.push_weights(send, version=3)
    (push,) = got
    assert push.generators == [a.actor, b.actor] and push.nodes == ["node-A", "node-B"]
    assert push.names == ["g-0", "g-1"] and push.keep and push.version == 3 and not push.rewind
    assert "blobs" not in report and pool.version == 3 and pool._weights.blobs == ["blob-0", "blob-1"]
    assert a.version == b.version == 3
    assert waiting.actor.calls == [("update_weights_from_blobs", (3, "blob-0", "blob-1"), {})]
    with pytest.raises(ValueError, match="not newer"):
        pool.push_weights(send, version=3)
    with pytest.raises(ValueError, match="kept no buckets"):
        pool.push_weights(lambda push: {"version": 4, "failures": {}, "late": []}, version=4)
    assert pool.version == 3


def test_a_load_from_lost_buckets_waits_for_the_next_push(monkeypatch):
    """A new generator whose load fails because the kept buckets went with their sender (a dead learner:
    ObjectLostError) is not counted as failed; it stays loading and takes the next push's buckets."""
    import ray

    from relay.actors import pool_dispatch
    from relay.actors.pool_types import _Weights

    pool, _ = _bare_pool(monkeypatch)
    pool._weights = _Weights(2, ["old-blob"])
    m = _member(pool, "g-0", "loading", "node-A")
    pool._refs["load-ref"] = ("load", "g-0")

    def lost(ref, timeout=None):
        raise ray.exceptions.OwnerDiedError("ab" * 14, None, "")

    monkeypatch.setattr(pool_dispatch.ray, "get", lost)
    pool._handle("load-ref")
    assert pool._members["g-0"] is m and m.state == "loading" and pool.counters["failed"] == 0
    pool.push_weights(lambda push: {"version": 3, "failures": {}, "late": [], "blobs": ["new-blob"]}, version=3)
    assert m.actor.calls == [("update_weights_from_blobs", (3, "new-blob"), {})]


# ------------------------------------------------------------------------------------------ real Ray + vLLM

PROMPTS = [[(7 * i + j) % 1000 + 3 for j in range(4 + i % 5)] for i in range(64)]


def _perturbed(model_dir: Path, seed: int, scale: float = 0.05):
    import torch
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(seed)
    sd = load_file(str(model_dir / "model.safetensors"))
    return {n: t + scale * torch.randn(t.shape, generator=g) for n, t in sd.items()}


def _check_exactly_once(results, ids):
    got = [r.prompt_id for r in results]
    assert sorted(map(str, got)) == sorted(map(str, ids)), "a prompt was lost"
    assert len(got) == len(set(got)), "a prompt was answered twice"
    for r in results:
        assert len(r.samples) == 1 and r.samples[0].token_ids


@pytest.fixture(scope="module")
def pool(ray_session, tiny_llama_dir, tmp_path_factory):
    from relay.actors.generator import GeneratorConfig
    from relay.actors.pool import GeneratorPool, PoolOptions

    cfg = GeneratorConfig(model=str(tiny_llama_dir), max_model_len=256)
    opts = PoolOptions(name_prefix="generator", max_chunk_size=4, control_name="control-pooltest",
                       control_poll_s=0.2, generate_timeout_s=120, weight_timeout_s=120)
    p = GeneratorPool(cfg, 1, opts)
    yield p
    p.shutdown()


def test_a_pool_that_cannot_place_its_generator_says_why_and_leaves_nothing(ray_session, tiny_llama_dir):
    """More CPUs than the cluster has: the start times out naming the generator's Ray state and the free
    resources, and stops what it started (nobody else holds a handle to it)."""
    from relay.actors.generator import GeneratorConfig
    from relay.actors.pool import GeneratorPool, PoolOptions
    from relay.cluster.calls import RemoteCallTimeout

    cfg = GeneratorConfig(model=str(tiny_llama_dir), max_model_len=256)
    opts = PoolOptions(name_prefix="unplaceable", num_cpus=10_000, start_timeout_s=3,
                       control_name="control-unplaceable")
    with pytest.raises(RemoteCallTimeout) as err:
        GeneratorPool(cfg, 1, opts)
    text = str(err.value)
    assert "unplaceable-0: not placed (the cluster has " in text and " CPU and 0 GPU free" in text, text
    deadline, alive = time.monotonic() + 30, ["relay/unplaceable-0", "relay/control-unplaceable"]
    while alive and time.monotonic() < deadline:  # ray.kill is asynchronous: the names go once the GCS has it
        alive = [name for name in alive if _named_actor_exists(ray_session, name)]
        time.sleep(0.2)
    assert not alive, f"still in the cluster after the failed start: {alive}"


def _named_actor_exists(ray, name: str) -> bool:
    try:
        ray.get_actor(name, namespace="relay")
        return True
    except ValueError:
        return False


def _sampling(max_tokens=48, seed=1):
    from relay.actors.sampling import SamplingConfig

    return SamplingConfig(max_tokens=max_tokens, ignore_eos=True, seed=seed)


def test_pool_generate_tags_ids_and_versions(pool, tiny_llama_dir):
    assert list(pool.pids()) == ["generator-0"] and pool.versions() == {"generator-0": 0}
    ids = [f"warm-{i}" for i in range(6)]
    results = pool.generate(PROMPTS[:6], _sampling(8), ids=ids, timeout_s=120)
    assert [r.prompt_id for r in results] == ids
    assert all(r.weight_version == 0 and r.generator == "generator-0" for r in results)
    assert [r.samples[0].prompt_index for r in results] == list(range(6))
    assert results[0].sample_ids() == ["warm-0/0"]
    pool.push_weights(local_sender(_perturbed(tiny_llama_dir, 1)), version=1)
    assert pool.versions() == {"generator-0": 1}
    again = pool.generate(PROMPTS[:2], _sampling(8), timeout_s=120)
    assert all(r.weight_version == 1 for r in again)


def test_bad_requests_and_bad_weights_leave_the_pool_usable(pool, tiny_llama_dir):
    """A prompt the engine refuses fails after max_attempts (PoolError) without killing generators; an
    update that does not fit raises and keeps the previous weights current."""
    from relay.actors.pool import PoolError
    from relay.actors.weight_sync import WeightUpdateError

    failed_before, version = pool.status()["failed"], pool.version
    with pytest.raises(PoolError, match="failed 3 times"):
        pool.generate([[5] * 400], _sampling(4), ids=["too-long"], timeout_s=120)  # > max_model_len
    assert pool.status()["failed"] == failed_before and pool.pending() == 0
    bad = {k: v[:-1] for k, v in _perturbed(tiny_llama_dir, 9).items()}
    with pytest.raises(WeightUpdateError, match="does not fit"):
        pool.push_weights(local_sender(bad), version=version + 5)
    assert pool.version == version and set(pool.versions().values()) == {version}
    ok = pool.generate(PROMPTS[:2], _sampling(4), timeout_s=120)
    assert [r.weight_version for r in ok] == [version, version]


def test_scale_up_from_another_process_mid_generation(pool, ray_session, tiny_llama_dir):
    """1 -> 2 through `relay scale` (a separate process) while prompts are generated: every prompt once, the new
    generator at the current version. The next tests go on with both generators (a generator start is the costly
    part: the kill test replaces one of these two, and the scale-down drains the replacement)."""
    from relay.actors.control import control_status

    if pool.version < 1:  # when run alone
        pool.push_weights(local_sender(_perturbed(tiny_llama_dir, 1)), version=1)
    assert pool.size() == 1 and pool.version == 1
    # A steady stream of small batches (as an async run feeds generators) while the request comes in.
    ids_a: list = []
    address = ray_session.get_runtime_context().gcs_address
    cli = subprocess.Popen(
        [sys.executable, "-m", "relay.launch.cli", "scale", "pooltest", "--generators", "2", "--address", address],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = []
    deadline = time.monotonic() + 240
    while (cli.poll() is None or pool.size() < 2) and time.monotonic() < deadline:
        if pool.pending() < 16:
            ids_a += pool.submit(PROMPTS[:16], _sampling(32))
        results += pool.collect(timeout_s=0.2)
    out, err = cli.communicate(timeout=60)
    assert cli.returncode == 0, err[-2000:]
    assert "requested 2 generators" in out
    assert pool.pending() > 0, "the pool scaled while no work was pending"
    assert pool.size() == 2 and pool.target == 2
    new = [n for n in pool.versions() if n != "generator-0"]
    assert new == ["generator-1"] and pool.versions() == {"generator-0": 1, "generator-1": 1}
    # Batch B joins the rest of the stream; the new generator takes part in the work pending at its start.
    ids_b = pool.submit(PROMPTS[16:64], _sampling(), ids=[f"b{i}" for i in range(48)])
    while pool.pending():
        results += pool.collect(timeout_s=0.5)
    _check_exactly_once(results, ids_a + ids_b)
    assert len(results) == len(ids_a) + 48
    assert {r.generator for r in results} == {"generator-0", "generator-1"}
    assert all(r.weight_version == 1 for r in results), "a generator produced with old weights"
    status = control_status("control-pooltest")
    assert status["desired"] == 2 and status["pool"]["target"] == 2

    # Greedy on both generators gives the same tokens: the new one really holds version-1 weights.
    from relay.actors.sampling import SamplingConfig

    greedy = SamplingConfig(temperature=0, max_tokens=12)
    outs = {n: c.generate(PROMPTS[:3], greedy, timeout_s=60) for n, c in pool.clients().items()}
    a, b = outs.values()
    assert [r.token_ids for r in a] == [r.token_ids for r in b]


def test_killed_generator_is_replaced_with_current_weights(pool, ray_session, tiny_llama_dir):
    """SIGKILL a generator's process while it holds prompts: the pool re-dispatches them, starts
    generator-N (a new name) at the current weight version, and no prompt is lost or answered twice."""
    pool.scale(2, wait=True, timeout_s=240)  # already 2 after the scale-up test
    pool.push_weights(local_sender(_perturbed(tiny_llama_dir, 2)), version=pool.version + 1)
    version = pool.version
    assert set(pool.versions().values()) == {version}
    before = pool.pids()
    victim = max(before)  # the newest
    ids = pool.submit(PROMPTS[:48], _sampling(96, seed=3), ids=[f"k{i}" for i in range(48)])
    pool.collect(timeout_s=0)
    assert pool.status()["members"][victim]["busy"]
    os.kill(before[victim], signal.SIGKILL)
    results = []
    while pool.pending():
        results += pool.collect(timeout_s=0.5)
    _check_exactly_once(results, ids)
    st = pool.status()
    assert st["failed"] == 1 and st["reassigned"] >= 1
    assert any(r.attempts == 2 for r in results), "the victim's prompts were not re-dispatched"
    pool.wait_ready(240)
    after = pool.pids()
    assert victim not in after and len(after) == 2
    replacement = [n for n in after if n not in before][0]
    assert int(replacement.rsplit("-", 1)[1]) > int(victim.rsplit("-", 1)[1])  # indices never reused
    assert before[victim] not in after.values()
    assert pool.versions() == {n: version for n in after}
    # The replacement answers with version-2 weights (same greedy tokens as the survivor).
    from relay.actors.sampling import SamplingConfig

    greedy = SamplingConfig(temperature=0, max_tokens=12)
    outs = [c.generate(PROMPTS[:3], greedy, timeout_s=60) for c in pool.clients().values()]
    assert [r.token_ids for r in outs[0]] == [r.token_ids for r in outs[1]]
    assert all(r.weight_version == version for out in outs for r in out)


def test_scale_down_mid_generation(pool, tiny_llama_dir):
    """2 -> 1 while both generators hold work: the newest is removed after it finished its chunk, every prompt
    once, nothing handed back."""
    if pool.size() < 2:  # when run alone
        pool.scale(2, wait=True, timeout_s=240)
    # 2 -> 1 while both hold a chunk: the removed generator finishes its chunk, then stops.
    ids_c = pool.submit(PROMPTS[:32], _sampling(), ids=[f"c{i}" for i in range(32)])
    pool.collect(timeout_s=0)  # dispatch
    assert all(m["busy"] for m in pool.status()["members"].values())
    removed = pool.status()["members"]
    reassigned = pool.status()["reassigned"]
    pool.scale(1)
    results = []
    while pool.pending():
        results += pool.collect(timeout_s=0.5)
    _check_exactly_once(results, ids_c)
    assert pool.size() == 1 and list(pool.versions()) == ["generator-0"]
    gone = [n for n in removed if n != "generator-0"][0]
    assert any(r.generator == gone for r in results), "drained chunk was lost"
    assert pool.status()["reassigned"] == reassigned  # draining hands nothing back


