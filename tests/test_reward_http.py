"""The HTTP reward client against real local servers (http.server in a thread; Ray only in the last test):
batching, bad replies (not retried), an outage waited out with backoff and one log line per wait up to
`max_outage_s`, then a clear error; oversize replies refused; TLS/certificate errors fail at once; secrets in the
URL or headers never reach logs, errors or metrics."""
from __future__ import annotations

import base64
import json
import shutil
import ssl
import subprocess
import sys
import threading
import time
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from relay.actors.rewards import HttpReward, RewardError, make_reward_source
from relay.config import RewardConfig
from relay.redact import REDACTED, header_secrets, redact_config, redact_url, scrub, url_secrets

PROMPTS = ["hi", "tell me", "why"]
RESPONSES = ["hello<|im_end|>", "a story", "because!"]
EXPECTED = [15.0, 7.0, 8.0]  # /ok: each response's length
TOKEN, PASSWORD = "TOPSECRET123", "s3cr3tpw"


class _Handler(BaseHTTPRequestHandler):
    """POST /ok (rewards = response lengths), /flaky (503 for the first `fail_first` requests), /busy (503 until
    the server's `busy_until` time), /slow (sleeps past the client timeout once), /bad (400), /malformed,
    /short, /notnum, /echo400 (400 echoing path and headers), /big (a body over the client's cap, with
    Content-Length), /stream (the same without Content-Length, closed at the end)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output quiet
        pass

    def do_POST(self):
        srv = self.server
        path = self.path.split("?")[0]
        srv.hits.append(path)
        srv.auth.append(self.headers.get("Authorization"))
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        rewards = [float(len(r)) for r in body["responses"]]
        big = b'{"rewards": [' + b" " * 5000 + b"1, 2, 3]}"
        if path == "/flaky" and srv.hits.count(path) <= srv.fail_first:
            return self._send(503, b"busy")
        if path == "/busy" and time.monotonic() < srv.busy_until:
            return self._send(503, b"busy")
        if path == "/slow" and srv.hits.count(path) == 1:
            time.sleep(1.0)
        if path == "/bad":
            return self._send(400, b"missing field")
        if path == "/echo400":
            return self._send(400, f"bad request to {self.path} with {dict(self.headers)}".encode())
        if path == "/malformed":
            return self._send(200, b'{"rewards": [1.0, 2.0')
        if path == "/big":
            return self._send(200, big)
        if path == "/stream":
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(big)
            self.close_connection = True
            return None
        if path == "/short":
            rewards = rewards[:1]
        if path == "/notnum":
            rewards = ["high"] * len(rewards)
        self._send(200, json.dumps({"rewards": rewards}).encode())

    def _send(self, code, data):
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _serve(port: int = 0, tls: ssl.SSLContext | None = None) -> ThreadingHTTPServer:
    srv = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
    srv.hits, srv.auth, srv.busy_until, srv.fail_first = [], [], 0.0, 2
    if tls is not None:
        srv.socket = tls.wrap_socket(srv.socket, server_side=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def _stop(srv: ThreadingHTTPServer) -> None:
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def server():
    srv = _serve()
    yield srv, f"http://127.0.0.1:{srv.server_address[1]}"
    _stop(srv)


@pytest.fixture
def http_log(log_lines):
    return log_lines("relay.actors.reward_http")


# ------------------------------------------------------------------------------------------ replies


def test_http_ok_and_batching(server):
    srv, base = server
    src = HttpReward(base + "/ok", batch_size=2)
    assert src.score(PROMPTS, RESPONSES) == EXPECTED
    assert srv.hits.count("/ok") == 2 and src.requests == 2


def test_http_retries_then_succeeds(server):
    srv, base = server
    src = HttpReward(base + "/flaky", retries=3, backoff_s=0.01)
    assert src.score(PROMPTS, RESPONSES) == EXPECTED
    assert srv.hits.count("/flaky") == 3 and src.requests == 3  # 503, 503, 200


def test_http_gives_up_after_retries(server):
    srv, base = server
    srv.fail_first = 100
    with pytest.raises(RewardError, match=r"unavailable .*2 attempts.*HTTP 503"):
        HttpReward(base + "/flaky", retries=1, backoff_s=0.01, max_outage_s=0).score(PROMPTS, RESPONSES)
    assert srv.hits.count("/flaky") == 2


def test_http_timeout_is_retried(server):
    srv, base = server
    src = HttpReward(base + "/slow", timeout_s=0.3, retries=2, backoff_s=0.01)
    assert src.score(PROMPTS, RESPONSES) == EXPECTED
    assert src.requests == 2


@pytest.mark.parametrize("path, message", [
    ("/malformed", "malformed JSON"),
    ("/short", "returned 1 rewards for 3 samples"),
    ("/notnum", r"returned 'high' \(str\)"),
    ("/bad", "refused the request.*HTTP 400"),
])
def test_http_bad_replies_are_clear_and_not_retried(server, path, message):
    srv, base = server
    with pytest.raises(RewardError, match=message):
        HttpReward(base + path, retries=3, backoff_s=0.01).score(PROMPTS, RESPONSES)
    assert srv.hits.count(path) == 1


def test_http_unreachable(server):
    srv, base = server
    port = srv.server_address[1]
    _stop(srv)
    with pytest.raises(RewardError, match="unavailable .*2 attempts"):
        HttpReward(f"http://127.0.0.1:{port}/ok", retries=1, backoff_s=0.01, timeout_s=2,
                   max_outage_s=0).score(["a"], ["b"])


# ------------------------------------------------------------------------------------------ outages


def test_outage_is_waited_out_with_one_line_per_wait(http_log):
    """The service is down (connection refused) for ~1.5 s, then comes back on the same port: the score call
    holds, logs each wait in one line, and returns the rewards."""
    srv = _serve()
    port = srv.server_address[1]
    _stop(srv)
    back: list[ThreadingHTTPServer] = []
    restart = threading.Timer(1.5, lambda: back.append(_serve(port)))
    restart.start()
    try:
        src = HttpReward(f"http://127.0.0.1:{port}/ok", retries=0, backoff_s=0.05, max_backoff_s=0.4,
                         max_outage_s=30, timeout_s=2)
        t0 = time.monotonic()
        assert src.score(PROMPTS, RESPONSES) == EXPECTED
        assert 1.4 < time.monotonic() - t0 < 10
    finally:
        restart.join()
        for s in back:
            _stop(s)
    assert src.requests >= 3 and len(http_log) == src.requests - 1
    assert all("unavailable" in line and "retry" in line and "\n" not in line for line in http_log)
    assert "ConnectionRefusedError" in http_log[0]


def test_5xx_outage_recovers(server, http_log):
    srv, base = server
    srv.busy_until = time.monotonic() + 1.0
    src = HttpReward(base + "/busy", retries=0, backoff_s=0.05, max_backoff_s=0.3, max_outage_s=30)
    assert src.score(PROMPTS, RESPONSES) == EXPECTED
    assert srv.hits.count("/busy") == src.requests >= 3
    assert "HTTP 503" in http_log[0]


def test_outage_past_the_limit_is_a_clear_error(http_log):
    srv = _serve()
    port = srv.server_address[1]
    _stop(srv)
    src = HttpReward(f"http://127.0.0.1:{port}/ok", retries=0, backoff_s=0.05, max_backoff_s=0.2, max_outage_s=1.0)
    t0 = time.monotonic()
    with pytest.raises(RewardError, match=r"unavailable for \d+ s .*max_outage_s=1 s.*ConnectionRefused"):
        src.score(PROMPTS, RESPONSES)
    assert 0.9 < time.monotonic() - t0 < 5
    assert len(http_log) == src.requests - 1 >= 3


# ------------------------------------------------------------------------------------------ size cap


@pytest.mark.parametrize("path", ["/big", "/stream"])
def test_oversize_reply_is_refused_and_not_retried(server, path):
    srv, base = server
    src = HttpReward(base + path, max_response_bytes=1000, backoff_s=0.01)
    with pytest.raises(RewardError, match=r"over the limit of 1000 bytes \(reward.max_response_bytes\)"):
        src.score(PROMPTS, RESPONSES)
    assert srv.hits.count(path) == 1
    # the same reply under a larger cap is fine
    assert HttpReward(base + path, max_response_bytes=10_000).score(PROMPTS, RESPONSES) == [1.0, 2.0, 3.0]


def test_default_cap_is_16_mib():
    assert HttpReward("http://127.0.0.1:9/x").max_response_bytes == 16 * 2**20
    assert RewardConfig().max_response_bytes == 16 * 2**20 and RewardConfig().max_outage_s >= 600


# ------------------------------------------------------------------------------------------ TLS


def _self_signed(tmp_path) -> ssl.SSLContext:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not on PATH")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1"], check=True, capture_output=True, timeout=60)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    return ctx


def test_untrusted_certificate_fails_at_once(tmp_path, http_log):
    srv = _serve(tls=_self_signed(tmp_path))
    try:
        src = HttpReward(f"https://127.0.0.1:{srv.server_address[1]}/ok", retries=3, max_outage_s=60)
        t0 = time.monotonic()
        with pytest.raises(RewardError, match=r"TLS/certificate error, not retried.*CERTIFICATE_VERIFY_FAILED"):
            src.score(PROMPTS, RESPONSES)
        assert time.monotonic() - t0 < 5 and src.requests == 1 and http_log == []
    finally:
        _stop(srv)


def test_https_to_a_plain_http_port_fails_at_once(server, http_log):
    srv, base = server
    src = HttpReward(base.replace("http://", "https://") + "/ok", retries=3, max_outage_s=60)
    with pytest.raises(RewardError, match="TLS/certificate error, not retried"):
        src.score(PROMPTS, RESPONSES)
    assert src.requests == 1 and http_log == []


# ------------------------------------------------------------------------------------------ secrets


def test_url_secrets_stay_out_of_logs_and_errors(server, http_log, capsys):
    """Userinfo goes out as a Basic header; neither it nor the query token shows in log lines (an outage
    first), in an error that echoes the request back, or in repr."""
    srv, base = server
    port = srv.server_address[1]
    basic = base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
    url = f"http://alice:{PASSWORD}@127.0.0.1:{port}/echo400?token={TOKEN}&model=m1"
    src = HttpReward(url, retries=0, backoff_s=0.01, max_outage_s=5)
    with pytest.raises(RewardError) as info:
        src.score(PROMPTS, RESPONSES)
    assert srv.auth[-1] == f"Basic {basic}"  # the credentials were sent, as a header
    message = str(info.value)
    assert "HTTP 400" in message and f"token={REDACTED}" in message
    down = HttpReward(f"http://alice:{PASSWORD}@127.0.0.1:9/ok?token={TOKEN}", retries=1, backoff_s=0.01,
                      max_outage_s=0, timeout_s=1)
    with pytest.raises(RewardError) as info2:
        down.score(PROMPTS, RESPONSES)
    shown = "\n".join([message, str(info2.value), repr(src), *http_log, *capsys.readouterr()])
    assert http_log  # the outage was logged...
    for secret in (TOKEN, PASSWORD, basic, "alice:"):
        assert secret not in shown  # ...without a secret


def test_authorization_header_is_scrubbed_from_echoed_errors(server):
    srv, base = server
    src = HttpReward(base + "/echo400", headers={"Authorization": "Bearer abcdef123456", "X-Api-Key": "k3y-value"})
    with pytest.raises(RewardError) as info:
        src.score(PROMPTS, RESPONSES)
    assert srv.auth[-1] == "Bearer abcdef123456"
    assert "abcdef123456" not in str(info.value) and "k3y-value" not in str(info.value)


def test_redaction_helpers():
    url = f"https://bob:{PASSWORD}@rm.example:8443/v1/score?token={TOKEN}&x=1#frag"
    assert redact_url(url) == f"https://{REDACTED}@rm.example:8443/v1/score?token={REDACTED}&x={REDACTED}#{REDACTED}"
    assert redact_url("http://h/p") == "http://h/p"
    assert set(url_secrets(url)) >= {PASSWORD, TOKEN, f"bob:{PASSWORD}"}
    assert "Bearer xyz123" in header_secrets({"Authorization": "Bearer xyz123", "Accept": "json"})
    assert scrub(f"echo {TOKEN}!", [TOKEN]) == f"echo {REDACTED}!"
    cfg = {"reward": {"url": url, "timeout_s": 30.0}, "generation": {"max_tokens": 5, "stop_token_ids": [1]},
           "actor": {"tokenizer_dir": "/m"}, "headers": {"Authorization": "Bearer z"}, "api_key": "k"}
    out = redact_config(cfg)
    assert TOKEN not in json.dumps(out) and PASSWORD not in json.dumps(out)
    assert out["generation"] == cfg["generation"] and out["actor"] == cfg["actor"]
    assert out["headers"]["Authorization"] == REDACTED and out["api_key"] == REDACTED


def test_metrics_config_is_redacted(tmp_path, monkeypatch):
    """The config a run hands to wandb carries the reward URL: its token must not reach the wandb run."""
    from relay.metrics import MetricsLogger

    seen: dict = {}
    fake = types.SimpleNamespace(init=lambda **kw: seen.update(kw) or types.SimpleNamespace(log=lambda *a, **k: None,
                                                                                               finish=lambda: None))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = {"reward": {"kind": "http", "url": f"http://127.0.0.1:9/score?token={TOKEN}"}}
    logger = MetricsLogger(tmp_path, use_tensorboard=False, use_wandb=True, config=cfg)
    logger.log(0, {"reward": 1.0})
    logger.close()
    assert TOKEN not in json.dumps(seen["config"]) and "127.0.0.1:9/score" in json.dumps(seen["config"])
    assert TOKEN not in (tmp_path / "metrics.jsonl").read_text()


def test_config_fields_reach_the_client():
    src = make_reward_source(RewardConfig(kind="http", url="http://127.0.0.1:9/x", max_outage_s=42,
                                          max_response_bytes=1234))
    assert (src.max_outage_s, src.max_response_bytes) == (42, 1234)
    with pytest.raises(ValueError, match="max_response_bytes"):
        HttpReward("http://127.0.0.1:9/x", max_response_bytes=0)


# ------------------------------------------------------------------------------------------ through Ray


@pytest.mark.ray
def test_reward_actor_holds_through_an_outage(ray_session):
    """relay/reward serving kind=http: the service is down ~2 s and comes back; the run's score call waits and
    answers. A service down past max_outage_s gives the clear error through the actor."""
    from relay.actors.rewards import start_reward_actor
    from relay.logs import error_line

    srv = _serve()
    port = srv.server_address[1]
    _stop(srv)
    back: list[ThreadingHTTPServer] = []
    spec = {"kind": "http", "url": f"http://127.0.0.1:{port}/ok?token={TOKEN}", "retries": 0, "max_outage_s": 60}
    client = start_reward_actor(spec, name="reward-outage-test", timeout_s=120)
    restart = threading.Timer(2.0, lambda: back.append(_serve(port)))
    try:
        restart.start()
        t0 = time.monotonic()
        assert client.score(PROMPTS, RESPONSES) == EXPECTED
        assert time.monotonic() - t0 > 1.5
    finally:
        restart.join()
        client.kill()
        for s in back:
            _stop(s)
    spec = {"kind": "http", "url": f"http://127.0.0.1:{port}/ok?token={TOKEN}", "retries": 0, "max_outage_s": 1}
    client = start_reward_actor(spec, name="reward-outage-test2", timeout_s=120)
    try:
        with pytest.raises(Exception) as info:
            client.score(PROMPTS, RESPONSES)
        line = error_line(info.value)
        assert "unavailable for" in line and "max_outage_s=1 s" in line and TOKEN not in line
    finally:
        client.kill()
