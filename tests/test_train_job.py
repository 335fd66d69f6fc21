"""`relay sft|rm|dpo` as Ray jobs: `ray job submit --working-dir . -- relay ...` against a local cluster that this
test starts with `ray start --head --block` (ended by signalling that process: `ray stop` would stop every Ray
cluster on the machine, other people's included). Data comes from `relay data demo -t tiny`, as in the README.
"""
from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

pytest.importorskip("colossalai")

pytestmark = [pytest.mark.ray, pytest.mark.slow]

from jobs_util import BIN, cluster, job_env, submit  # noqa: F401  (cluster is a fixture)


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
