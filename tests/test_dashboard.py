"""The Ray dashboard seen in a real browser: a short PPO run submitted as a Ray job to a local cluster whose
dashboard binds to 127.0.0.1 and needs Ray's token; headless Chromium opens the Actors page, is asked for the token,
types it like a person would, and the page must then list Relay's named actors. The screenshot is kept in the run
folder."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import pytest

from browser_util import CHROMIUM, browse
from jobs_util import BIN, api, cluster, job_env, submit, wait_for_job  # noqa: F401  (cluster is a fixture)
from relay.launch import ray_auth

pytestmark = [pytest.mark.ray, pytest.mark.slow]

EXPECTED = ["relay/generator-0@ppo", "relay/ref@ppo", "relay/reward@ppo", "relay/actor-rank0@ppo",
            "relay/buffer@ppo"]  # the run is named after its save_dir, .../ppo
TOKEN_DIALOG = "Authentication Token Required"  # Ray 2.60's dashboard, when a request comes back 401


def alive_actor_names(address: str) -> set[str]:
    data = json.loads(api(address, "/api/v0/actors?limit=1000&detail=false"))
    rows = data.get("data", {}).get("result", {}).get("result", [])
    return {row.get("name") for row in rows if row.get("state") == "ALIVE" and row.get("name")}


def open_with_token(page_url: str, token: str, shot):
    """The Actors page as a person sees it: the token dialog first, then the page once the token is typed."""
    async def steps(page):
        await page.call("Page.navigate", url=page_url)
        await page.wait_for([TOKEN_DIALOG], timeout_s=60)
        await page.js("document.querySelector('input[type=password]').focus()")
        await page.call("Input.insertText", text=token)  # typed into the focused field
        # MUI upper-cases the label with CSS, so match textContent, not innerText.
        clicked = await page.js("(() => { const b = [...document.querySelectorAll('button')]"
                                ".find(b => b.textContent.trim() === 'Submit'); if (b) b.click(); return !!b; })()")
        assert clicked, "the token dialog has no Submit button"
        text = await page.wait_for(EXPECTED, timeout_s=90)  # the dashboard reloads with its cookie set
        assert TOKEN_DIALOG not in text
        await page.screenshot(shot)
        return await page.js("document.documentElement.outerHTML")

    return steps


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
    run.mkdir(parents=True, exist_ok=True)
    shot = run / "dashboard-actors.png"
    dom = browse(tmp_path / "chromium", open_with_token(f"{cluster}/#/actors", ray_auth.token(), shot))
    missing = [name for name in EXPECTED if name not in dom]
    assert not missing, f"the Actors page does not list {missing}"
    assert shot.exists() and shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 20_000
    if os.environ.get("RELAY_SAVE_SCREENSHOT"):  # refresh the README's picture
        shutil.copy(shot, os.environ["RELAY_SAVE_SCREENSHOT"])
    wait_for_job(cluster, sid, timeout_s=420)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 6
