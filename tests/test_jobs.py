"""Every pipeline submitted with `ray job submit --working-dir <repo> -- relay ...` to one private head node
(tests/jobs_util.py: `ray start --head --block`, token auth, its own ports and temp dir), as the README's
"Running on a Ray cluster" section does it. The module submits PPO, SFT, RM and DPO at once (a shared cluster, and on
2 cores the jobs' start-ups overlap); each test waits for and checks its own jobs.

Data and outputs are absolute paths on this machine (the suite's `relay data demo -t tiny` folders, pytest's
tmp_path): shared storage, trivially, for a one-node cluster. Only the code travels in the uploaded working dir.

- PPO (tiny GRPO with a KL term, so relay/ref runs too), asked for more episodes than it will run, so it is alive
  until the test stops it (no race with the run's length): once its actors are alive, headless Chromium opens the
  dashboard, is asked for the token, types it like a person would; the Actors page must list Relay's actors by name
  and the Jobs page the submission. Then `ray job stop` (the job's env sets RAY_JOB_STOP_WAIT_TIME_S, as the README
  says to): STOPPED, after the episode under way, with a complete checkpoint in safetensors and the command that
  continues the run; one metrics row per episode with the weight version every generator served, TensorBoard
  events. That command, submitted as a job with one more episode, resumes from the checkpoint and SUCCEEDS: every
  episode once in the metrics, the actor saved as safetensors.
- SFT, RM, DPO: SUCCEEDED, the per-step log line, metrics rows with a finite loss, a complete checkpoint holding
  safetensors weights, the final model folder; the jobs API lists each submission with its entrypoint.
"""
from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("colossalai")

pytestmark = [pytest.mark.ray, pytest.mark.slow]

from browser_util import CHROMIUM, browse  # noqa: E402
from jobs_util import (  # noqa: E402,F401  (cluster: fixture)
    api,
    cluster,
    listed_entrypoints,
    stop_job,
    submit,
    wait_for_job,
)
from relay.launch import ray_auth  # noqa: E402

PPO_EPISODES = 1000  # never reached: the test stops the job
EXPECTED_ACTORS = ["relay/generator-0@ppo", "relay/ref@ppo", "relay/reward@ppo", "relay/actor-rank0@ppo",
                   "relay/buffer@ppo"]  # the run is named after its save_dir, .../ppo
TOKEN_DIALOG = "Authentication Token Required"  # Ray 2.60's dashboard, when a request comes back 401


@dataclass
class Jobs:
    """What the module submitted: submission id and entrypoint per stage, and where the runs write."""
    ids: dict[str, str]
    entrypoints: dict[str, list[str]]
    out: Path


@pytest.fixture(scope="module")
def jobs(cluster, tiny_demo_data, tmp_path_factory) -> Jobs:  # noqa: F811
    out = tmp_path_factory.mktemp("jobs")
    data = tiny_demo_data
    # Paths are absolute: a job runs inside an uploaded copy of the working dir (outputs/ is excluded).
    entrypoints = {
        "ppo": ["relay", "ppo", "--config", "configs/ppo_tiny_grpo.yaml", "--set", f"prompt_dataset={data / 'prompt'}",
                "--set", f"save_dir={out / 'ppo'}", "--set", f"algo.num_episodes={PPO_EPISODES}",
                "--set", "algo.kl_coef=0.01"],  # a KL term, so relay/ref runs too
        "sft": ["relay", "sft", "--config", "configs/sft_tiny.yaml", "--set", f"dataset={data / 'sft'}",
                "--set", f"save_dir={out / 'sft'}", "--set", "max_steps=2", "--set", "logging.use_wandb=true"],
        "rm": ["relay", "rm", "--config", "configs/rm_tiny.yaml", "--set", f"dataset={data / 'preference'}",
               "--set", f"save_dir={out / 'rm'}", "--set", "max_steps=2"],
        "dpo": ["relay", "dpo", "--config", "configs/dpo_tiny.yaml", "--set", f"dataset={data / 'preference'}",
                "--set", f"save_dir={out / 'dpo'}", "--set", "max_steps=2", "--set", "precompute_ref_logprobs=true"],
    }
    ids = {stage: f"relay-test-{stage}-{os.getpid()}" for stage in entrypoints}
    submit(cluster, {ids[stage]: cmd for stage, cmd in entrypoints.items()})
    return Jobs(ids, entrypoints, out)


def alive_actor_names(address: str) -> set[str]:
    data = json.loads(api(address, "/api/v0/actors?limit=1000&detail=false"))
    rows = data.get("data", {}).get("result", {}).get("result", [])
    return {row.get("name") for row in rows if row.get("state") == "ALIVE" and row.get("name")}


def dashboard_pages(address: str, token: str, submission_id: str, shots: Path):
    """The Actors page as a person sees it (the token dialog first, then the page once the token is typed), then
    the Jobs page with the same cookie."""
    async def steps(page):
        await page.call("Page.navigate", url=f"{address}/#/actors")
        await page.wait_for([TOKEN_DIALOG], timeout_s=60)
        await page.js("document.querySelector('input[type=password]').focus()")
        await page.call("Input.insertText", text=token)  # typed into the focused field
        # MUI upper-cases the label with CSS, so match textContent, not innerText.
        clicked = await page.js("(() => { const b = [...document.querySelectorAll('button')]"
                                ".find(b => b.textContent.trim() === 'Submit'); if (b) b.click(); return !!b; })()")
        assert clicked, "the token dialog has no Submit button"
        text = await page.wait_for(EXPECTED_ACTORS, timeout_s=90)  # the dashboard reloads with its cookie set
        assert TOKEN_DIALOG not in text
        await page.screenshot(shots / "dashboard-actors.png")
        actors_dom = await page.js("document.documentElement.outerHTML")
        await page.call("Page.navigate", url=f"{address}/#/jobs")
        jobs_text = await page.wait_for([submission_id], timeout_s=60)
        await page.screenshot(shots / "dashboard-jobs.png")
        return actors_dom, jobs_text

    return steps


def test_ppo_job_on_the_dashboard_stopped_and_resumed(cluster, jobs, tmp_path):  # noqa: F811
    from relay.metrics import read_metrics

    assert CHROMIUM, "chromium is missing: `make test` installs it (Debian package chromium)"
    assert cluster.startswith("http://127.0.0.1:")  # the dashboard is private to this machine
    sid, run = jobs.ids["ppo"], jobs.out / "ppo"
    deadline = time.monotonic() + 300
    while not set(EXPECTED_ACTORS) <= alive_actor_names(cluster):
        assert time.monotonic() < deadline, f"actors never came up: {alive_actor_names(cluster)}"
        time.sleep(2)
    shots = tmp_path / "shots"
    shots.mkdir()
    actors_dom, jobs_text = browse(tmp_path / "chromium", dashboard_pages(cluster, ray_auth.token(), sid, shots))
    missing = [name for name in EXPECTED_ACTORS if name not in actors_dom]
    assert not missing, f"the Actors page does not list {missing}"
    assert "relay ppo --config configs/ppo_tiny_grpo.yaml" in jobs_text, jobs_text[:2000]  # the entrypoint column
    for shot in shots.iterdir():
        assert shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 20_000, shot
    if os.environ.get("RELAY_SAVE_SCREENSHOTS"):  # refresh the README's pictures: a folder (docs/img)
        for shot in shots.iterdir():
            shutil.copy(shot, Path(os.environ["RELAY_SAVE_SCREENSHOTS"]) / shot.name)

    deadline = time.monotonic() + 300
    while not (run / "metrics.jsonl").exists() or len(read_metrics(run)) < 2:  # something to checkpoint
        assert time.monotonic() < deadline, "fewer than 2 episodes within 300 s"
        time.sleep(1)
    stop_job(cluster, sid)
    logs = wait_for_job(cluster, sid, timeout_s=300, expect="STOPPED")
    assert "[relay] received SIGTERM: stopping at the next safe point" in logs, logs[-3000:]
    rows = read_metrics(run)
    done = len(rows)
    assert 2 <= done < PPO_EPISODES and [r["step"] for r in rows] == list(range(1, done + 1)), logs[-3000:]
    # 2 update steps per episode; every generator served the newest weights.
    assert [r["weight_version"] for r in rows] == [2 * (i + 1) for i in range(done)]
    assert all(r["gen_version_min"] == r["weight_version"] for r in rows)
    assert all(math.isfinite(r["reward_mean"]) and math.isfinite(r["kl"]) for r in rows)
    assert list((run / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    ckpt = run / "checkpoints" / f"step-{done:08d}"
    assert (ckpt / "COMPLETE").exists() and list((ckpt / "actor").rglob("*.safetensors")), ckpt
    last = next(line for line in logs.splitlines() if line.startswith("relay ppo: stopped by "))
    assert last.startswith(f"relay ppo: stopped by SIGTERM after episode {done} of {PPO_EPISODES}; checkpoint {ckpt}. "
                           "To continue: relay ppo "), last
    command = shlex.split(last.split("To continue: ", 1)[1])
    assert command[-2:] == ["--resume", "auto"] and not (run / "actor").exists()

    resumed = command + ["--set", f"algo.num_episodes={done + 1}"]
    submit(cluster, {f"{sid}-resumed": resumed})
    logs = wait_for_job(cluster, f"{sid}-resumed", timeout_s=420)
    assert f"resume auto: resuming from {ckpt}" in logs, logs[-3000:]
    assert f"[relay ppo] episode {done + 1}/{done + 1} reward " in logs, logs[-3000:]
    assert [r["step"] for r in read_metrics(run)] == list(range(1, done + 2))  # nothing lost, nothing twice
    assert (run / "actor" / "config.json").exists() and list((run / "actor").glob("*.safetensors"))
    listed = listed_entrypoints(cluster)
    assert listed[sid] == " ".join(jobs.entrypoints["ppo"]) and listed[f"{sid}-resumed"] == " ".join(resumed)


def test_sft_rm_dpo_jobs(cluster, jobs):  # noqa: F811
    from relay.metrics import read_metrics

    stages = ["sft", "rm", "dpo"]
    logs = {stage: wait_for_job(cluster, jobs.ids[stage], timeout_s=420) for stage in stages}
    listed = listed_entrypoints(cluster)
    for stage in stages:
        run = jobs.out / stage
        assert f"[relay {stage}] step 2/2 " in logs[stage], logs[stage][-3000:]
        assert "attention: sdpa" in logs[stage]
        rows = read_metrics(run)
        assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows), rows
        ckpt = run / "checkpoints" / "step-00000002"
        assert (ckpt / "COMPLETE").exists() and list((ckpt / "model").glob("*.safetensors"))
        assert (run / "model" / "config.json").exists() and list((run / "model").glob("*.safetensors"))
        assert listed[jobs.ids[stage]] == " ".join(jobs.entrypoints[stage])
    assert "[relay dpo] reference logprobs computed in " in logs["dpo"]
    assert {"rewards/accuracy", "rewards/margins"} <= set(read_metrics(jobs.out / "dpo")[-1])
    assert list((jobs.out / "sft" / "logs" / "wandb").glob("offline-run-*"))  # wandb, offline
