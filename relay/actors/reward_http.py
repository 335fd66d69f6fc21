"""A remote reward service as a reward source: `HttpReward` POSTs texts in batches.

Failure rules (each chosen so that a long run neither dies of a short outage nor hangs on a broken setup):

- An outage (connection refused or reset, a timeout, HTTP 408/429/5xx) is retried with exponential backoff
  (`backoff_s` doubling up to `max_backoff_s`) while it lasts less than `max_outage_s` (default 10 minutes);
  each wait is logged in one line. Past the limit, and after at least `retries` retries, a `RewardError`.
- TLS and certificate errors are not retried: they do not heal by waiting. Nor are other 4xx replies,
  malformed JSON, a wrong number of rewards, or a reply larger than `max_response_bytes` (default 16 MiB).
- Secrets never reach logs or errors: the URL is shown with its userinfo and query values as *** (userinfo is
  sent as a Basic Authorization header), and any echo of them or of an Authorization header is scrubbed.
"""
from __future__ import annotations

import base64
import http.client
import json
import logging
import ssl
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from relay.actors.reward_source import RewardError, _check_lengths, as_reward
from relay.redact import header_secrets, redact_url, scrub, url_secrets

logger = logging.getLogger(__name__)

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
DEFAULT_MAX_OUTAGE_S = 600.0
DEFAULT_MAX_RESPONSE_BYTES = 16 * 2**20
# A peer closing the connection mid-handshake is an outage (a restarting server), not a TLS misconfiguration.
_TLS_CLOSED = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)


class _Outage(Exception):
    """One attempt failed in a way that waiting may heal (message already scrubbed)."""


def _tls_error(err: BaseException) -> ssl.SSLError | None:
    """The TLS/certificate error behind `err` (urllib wraps it in URLError.reason), if any."""
    seen: set[int] = set()
    todo: list[Any] = [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ssl.SSLError) and not isinstance(e, _TLS_CLOSED):
            return e
        todo += [getattr(e, "reason", None), e.__cause__, e.__context__]
    return None


def _split_userinfo(url: str, headers: dict[str, str]) -> str:
    """`url` without userinfo; the userinfo becomes a Basic Authorization header (urllib would take it for
    part of the host) unless `headers` already has one."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    userinfo, host = parts.netloc.rsplit("@", 1)
    user, _, password = userinfo.partition(":")
    if not any(k.lower() == "authorization" for k in headers):
        token = base64.b64encode(f"{unquote(user)}:{unquote(password)}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    return urlunsplit(parts._replace(netloc=host))


class HttpReward:
    """A remote reward service (protocol in `relay.actors.rewards`; failure rules above)."""

    def __init__(self, url: str, timeout_s: float = 30.0, retries: int = 3, backoff_s: float = 0.5,
                 max_backoff_s: float = 30.0, batch_size: int | None = None, headers: dict[str, str] | None = None,
                 send_ids: bool = False, max_outage_s: float = DEFAULT_MAX_OUTAGE_S,
                 max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES):
        if not url or not url.startswith(("http://", "https://")):
            shown = redact_url(url) if url else url
            raise ValueError(f"HttpReward: url must start with http:// or https://, got {shown!r}")
        if timeout_s <= 0 or retries < 0 or max_outage_s < 0 or max_response_bytes <= 0:
            raise ValueError("HttpReward: timeout_s and max_response_bytes must be > 0, retries and "
                             "max_outage_s >= 0")
        self.shown_url = redact_url(url)
        self.headers = {"Content-Type": "application/json", **(headers or {})}
        self.url = _split_userinfo(url, self.headers)
        self._secrets = sorted(set(url_secrets(url)) | set(header_secrets(self.headers)), key=len, reverse=True)
        self.timeout_s, self.retries, self.max_outage_s = timeout_s, retries, max_outage_s
        self.backoff_s, self.max_backoff_s, self.batch_size = backoff_s, max_backoff_s, batch_size
        self.max_response_bytes = max_response_bytes
        self.send_ids = send_ids
        self.requests = 0  # attempts made, for tests and metrics

    def __repr__(self) -> str:
        return f"HttpReward({self.shown_url})"

    def score(self, prompts: list[str], responses: list[str], **info: Any) -> list[float]:
        _check_lengths(prompts, responses, info)
        step = self.batch_size or max(1, len(prompts))
        out: list[float] = []
        for start in range(0, len(prompts), step):
            payload: dict[str, Any] = {"prompts": list(prompts[start:start + step]),
                                       "responses": list(responses[start:start + step])}
            if self.send_ids:
                for key in ("prompt_ids", "response_ids", "finish_reasons"):
                    if info.get(key) is not None:
                        payload[key] = list(info[key][start:start + step])
            out.extend(self._post(payload))
        return out

    def _scrub(self, text: str) -> str:
        return " ".join(scrub(text, self._secrets).split())  # one line, no secret

    def _post(self, payload: dict[str, Any]) -> list[float]:
        body = json.dumps(payload).encode()
        n = len(payload["prompts"])
        down_since: float | None = None
        attempt = 0
        while True:
            attempt += 1
            self.requests += 1
            started = time.monotonic()
            try:
                return self._parse(self._attempt(body), n)
            except _Outage as err:
                down_since = started if down_since is None else down_since
                down = time.monotonic() - down_since
                left = self.max_outage_s - down
                if attempt > self.retries and left <= 0:
                    raise RewardError(
                        f"reward service {self.shown_url} unavailable for {down:.0f} s ({attempt} attempts, "
                        f"limit reward.max_outage_s={self.max_outage_s:g} s, timeout {self.timeout_s:g} s per "
                        f"request): {err}") from None
                wait = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
                wait = min(wait, left) if left > 0 else wait
                logger.warning("reward service %s unavailable (%s); retry %d in %.1f s (down %.0f s of at most "
                               "%.0f s)", self.shown_url, err, attempt, wait, down, self.max_outage_s)
                time.sleep(wait)

    def _attempt(self, body: bytes) -> bytes:
        """One POST: the reply body, `_Outage` for what waiting may heal, `RewardError` for the rest."""
        request = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as reply:
                return self._read(reply)
        except urllib.error.HTTPError as err:
            try:
                detail = err.read(200).decode(errors="replace")
            except OSError:
                detail = ""
            what = self._scrub(f"HTTP {err.code} {err.reason}: {detail}")
            if err.code in RETRY_STATUS:
                raise _Outage(what) from None
            raise RewardError(f"reward service {self.shown_url} refused the request ({what})") from None
        except (OSError, http.client.HTTPException) as err:  # URLError, timeouts, resets, TLS, bad status
            tls = _tls_error(err)
            if tls is not None:
                raise RewardError(
                    f"reward service {self.shown_url}: TLS/certificate error, not retried "
                    f"({self._scrub(f'{type(tls).__name__}: {tls}')}); check the server's certificate, the "
                    "machine's CA bundle (SSL_CERT_FILE) and the URL's scheme and port") from None
            reason = getattr(err, "reason", err)
            raise _Outage(self._scrub(f"{type(reason).__name__}: {reason}")) from None

    def _read(self, reply: Any) -> bytes:
        """The body, refused (not retried) when larger than `max_response_bytes`: a declared length over the
        cap is refused unread, otherwise at most one byte past the cap is read, so a runaway or hostile server
        cannot fill this process's memory."""
        cap = self.max_response_bytes
        length = reply.headers.get("Content-Length", "")
        size = f"{int(length)} bytes" if length.isdigit() and int(length) > cap else None
        raw = b"" if size else reply.read(cap + 1)
        if len(raw) > cap:
            size = f"more than {cap} bytes"
        if size:
            raise RewardError(f"reward service {self.shown_url} replied with {size}, over the limit of {cap} "
                              "bytes (reward.max_response_bytes); not retried")
        return raw

    def _parse(self, raw: bytes, n: int) -> list[float]:
        snippet = self._scrub(raw[:200].decode(errors="replace"))
        try:
            data = json.loads(raw)
        except ValueError as err:
            raise RewardError(f"reward service {self.shown_url} replied with malformed JSON: {snippet!r}") from err
        rewards = data.get("rewards") if isinstance(data, dict) else None
        if not isinstance(rewards, list):
            raise RewardError(f"reward service {self.shown_url} reply has no 'rewards' list: {snippet!r}")
        if len(rewards) != n:
            raise RewardError(f"reward service {self.shown_url} returned {len(rewards)} rewards for {n} samples")
        return [as_reward(v, f"reward service {self.shown_url} (sample {i})") for i, v in enumerate(rewards)]
