"""Fault matrix, learner ranks: an actor rank (tensor-parallel peer of a 2-rank group) and the critic's rank
SIGKILLed by PID in the middle of a PPO run; real everything (vLLM generator, ColossalAI 3d tp=2 actor group,
ddp critic, reference, rule reward, buffer), fp32, sync mode.

The run saves every 2 episodes. Actor rank 1 dies as episode 3's update goes out (the surviving rank waits for
it in the tensor-parallel collective); later the critic's rank dies as episode 4 is scored. Each time the driver
rebuilds both groups from the episode-2 checkpoint and runs the episodes since again.

Checked: the run finishes its 4 episodes; metrics.jsonl has steps 1..4 once each; in the run's final history
every episode trained on its own 8 samples once (sample ids counted); the killed processes are gone; the driver
logged the restart and metrics count it (restarts_learners); and the final actor and critic weights equal an
uninterrupted run's (same config and seed) within 1e-6 relative.

A full /dev/shm: the uninterrupted run has its shared-memory root ($RELAY_SHM_DIR) on a filled 1 MiB tmpfs
(where the test may mount one) and falls back to disk with one line.

The driver itself: a `relay ppo` process SIGKILLed once its episode-2 checkpoint is complete, then the same
command with `--resume auto` finishes the run: steps 1..4 once each in metrics.jsonl, and the published actor
equals the uninterrupted run's within 1e-6.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
EPISODES = 4


def _sets(prompt_data, save_dir) -> list[str]:
    return [f"prompt_dataset={prompt_data}", f"save_dir={save_dir}", "logging.use_tensorboard=false",
            "cluster.timeout_s=300", "generation.max_new_tokens=12", "generation.num_generators=1",
            f"algo.num_episodes={EPISODES}", "save_interval=2", "save_every_minutes=0", "cluster.max_restarts=2"]


def _cfg(prompt_data, save_dir):
    from relay.config import load_config, validate

    cfg = load_config("ppo", REPO / "configs/ppo_tiny.yaml", _sets(prompt_data, save_dir))
    validate(cfg, "cpu")
    return cfg


def _weights(system) -> dict:
    return {"actor": system.actor.full_state_dict(), "critic": system.critic.full_state_dict()}


@pytest.fixture(scope="module")
def full_shm():
    """A 1 MiB tmpfs filled to the last byte (None where this process may not mount one)."""
    import tempfile

    mnt = tempfile.mkdtemp(prefix="relay-fullshm-")
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", mnt],
                        capture_output=True).returncode == 0
    if ok:
        fd = os.open(os.path.join(mnt, "filler"), os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:  # ENOSPC: full
            pass
        finally:
            os.close(fd)
    try:
        yield Path(mnt) if ok else None
    finally:
        if ok:
            subprocess.run(["umount", mnt], capture_output=True)
        os.rmdir(mnt)


@pytest.fixture(scope="module")
def uninterrupted(ray_session, tiny_demo_data, tmp_path_factory, full_shm):
    """The reference run, with its shared-memory root on a full tmpfs where one could be mounted."""
    import logging

    from relay.launch.ppo import PPOSystem

    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("relay.scratch").addHandler(handler)
    old = os.environ.get("RELAY_SHM_DIR")
    if full_shm is not None:
        os.environ["RELAY_SHM_DIR"] = str(full_shm)
    try:
        system = PPOSystem(_cfg(tiny_demo_data / "prompt", tmp_path_factory.mktemp("plain") / "plain")).start()
        try:
            system.run_episodes()
            return {**_weights(system), "scratch_lines": lines, "sync": system.last_sync}
        finally:
            system.close()
    finally:
        logging.getLogger("relay.scratch").removeHandler(handler)
        if old is None:
            os.environ.pop("RELAY_SHM_DIR", None)
        else:
            os.environ["RELAY_SHM_DIR"] = old


def test_full_shared_memory_sends_weights_through_disk_from_the_learner(uninterrupted, full_shm):
    """The shared-memory root ($RELAY_SHM_DIR, which reaches every actor) was a full tmpfs: the actor's rank 0
    wrote its transfer buckets on disk instead, the run finished its 4 episodes (the other tests compare its
    weights), and the driver made no weight folder at all (it once exported every update there)."""
    import tempfile

    if full_shm is None:
        pytest.skip("cannot mount a tmpfs here (needs root): the full-shared-memory case is not run")
    sync = uninterrupted["sync"]
    assert sync["sender_pid"] != os.getpid() and sync["failures"] == {} and sync["strategies"] == ["shm"]
    assert sync["shm_dir"] == tempfile.gettempdir()
    said = [line for line in uninterrupted["scratch_lines"] if "weight" in line]
    assert said == [], said
    print(f"\n[fault] shared memory full ({full_shm}, 1 MiB tmpfs filled): the learner's transfer folder went to "
          f"{sync['shm_dir']}; no weight folder in the driver")


@pytest.fixture(scope="module")
def fault_system(ray_session, tiny_demo_data, tmp_path_factory, uninterrupted):
    from relay.launch.ppo import PPOSystem

    system = PPOSystem(_cfg(tiny_demo_data / "prompt", tmp_path_factory.mktemp("faults") / "learners")).start()
    trained: dict[int, list[str]] = {}  # episode -> sample ids of its last (final-history) training
    real_take_all = system.buffer.take_all

    def take_all(*args, **kwargs):
        batches = real_take_all(*args, **kwargs)
        trained[system.state.episode] = [str(s) for b in batches for s in b.sample_ids]
        return batches

    system.buffer.take_all = take_all
    try:
        yield system, trained
    finally:
        system.close()


def _kill_before(system, role: str, method: str, rank: int, episode: int) -> dict:
    """SIGKILL `role`'s rank `rank` just before `method` of that group goes out in 0-based `episode`."""
    group = getattr(system, role)
    pid = group.pids()[rank]
    killed: dict = {}
    real = getattr(group, method)

    def spy(*args, **kwargs):
        if not killed and system.state.episode == episode:
            os.kill(pid, signal.SIGKILL)
            killed.update(pid=pid, t0=time.monotonic())
        return real(*args, **kwargs)

    setattr(group, method, spy)
    return killed


def _check_history(system, trained, restarts: int, out: str, killed: dict, what: str) -> None:
    from relay.metrics import read_metrics

    assert killed, "the kill did not happen"
    with pytest.raises(ProcessLookupError):
        os.kill(killed["pid"], 0)
    done = system.state.episode
    rows = read_metrics(system.save_dir)
    assert [r["step"] for r in rows] == list(range(1, done + 1)), [r["step"] for r in rows]
    for ep in range(done):
        ids = trained[ep]
        assert len(ids) == len(set(ids)) == 8 and all(s.startswith(f"e{ep}-") for s in ids), (ep, ids)
        assert rows[ep]["samples"] == 8 and rows[ep]["weight_version"] == ep + 1, rows[ep]
    assert rows[-1]["restarts_learners"] == restarts, rows[-1]
    assert f"learner {what} died in episode" in out and "restarting the learner groups from" in out, out[-3000:]
    assert "step-00000002" in out.split(f"learner {what} died", 1)[1].splitlines()[0], out[-3000:]
    for line in out.splitlines():
        if "learner" in line and ("died" in line or "back in" in line):
            print(f"[fault]   {line.strip()[:240]}")


def test_killed_actor_rank_restarts_the_groups_from_the_checkpoint(fault_system, capsys):
    system, trained = fault_system
    killed = _kill_before(system, "actor", "start_train_step", rank=1, episode=2)
    t0 = time.monotonic()
    records = system.run_episodes(until=3)
    out = capsys.readouterr().err
    assert [r["episode"] for r in records] == [1, 2, 3]
    _check_history(system, trained, 1, out, killed, "actor rank 1")
    print(f"\n[fault] actor rank 1 SIGKILLed in episode 3: 3 episodes in {time.monotonic() - t0:.1f} s "
          f"including the rebuild and episode 3 run twice")


def test_killed_critic_rank_and_final_weights_match_an_uninterrupted_run(fault_system, uninterrupted, capsys):
    system, trained = fault_system
    if system.state.episode != 3:
        pytest.skip("needs the state test_killed_actor_rank_restarts_the_groups_from_the_checkpoint leaves")
    killed = _kill_before(system, "critic", "forward_values", rank=0, episode=3)
    system.run_episodes(until=EPISODES)
    out = capsys.readouterr().err
    _check_history(system, trained, 2, out, killed, "critic rank 0")
    got = _weights(system)
    worst = 0.0
    for role in ("actor", "critic"):
        ref = uninterrupted[role]
        assert got[role].keys() == ref.keys()
        for name, want in ref.items():
            rel = float((got[role][name].double() - want.double()).norm() / want.double().norm().clamp_min(1e-12))
            worst = max(worst, rel)
            assert rel <= 1e-6, (role, name, rel)
    print(f"\n[fault] after 2 learner restarts the final actor and critic weights match an uninterrupted run: "
          f"largest relative difference {worst:.2e}")


def test_killed_driver_finishes_with_resume_auto(ray_session, tiny_demo_data, tmp_path, uninterrupted):
    from safetensors.torch import load_file

    from relay.learners.checkpoint_store import checkpoint_dir, complete_checkpoints
    from relay.metrics import read_metrics

    save_dir = tmp_path / "driver"
    address = ray_session.get_runtime_context().gcs_address
    cmd = [str(Path(sys.executable).parent / "relay"), "ppo", "--config", str(REPO / "configs/ppo_tiny.yaml")]
    for item in _sets(tiny_demo_data / "prompt", save_dir) + [f"cluster.address={address}"]:
        cmd += ["--set", item]
    first_log = (tmp_path / "first.log").open("w")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=first_log, stderr=subprocess.STDOUT)
    try:
        while not complete_checkpoints(save_dir) and proc.poll() is None and time.monotonic() - t0 < 600:
            time.sleep(0.2)
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        proc.kill()  # SIGKILL: no safe point, no cleanup
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_at = time.monotonic() - t0
    assert complete_checkpoints(save_dir) == [checkpoint_dir(save_dir, 2)]
    out = subprocess.run(cmd + ["--resume", "auto"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert f"resumed from {checkpoint_dir(save_dir, 2)}: episode 2" in out.stderr, out.stderr[-3000:]
    rows = read_metrics(save_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["samples"] == 8 for r in rows), rows
    actor = load_file(next((save_dir / "actor").glob("*.safetensors")))
    worst = 0.0
    for name, want in uninterrupted["actor"].items():
        got = actor[name].double()
        worst = max(worst, float((got - want.double()).norm() / want.double().norm().clamp_min(1e-12)))
    assert worst <= 1e-6, worst
    print(f"\n[fault] driver SIGKILLed {killed_at:.1f} s in (after the episode-2 checkpoint); --resume auto "
          f"finished episodes 3-4; final actor vs uninterrupted run: largest relative difference {worst:.2e}")


def test_a_second_run_of_the_same_name_is_refused_before_it_starts_anything(ray_session, tiny_demo_data, tmp_path):
    """Runs of other names share the cluster (the driver test above ran beside `learners`); one of the same name
    would take its actors' names, so it stops at once, naming what is in the way."""
    from relay.cluster.options import NAMESPACE
    from relay.launch.ppo import PPOSystem

    @ray_session.remote
    class Stand:
        def ping(self):
            return 1

    held = Stand.options(name="relay/control-twin", namespace=NAMESPACE).remote()
    ray_session.get(held.ping.remote())
    try:
        system = PPOSystem(_cfg(tiny_demo_data / "prompt", tmp_path / "twin"))
        with pytest.raises(RuntimeError, match=r"a run named 'twin' is already on this cluster \(relay/control-twin\)"):
            system._claim_run_name(wait_s=1.0)
    finally:
        ray_session.kill(held)
