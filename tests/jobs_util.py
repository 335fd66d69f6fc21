"""A private Ray head node for tests that submit jobs (`ray start --head --block`, ended by signalling that
process: `ray stop` would stop every Ray cluster on the machine, other people's included).

Token authentication is on as for a cluster a user starts: the head reads the session's token file
(RAY_AUTH_TOKEN_PATH, tests/conftest.py), and job submission passes the token in RAY_AUTH_TOKEN, as a user
submitting from another machine would."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from relay.cluster.calls import free_port  # outside the ephemeral range: no race with outgoing connections
from relay.launch import ray_auth

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: `ray`, `relay`
EXCLUDES = [".git", ".venv", "outputs", "runs", "wandb", "**/__pycache__", "*.egg-info", ".pytest_cache"]
# As the README's runtime env has it: `ray job stop` SIGKILLs a job this long after its SIGTERM (Ray's default, 3 s,
# is shorter than a checkpoint takes), read by each job's supervisor from the job's env vars.
JOB_ENV_VARS = {"RAY_JOB_STOP_WAIT_TIME_S": "120"}


def job_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    # The cluster's processes inherit PATH: job entrypoints find the venv's `relay` (and its python) there.
    env.update(PATH=f"{BIN}:{env.get('PATH', '')}", RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0",
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    return env


def submit_env() -> dict[str, str]:
    """`ray job submit`'s environment: the token itself in RAY_AUTH_TOKEN (`ray get-auth-token` prints it)."""
    env = {k: v for k, v in job_env().items() if k != ray_auth.TOKEN_PATH_ENV}
    env[ray_auth.TOKEN_ENV] = ray_auth.token() or ""
    return env


def api(address: str, path: str, timeout: float = 10) -> bytes:
    """GET from the dashboard's HTTP API with the token, as Ray's SDK sends it."""
    request = urllib.request.Request(f"{address}{path}", headers=ray_auth.headers())
    with urllib.request.urlopen(request, timeout=timeout) as r:
        return r.read()


@contextlib.contextmanager
def start_cluster(num_cpus: int = 16):
    """A private head node: own temp dir (short: Unix socket paths are limited) and free ports throughout.
    `num_cpus` is logical: room for PPO's actors and SFT/RM/DPO's learner ranks at once (tests/test_jobs.py)."""
    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")
    dash = free_port()
    ports = {flag: free_port() for flag in (
        "--port", "--ray-client-server-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port", "--metrics-export-port", "--node-manager-port", "--object-manager-port")}
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--dashboard-host", "127.0.0.1", "--dashboard-port",
           str(dash), "--include-dashboard", "true", "--num-cpus", str(num_cpus), "--temp-dir", temp, "--disable-usage-stats"]
    cmd += [str(x) for kv in ports.items() for x in kv]
    log = open(Path(temp) / "start.log", "w")
    proc = subprocess.Popen(cmd, env=job_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                api(address, "/api/version", timeout=2)  # needs the token too
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"ray start failed: {(Path(temp) / 'start.log').read_text()[-3000:]}")
                time.sleep(1)
        yield address
    finally:
        # `ray start --block` ends the whole node when one of its processes dies (e.g. its dashboard agent, seen
        # once under load 10): keep the logs of a node that ended on its own, to say why.
        ended = proc.poll()
        proc.send_signal(signal.SIGTERM)  # --block: the node stops the processes it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # only this cluster's session
        log.close()
        if ended is None:
            shutil.rmtree(temp, ignore_errors=True)
        else:
            print(f"\n[jobs] the private head node ended by itself (exit {ended}): its logs are kept in {temp}")


def submit(address: str, jobs: dict[str, list[str]], tries: int = 4) -> None:
    """`ray job submit --no-wait --working-dir REPO ... -- ENTRYPOINT` for each submission id -> entrypoint, all at
    once: each CLI start costs seconds of CPU, and the uploads are one package (same content, same hash). A
    submission the dashboard turns away because its job agent is not up yet ("No available agent", seen on a
    loaded machine) is tried again, up to `tries` times in all."""
    runtime_env = json.dumps({"excludes": EXCLUDES, "env_vars": JOB_ENV_VARS})
    procs = {sid: subprocess.Popen(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--submission-id", sid, "--no-wait",
         "--working-dir", str(REPO), "--runtime-env-json", runtime_env, "--", *entrypoint],
        env=submit_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    ) for sid, entrypoint in jobs.items()}
    retry = {}
    for sid, proc in procs.items():
        out, _ = proc.communicate(timeout=120)
        if proc.returncode != 0 and "No available agent" in out and tries > 1:
            retry[sid] = jobs[sid]
            continue
        assert proc.returncode == 0, f"ray job submit {sid} failed:\n{out[-3000:]}"
    if retry:
        time.sleep(5.0)
        submit(address, retry, tries - 1)


def listed_entrypoints(address: str) -> dict[str, str]:
    """submission id -> entrypoint of every job the cluster lists (the jobs API behind `ray job list`)."""
    from ray.job_submission import JobSubmissionClient

    return {job.submission_id: job.entrypoint for job in JobSubmissionClient(address).list_jobs() if job.submission_id}


@pytest.fixture(scope="module")
def cluster():
    """Module-scoped private cluster; yields the dashboard / job-submission address."""
    with start_cluster() as address:
        yield address


def wait_for_job(address: str, submission_id: str, timeout_s: float, expect: str = "SUCCEEDED") -> str:
    """Wait until the job ends; return its logs, failing the test unless it ended as `expect` (a JobStatus)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = client.get_job_status(submission_id)
        if status.is_terminal():
            logs = client.get_job_logs(submission_id)
            assert status == JobStatus(expect), f"{submission_id}: {status}\n{logs[-4000:]}"
            return logs
        time.sleep(2)
    raise AssertionError(f"{submission_id} still running after {timeout_s:.0f} s:\n{client.get_job_logs(submission_id)[-3000:]}")


def stop_job(address: str, submission_id: str, timeout_s: float = 300) -> None:
    """`ray job stop`, as a user stops a job (SIGTERM to its driver; it waits until the job has ended)."""
    out = subprocess.run([str(BIN / "ray"), "job", "stop", "--address", address, submission_id], env=submit_env(),
                         capture_output=True, text=True, timeout=timeout_s)
    assert out.returncode == 0, f"ray job stop {submission_id} failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}"
