"""`relay sft` stopped by SIGTERM mid-run (what `ray job stop` and preemption send) writes a checkpoint at the next
step, removes its temp files, exits with 143 and the command that continues it; that command (`--resume auto`)
finishes the run with every step logged once. Real Ray + ColossalAI on a tiny Llama."""
from __future__ import annotations

import json
import shlex
import signal
import subprocess
import time

import pytest

pytest.importorskip("colossalai")

pytestmark = [pytest.mark.ray, pytest.mark.slow]

from jobs_util import BIN, REPO, job_env  # noqa: E402

STEPS = 12


def metrics_steps(run) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]


def test_sigterm_stops_at_a_safe_point_and_resume_auto_finishes(ray_session, tiny_demo_data, tmp_path):
    run = tmp_path / "sft"
    # on the suite's cluster, as a job's driver is on its cluster (and no cluster start per run)
    address = ray_session.get_runtime_context().gcs_address
    args = ["sft", "--config", "configs/sft_tiny.yaml", "--set", f"dataset={tiny_demo_data / 'sft'}",
            "--set", f"save_dir={run}", "--set", "learner.num_ranks=1", "--set", f"max_steps={STEPS}",
            "--set", "save_interval=0", "--set", "logging.use_tensorboard=false", "--set", f"cluster.address={address}"]
    out_file, err_file = tmp_path / "stdout.txt", tmp_path / "stderr.txt"  # files: a full pipe would block it
    with out_file.open("w") as out, err_file.open("w") as errs:
        proc = subprocess.Popen([str(BIN / "relay"), *args], cwd=REPO, env=job_env(), stdout=out, stderr=errs)
        try:
            deadline = time.monotonic() + 300
            while len(metrics_steps(run)) < 2:  # training is under way (Ray, the learner group and data are up)
                assert proc.poll() is None, err_file.read_text()[-4000:]
                assert time.monotonic() < deadline, "no training step within 300 s"
                time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    err = err_file.read_text()
    assert proc.returncode == 128 + signal.SIGTERM, err[-4000:]
    assert "[relay] received SIGTERM: stopping at the next safe point" in err
    done = metrics_steps(run)
    assert 2 <= len(done) < STEPS and done == list(range(1, len(done) + 1))
    ckpt = run / "checkpoints" / f"step-{done[-1]:08d}"
    assert (ckpt / "COMPLETE").exists()  # save_interval=0: this checkpoint exists only because of the stop
    last = next(line for line in err.splitlines() if line.startswith("relay sft: stopped by "))
    assert last.startswith(f"relay sft: stopped by SIGTERM after step {done[-1]} of {STEPS}; checkpoint {ckpt}. "
                           "To continue: relay sft ")
    assert last.endswith(" --resume auto"), last
    assert not [p for p in run.rglob("*") if ".tmp-" in p.name], "temp folders left behind"
    assert not (run / "model").exists()

    command = shlex.split(last.split("To continue: ", 1)[1])
    assert command[:2] == ["relay", "sft"]
    resumed = subprocess.run([str(BIN / "relay"), *command[1:]], cwd=REPO, env=job_env(), capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resume auto: resuming from {ckpt}" in resumed.stdout
    assert metrics_steps(run) == list(range(1, STEPS + 1))  # nothing lost, nothing twice
    assert (run / "model" / "config.json").exists()
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == [ckpt.name, f"step-{STEPS:08d}"]
