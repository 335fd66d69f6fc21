"""A remote reward service as a reward source: `HttpReward` POSTs texts in batches, with a timeout per
request and retries with backoff on transient failures."""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

from relay.actors.reward_source import RewardError, _check_lengths, as_reward

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class HttpReward:
    """A remote reward service (see `relay.actors.rewards` for the protocol and the retry rules)."""

    def __init__(self, url: str, timeout_s: float = 30.0, retries: int = 3, backoff_s: float = 0.5,
                 max_backoff_s: float = 8.0, batch_size: int | None = None, headers: dict[str, str] | None = None,
                 send_ids: bool = False):
        if not url or not url.startswith(("http://", "https://")):
            raise ValueError(f"HttpReward: url must start with http:// or https://, got {url!r}")
        if timeout_s <= 0 or retries < 0:
            raise ValueError("HttpReward: timeout_s must be > 0 and retries >= 0")
        self.url, self.timeout_s, self.retries = url, timeout_s, retries
        self.backoff_s, self.max_backoff_s, self.batch_size = backoff_s, max_backoff_s, batch_size
        self.headers = {"Content-Type": "application/json", **(headers or {})}
        self.send_ids = send_ids
        self.requests = 0  # attempts made, for tests and metrics

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

    def _post(self, payload: dict[str, Any]) -> list[float]:
        body = json.dumps(payload).encode()
        n = len(payload["prompts"])
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1)))
            self.requests += 1
            request = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as reply:
                    raw = reply.read()
            except urllib.error.HTTPError as err:
                detail = err.read()[:200].decode(errors="replace")
                last = f"HTTP {err.code} {err.reason}: {detail}"
                if err.code in RETRY_STATUS:
                    continue
                raise RewardError(f"reward service {self.url} refused the request ({last})") from err
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as err:
                reason = getattr(err, "reason", err)
                last = f"{type(reason).__name__}: {reason}"
                continue
            return self._parse(raw, n)
        raise RewardError(f"reward service {self.url} failed after {self.retries + 1} attempt(s) "
                          f"(timeout {self.timeout_s:g} s): {last}")

    def _parse(self, raw: bytes, n: int) -> list[float]:
        snippet = raw[:200].decode(errors="replace")
        try:
            data = json.loads(raw)
        except ValueError as err:
            raise RewardError(f"reward service {self.url} replied with malformed JSON: {snippet!r}") from err
        rewards = data.get("rewards") if isinstance(data, dict) else None
        if not isinstance(rewards, list):
            raise RewardError(f"reward service {self.url} reply has no 'rewards' list: {snippet!r}")
        if len(rewards) != n:
            raise RewardError(f"reward service {self.url} returned {len(rewards)} rewards for {n} samples")
        return [as_reward(v, f"reward service {self.url} (sample {i})") for i, v in enumerate(rewards)]
