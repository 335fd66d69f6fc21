"""Headless Chromium driven over the DevTools protocol, for pages that need a person's input: the Ray dashboard
asks for the cluster's token in a dialog, and Chromium's one-shot flags (--dump-dom) cannot type it. The websocket
client is aiohttp's (a dependency of ray[default])."""
from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Without the networking flags Chromium keeps trying hosts this machine cannot reach.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]
# Chromium's answers to an evaluation that a navigation cut short.
RELOADING = ("Inspected target navigated or closed", "Execution context was destroyed", "Cannot find context")


class Page:
    """One browser tab: DevTools calls, JavaScript, waiting for text."""

    def __init__(self, ws: Any) -> None:
        self.ws, self.last_id = ws, 0

    async def call(self, method: str, **params: Any) -> dict:
        self.last_id += 1
        await self.ws.send_json({"id": self.last_id, "method": method, "params": params})
        while True:  # events arrive in between; skip them
            msg = json.loads((await self.ws.receive()).data)
            if msg.get("id") == self.last_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    async def js(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    async def text(self) -> str:
        """The page's visible text; empty while the page is between documents (a reload destroys the context
        an evaluation ran in, and Chromium answers with an error instead of a value)."""
        try:
            return await self.js("document.body ? document.body.innerText : ''") or ""
        except RuntimeError as err:
            if any(s in str(err) for s in RELOADING):
                return ""
            raise

    async def wait_for(self, needles: list[str], timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            text = await self.text()
            if all(n in text for n in needles):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"the page never showed {needles}; it shows: {text[:1500]}")
            await asyncio.sleep(0.5)

    async def screenshot(self, path: Path) -> None:
        data = await self.call("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(data["data"]))


async def _session(profile: Path, window: str, steps) -> Any:
    port_file = profile / "DevToolsActivePort"  # Chromium writes its DevTools port here once it is up
    port_file.unlink(missing_ok=True)
    proc = subprocess.Popen([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0",
                             f"--window-size={window}", "about:blank"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            assert proc.poll() is None and time.monotonic() < deadline, "chromium never opened DevTools"
            await asyncio.sleep(0.2)
        host = f"127.0.0.1:{port_file.read_text().split()[0]}"
        targets = json.load(urllib.request.urlopen(f"http://{host}/json/list", timeout=10))
        ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        import aiohttp

        async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, max_msg_size=0) as ws:
            return await steps(Page(ws))
    finally:
        proc.kill()
        proc.wait()


def browse(profile: Path, steps, window: str = "1600,1000") -> Any:
    """Start Chromium with its own profile folder, run `await steps(page)` in one tab, stop Chromium."""
    return asyncio.run(asyncio.wait_for(_session(profile, window, steps), timeout=180))
