"""Fault drill: the HTTP reward service is down for 3 minutes in the middle of a PPO run; the run holds and finishes.

    python scripts/fault_http_outage.py [--outage-s 180] [--episodes 5] [--out runs/fault_http_outage]

Starts a local reward service (stdlib HTTP, the reward is how short an answer is), a tiny GRPO run
(configs/ppo_tiny_grpo.yaml on the tiny demo data, made on the spot) whose reward is that service, runs 2
episodes, takes the service down, brings it back after `--outage-s` seconds (on a timer) and runs the remaining
episodes. The reward client retries with backoff up to `reward.max_outage_s` (default 600 s) while the run holds.
Prints one line per episode (seconds, samples, reward) and the outage figures; exits 1 unless every episode ran
once with all of its samples. The README's Faults table quotes what it printed.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class ShortAnswers(BaseHTTPRequestHandler):
    """POST {prompts, responses} -> {rewards}: 1 for an empty answer, falling with its length."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.hits += 1
        data = json.dumps({"rewards": [1.0 / (1.0 + len(r)) for r in body["responses"]]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def serve(port: int = 0) -> ThreadingHTTPServer:
    srv = ThreadingHTTPServer(("127.0.0.1", port), ShortAnswers)
    srv.hits = 0
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def stop(srv: ThreadingHTTPServer) -> None:
    srv.shutdown()
    srv.server_close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--outage-s", type=float, default=180.0, help="how long the service stays down")
    parser.add_argument("--episodes", type=int, default=5, help="episodes in all (the outage starts after 2)")
    parser.add_argument("--out", default="runs/fault_http_outage", help="SAVE_DIR of the run")
    args = parser.parse_args(argv)
    if args.episodes < 3:
        parser.error("--episodes must be >= 3 (2 before the outage, 1 in it)")

    from relay import logs
    from relay.config import load_config, validate
    from relay.launch.ppo import PPOSystem

    data = Path(tempfile.mkdtemp(prefix="relay-drill-"))
    subprocess.run([sys.executable, "-m", "relay.launch.cli", "data", "demo", str(data), "-t", "tiny"],
                   check=True, cwd=REPO, capture_output=True, timeout=600)
    srv = serve()
    port = srv.server_address[1]
    sets = [f"prompt_dataset={data / 'prompt'}", f"save_dir={args.out}", "logging.use_tensorboard=false",
            f"algo.num_episodes={args.episodes}", "reward.kind=http", "reward.rule=null",
            f"reward.url=http://127.0.0.1:{port}/reward", "save_every_minutes=0"]
    cfg = load_config("ppo", REPO / "configs/ppo_tiny_grpo.yaml", sets)
    validate(cfg, "cpu")
    log_folder = Path(args.out) / "logs"
    back: list[ThreadingHTTPServer] = []
    with logs.run_logs(log_folder):  # vLLM, Ray and actor output go to files; the console keeps Relay's lines
        records, up_s = _run(system_cls=PPOSystem, cfg=cfg, srv=srv, port=port, back=back, args=args)
    waits = [line.strip() for f in sorted(log_folder.glob("*reward*.log"))
             for line in f.read_text(errors="replace").splitlines() if "unavailable" in line]
    for line in waits[:3] + (["..."] if len(waits) > 4 else []) + waits[3:][-1:]:
        print(f"[drill] reward actor: {line}")
    return _report(records, up_s, args)


def _run(system_cls, cfg, srv, port, back, args):
    """Two episodes, the outage (service back on a timer), the rest; returns (episode records, seconds)."""
    system = system_cls(cfg).start()
    try:
        before = system.run_episodes(until=2)
        stop(srv)
        down_at = time.monotonic()
        timer = threading.Timer(args.outage_s, lambda: back.append(serve(port)))
        timer.start()
        print(f"[drill] reward service on port {port} down for {args.outage_s:.0f} s "
              f"(reward.max_outage_s={cfg.reward.max_outage_s:.0f} s)", flush=True)
        after = system.run_episodes()
        timer.join()
        up_s = (time.monotonic() - down_at)
    finally:
        system.close()
        for s in back:
            stop(s)
    return before + after, up_s


def _report(records, up_s, args) -> int:
    size = records[0]["samples"]
    for r in records:
        print(f"[drill] episode {r['episode']}: {r['episode_s']:.1f} s (score {r['score_s']:.1f} s), "
              f"{r['samples']} samples, reward {r['reward_mean']:.3f}")
    held = records[2]
    ok = [r["episode"] for r in records] == list(range(1, args.episodes + 1)) and all(
        r["samples"] == size for r in records)
    print(f"[drill] outage {args.outage_s:.0f} s: episode 3 waited {held['score_s']:.1f} s in scoring and went on; "
          f"{len(records)} of {args.episodes} episodes, {size} samples each: {'ok' if ok else 'FAILED'} "
          f"({up_s:.0f} s from the outage to the end)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
