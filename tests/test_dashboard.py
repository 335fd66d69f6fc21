"""The Ray dashboard seen in a real browser: a short PPO run submitted as a Ray job to a local cluster whose
dashboard binds to 127.0.0.1; headless Chromium renders the Actors page, which must list Relay's named actors.
The screenshot is kept in the run folder."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request

import pytest

from jobs_util import BIN, cluster, job_env, submit, wait_for_job  # noqa: F401  (cluster is a fixture)

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Without the networking flags Chromium keeps trying hosts this machine cannot reach.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]
EXPECTED = ["relay/generator-0", "relay/ref", "relay/reward", "relay/actor-rank0", "relay/buffer"]


def alive_actor_names(address: str) -> set[str]:
    with urllib.request.urlopen(f"{address}/api/v0/actors?limit=1000&detail=false", timeout=10) as r:
        data = json.load(r)
    rows = data.get("data", {}).get("result", {}).get("result", [])
    return {row.get("name") for row in rows if row.get("state") == "ALIVE" and row.get("name")}


def chromium(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium'}", *args],
                          capture_output=True, text=True, timeout=120)


def test_actors_page_lists_relay_actors(cluster, tmp_path):
    assert CHROMIUM, "chromium is missing: `make test` installs it (Debian package chromium)"
    assert cluster.startswith("http://127.0.0.1:")  # the dashboard is private to this machine
    data = tmp_path / "data"
    subprocess.run([str(BIN / "relay"), "prepare", "prompt", "-i", "tests/fixtures/chitchat_prompt.jsonl", "-o",
                    str(data / "prompt"), "-t", "tiny"], env=job_env(), check=True, timeout=300, capture_output=True)
    run = tmp_path / "ppo"
    sid = f"relay-dashboard-{os.getpid()}"
    submit(cluster, sid, "relay", "ppo", "--config", "configs/ppo_tiny_grpo.yaml",
           "--set", f"prompt_dataset={data / 'prompt'}", "--set", f"save_dir={run}", "--set", "algo.num_episodes=6",
           "--set", "algo.kl_coef=0.01")  # a KL term, so relay/ref runs too
    deadline = time.monotonic() + 300
    while not set(EXPECTED) <= alive_actor_names(cluster):
        assert time.monotonic() < deadline, f"actors never came up: {alive_actor_names(cluster)}"
        time.sleep(2)
    page = f"{cluster}/#/actors"
    dom = chromium(tmp_path, "--virtual-time-budget=20000", "--dump-dom", page)
    assert dom.returncode == 0, dom.stderr[-2000:]
    missing = [name for name in EXPECTED if name not in dom.stdout]
    assert not missing, f"the Actors page does not list {missing}"
    run.mkdir(parents=True, exist_ok=True)
    shot = run / "dashboard-actors.png"
    chromium(tmp_path, "--virtual-time-budget=20000", "--window-size=1600,1000", f"--screenshot={shot}", page)
    assert shot.exists() and shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 20_000
    if os.environ.get("RELAY_SAVE_SCREENSHOT"):  # refresh the README's picture
        shutil.copy(shot, os.environ["RELAY_SAVE_SCREENSHOT"])
    wait_for_job(cluster, sid, timeout_s=420)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 6
