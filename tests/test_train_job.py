"""`relay sft|rm|dpo` as Ray jobs: `ray job submit --working-dir . -- relay ...` against a local cluster that this
test starts with `ray start --head --block` (ended by signalling that process: `ray stop` would stop every Ray
cluster on the machine, other people's included). Data comes from `relay data demo -t tiny`, as in the README.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("colossalai")

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: `ray`, `relay`
EXCLUDES = [".git", ".venv", "outputs", "runs", "wandb", "**/__pycache__", "*.egg-info", ".pytest_cache"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    # The cluster's processes inherit PATH: job entrypoints find the venv's `relay` (and its python) there.
    env.update(PATH=f"{BIN}:{env.get('PATH', '')}", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    return env


@pytest.fixture(scope="module")
def cluster():
    """A private head node: own temp dir (short: Unix socket paths are limited) and free ports throughout."""
    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")
    dash = free_port()
    ports = {flag: free_port() for flag in (
        "--port", "--ray-client-server-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port", "--metrics-export-port", "--node-manager-port", "--object-manager-port")}
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--dashboard-host", "127.0.0.1", "--dashboard-port",
           str(dash), "--include-dashboard", "true", "--num-cpus", "8", "--temp-dir", temp, "--disable-usage-stats"]
    cmd += [str(x) for kv in ports.items() for x in kv]
    log = open(Path(temp) / "start.log", "w")
    proc = subprocess.Popen(cmd, env=job_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"ray start failed: {(Path(temp) / 'start.log').read_text()[-3000:]}")
                time.sleep(1)
        yield address
    finally:
        proc.send_signal(signal.SIGTERM)  # --block: the node stops the processes it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # only this cluster's session
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def submit(address: str, submission_id: str, *entrypoint: str) -> None:
    runtime_env = json.dumps({"excludes": EXCLUDES})
    subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--submission-id", submission_id, "--no-wait",
         "--working-dir", str(REPO), "--runtime-env-json", runtime_env, "--", *entrypoint],
        env=job_env(), check=True, timeout=120, capture_output=True,
    )


def test_each_stage_runs_as_a_ray_job(cluster, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    data = tmp_path / "data"
    subprocess.run([str(BIN / "relay"), "data", "demo", str(data), "--sft", "32", "--preference", "32", "--prompt", "2",
                    "--ptx", "2", "-t", "tiny", "--max-length", "128"], env=job_env(), check=True, timeout=300,
                   capture_output=True)
    out = tmp_path / "runs"
    # Paths are absolute: a job runs inside an uploaded copy of the working dir (outputs/ is excluded).
    jobs = {
        "sft": ["relay", "sft", "--config", "configs/sft_tiny.yaml", "--set", f"dataset={data / 'sft'}",
                "--set", f"save_dir={out / 'sft'}", "--set", "max_steps=2", "--set", "logging.use_wandb=true"],
        "rm": ["relay", "rm", "--config", "configs/rm_tiny.yaml", "--set", f"dataset={data / 'preference'}",
               "--set", f"save_dir={out / 'rm'}", "--set", "max_steps=2"],
        "dpo": ["relay", "dpo", "--config", "configs/dpo_tiny.yaml", "--set", f"dataset={data / 'preference'}",
                "--set", f"save_dir={out / 'dpo'}", "--set", "max_steps=2", "--set", "precompute_ref_logprobs=true"],
    }
    ids = {stage: f"relay-test-{stage}-{os.getpid()}" for stage in jobs}
    for stage, cmd in jobs.items():  # all three at once: the cluster has room, and the 2-core machine overlaps them
        submit(cluster, ids[stage], *cmd)
    client = JobSubmissionClient(cluster)
    deadline = time.monotonic() + 420
    pending = dict(ids)
    while pending and time.monotonic() < deadline:
        for stage, sid in list(pending.items()):
            status = client.get_job_status(sid)
            if status.is_terminal():
                assert status == JobStatus.SUCCEEDED, f"{stage}: {status}\n{client.get_job_logs(sid)[-4000:]}"
                del pending[stage]
        time.sleep(2)
    assert not pending, {s: client.get_job_logs(i)[-2000:] for s, i in pending.items()}

    for stage in jobs:
        run = out / stage
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2]
        assert (run / "model" / "config.json").exists() and list((run / "model").glob("*.safetensors"))
        assert (run / "checkpoints" / "step-00000002" / "COMPLETE").exists()
        assert "attention: sdpa" in client.get_job_logs(ids[stage])
    assert list((out / "sft" / "logs" / "wandb").glob("offline-run-*"))  # wandb, offline
