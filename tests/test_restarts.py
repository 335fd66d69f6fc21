"""Restart decisions (relay.restarts) and the buffer exchange (relay.launch.ppo_buffer), without Ray: fake
actors that lose their state, fake loss errors."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from relay.launch.ppo_buffer import BufferMismatch, check_exactly_once, exchange
from relay.restarts import ActorLost, RestartWatch, call_or_explain, lost_message, redo_on_loss, restart_options


class Lost(Exception):
    """Stands for ray.exceptions.RayActorError."""


def is_lost(err: BaseException) -> bool:
    return isinstance(err, Lost)


def test_restart_options_retry_calls_only_for_idempotent_actors():
    assert restart_options(3) == {"max_restarts": 3, "max_task_retries": 3}
    assert restart_options(3, retry_calls=False) == {"max_restarts": 3, "max_task_retries": 0}
    assert restart_options(0) == {"max_restarts": 0, "max_task_retries": 0}
    with pytest.raises(ValueError):
        restart_options(-1)


def test_watch_counts_pid_changes_once_each():
    w = RestartWatch(max_restarts=3)
    assert w.observe("relay/ref", 10) is None and w.observe("relay/ref", 10) is None
    msg = w.observe("relay/ref", 11)
    assert msg and "relay/ref was restarted" in msg and "10 -> 11" in msg and "1 of 3" in msg
    assert w.observe("relay/reward", 20) is None
    assert w.counts() == {"restarts_ref": 1, "restarts_reward": 0}
    w.observe("relay/ref", 12)
    assert w.counts()["restarts_ref"] == 2
    w.observe("relay/buffer@run-7", 30)
    assert w.observe("relay/buffer@run-7", 31) and w.counts()["restarts_buffer"] == 1  # the metric names the role


def test_redo_on_loss_redoes_whole_work_then_gives_up_naming_the_role():
    calls, notes, sleeps = [], [], []

    def work(attempt):
        calls.append(attempt)
        if attempt < 2:
            raise Lost("actor died")
        return "done"

    assert redo_on_loss(work, "relay/buffer", 3, is_loss=is_lost, note=notes.append, sleep=sleeps.append) == "done"
    assert calls == [0, 1, 2] and len(notes) == 2 and "relay/buffer" in notes[0] and sleeps == [0.5, 1.0]

    def always(attempt):
        raise Lost("gone")

    with pytest.raises(ActorLost, match=r"relay/buffer died .*cluster.max_restarts=2") as info:
        redo_on_loss(always, "relay/buffer", 2, is_loss=is_lost, sleep=lambda s: None)
    assert isinstance(info.value.__cause__, Lost)


class Restarting(Lost):
    """Stands for ray.exceptions.ActorUnavailableError ("The actor is restarting")."""


def test_redo_on_loss_waits_for_a_slow_restart_without_counting_it_as_a_loss():
    """One loss, then the restarted actor needs longer than the first waits (a loaded machine): the retries
    that find it still restarting wait on instead of using up the restarts; a restart that never ends is
    given up after `restart_wait_s`."""
    now = [0.0]
    calls, notes, sleeps = [], [], []

    def sleep(s):
        sleeps.append(s)
        now[0] += s

    def work(attempt):
        calls.append(attempt)
        if attempt == 0:
            raise Lost("actor died")
        if attempt < 5:
            raise Restarting("the actor is restarting")
        return "done"

    kw = {"is_loss": is_lost, "is_restarting": lambda e: isinstance(e, Restarting), "sleep": sleep,
          "clock": lambda: now[0]}
    assert redo_on_loss(work, "relay/buffer", 1, note=notes.append, **kw) == "done"
    assert calls == [0, 1, 2, 3, 4, 5] and sleeps == [0.5, 1.0, 2.0, 4.0, 8.0]
    assert "restart 1 of 1" in notes[0] and all("still restarting" in n for n in notes[1:])

    def never_back(attempt):
        raise Lost("actor died") if attempt == 0 else Restarting("the actor is restarting")

    now[0] = 0.0
    with pytest.raises(ActorLost, match="relay/buffer died"):
        redo_on_loss(never_back, "relay/buffer", 1, restart_wait_s=30.0, **kw)
    assert 30.0 < now[0] < 30.0 + 8.0 * 3

    def dies_twice(attempt):  # a second real loss after the restart does count
        raise Lost("died again")

    with pytest.raises(ActorLost):
        redo_on_loss(dies_twice, "relay/buffer", 1, **kw)


def test_redo_on_loss_passes_other_errors_through_at_once():
    calls = []

    def work(attempt):
        calls.append(attempt)
        raise KeyError("a bug, not a lost actor")

    with pytest.raises(KeyError):
        redo_on_loss(work, "relay/buffer", 3, is_loss=is_lost, sleep=lambda s: None)
    assert calls == [0]


def test_call_or_explain_names_the_role():
    with pytest.raises(ActorLost, match="relay/reward died"):
        call_or_explain(lambda: (_ for _ in ()).throw(Lost("x")), "relay/reward", 3, is_loss=is_lost)
    with pytest.raises(ValueError):
        call_or_explain(lambda: (_ for _ in ()).throw(ValueError("x")), "relay/reward", 3, is_loss=is_lost)
    assert call_or_explain(lambda: 5, "relay/reward", 3, is_loss=is_lost) == 5
    assert "max_restarts=0" in lost_message("relay/ref", 0)


def test_check_exactly_once():
    check_exactly_once(["a", "b", "c"], ["c", "a", "b"], 0)
    check_exactly_once(["a", "b", "c"], ["a", "c"], 1)
    for taken, evicted, what in ((["a", "b"], 0, "1 missing"), (["a", "a", "b", "c"], 0, "1 doubled"),
                                 (["a", "b", "c", "z"], 0, "1 not of this episode e.g. z"), ([], 0, "3 missing")):
        with pytest.raises(BufferMismatch, match=what):
            check_exactly_once(["a", "b", "c"], taken, evicted)


# ------------------------------------------------------------------------------- a buffer that can die


@dataclass
class Batch:
    sample_ids: list[str]


@dataclass
class Put:
    size: int
    pid: int


@dataclass
class FakeBuffer:
    """Keyed by sample id like ExperienceStore. `die_at` names calls that kill it once each ('take_all': after
    the take, before the reply); it comes back empty with a new pid (a Ray restart). 'after_put!' kills it right
    after a put that replied, and the restart is over before the next call: no call fails."""

    die_at: list[str] = field(default_factory=list)
    items: dict[str, int] = field(default_factory=dict)
    seen: set[str] = field(default_factory=set)
    pid: int = 100
    name: str = "relay/buffer"

    def _restart(self) -> None:
        self.items, self.seen, self.pid = {}, set(), self.pid + 1

    def _maybe_die(self, call: str) -> None:
        if self.die_at and self.die_at[0] == call:
            self.die_at.pop(0)
            self._restart()
            raise Lost(f"died in {call}")

    def put(self, exp):
        for sid in exp.sample_ids:
            if sid not in self.seen:
                self.items[sid], _ = 0, self.seen.add(sid)
        self._maybe_die("put")
        out = Put(len(self.items), self.pid)
        if self.die_at and self.die_at[0] == "after_put!":
            self.die_at.pop(0)
            self._restart()
        return out

    def evict_stale(self, version, max_staleness):
        self._maybe_die("evict_stale")
        return 0

    def take_all(self):
        ids = list(self.items)
        self.items = {}
        self._maybe_die("take_all")  # taken, then the process died before the reply
        return [Batch(ids)] if ids else []

    def info(self):
        return {"pid": self.pid}


@pytest.mark.parametrize("die_at", [[], ["put"], ["evict_stale"], ["take_all"], ["after_put!"],
                                    ["put", "take_all", "after_put!"]])
def test_exchange_survives_a_restarted_buffer_with_every_sample_once(die_at):
    buf, notes = FakeBuffer(die_at=list(die_at)), []
    out = exchange(buf, Batch(["e0-0", "e0-1", "e0-2"]), version=0, max_staleness=1, max_restarts=3,
                   note=notes.append, is_loss=is_lost, sleep=lambda s: None)
    assert sorted(s for b in out.taken for s in b.sample_ids) == ["e0-0", "e0-1", "e0-2"]
    assert out.attempts == len(die_at) + 1 == buf.pid - 99 and len(notes) == len(die_at)
    assert out.size == 3 and out.evicted == 0


def test_exchange_gives_up_after_max_restarts():
    buf = FakeBuffer(die_at=["put", "after_put!", "put"])
    with pytest.raises(ActorLost, match="relay/buffer"):
        exchange(buf, Batch(["e0-0"]), version=0, max_staleness=None, max_restarts=2, is_loss=is_lost,
                 sleep=lambda s: None)


def test_exchange_refuses_samples_lost_by_a_buffer_that_did_not_restart():
    """A reply lost without a restart (the take happened): the retry finds the ids already seen, and the
    episode would train on nothing. That is an error, never a silent short episode."""

    class Flaky(FakeBuffer):
        def take_all(self):
            ids = list(self.items)
            self.items = {}
            if self.die_at:
                self.die_at.pop(0)
                raise Lost("connection lost after the take")
            return [Batch(ids)] if ids else []

    with pytest.raises(BufferMismatch, match="2 missing"):
        exchange(Flaky(die_at=["take_all"]), Batch(["a", "b"]), version=0, max_staleness=None, max_restarts=3,
                 is_loss=is_lost, sleep=lambda s: None)


def test_learner_deaths_past_the_budget_stop_the_run_saying_how_to_go_on(tmp_path):
    """The PPO driver's learner recovery (relay.launch.ppo_recovery) counts deaths against cluster.max_restarts
    before touching anything; one too many raises LearnerLost naming the rank, the limit and the checkpoint."""
    from types import SimpleNamespace

    from relay.launch.ppo_recovery import LearnerLost, PPORecovery

    system = PPORecovery()
    system.cfg = SimpleNamespace(cluster=SimpleNamespace(max_restarts=1))
    system.last_checkpoint = tmp_path / "checkpoints" / "step-00000002"
    system.learner_restarts = 1  # one rebuild already used
    with pytest.raises(LearnerLost, match=r"learner actor rank 1 died \(RuntimeError: gone\): restart 2 is over "
                                          r"cluster.max_restarts=1, the run stops; `--resume auto` goes on from .*step-00000002"):
        system._recover_learners("actor rank 1", RuntimeError("gone"))
