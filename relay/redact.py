"""Secrets kept out of what Relay prints and records (logs, error messages, metrics, eval reports).

A reward service URL may carry credentials (``https://user:pass@host/``) or a token in its query string
(``?token=...``), and an HTTP client may send an Authorization header. `redact_url` gives the form to show,
`url_secrets` / `header_secrets` the strings to scrub from any other text (a server may echo them back), and
`redact_config` walks a config dict before it goes to a metrics sink.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

REDACTED = "***"
# Header names whose values are secrets (case-insensitive, anywhere in the name: X-Auth-Token, Authorization).
SECRET_NAME = re.compile(r"auth|token|secret|passw|api[-_]?key|cookie|credential|signature", re.IGNORECASE)
# Config keys whose string values are secrets: whole words only, so max_tokens or tokenizer_dir stay visible.
SECRET_KEY = re.compile(r"(^|[-_])(token|secret|password|passwd|api[-_]?key|apikey|auth|authorization|cookie|"
                        r"credentials?)([-_]|$)", re.IGNORECASE)
MIN_SCRUB = 4  # shorter strings are too common to replace in free text ("1", "abc"); nothing real is that short


def redact_url(url: str) -> str:
    """`url` with its userinfo and every query and fragment value replaced by ***: what logs may show."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rsplit('@', 1)[1]}"
    shown = f"{parts.scheme}://{netloc}{parts.path}" if parts.scheme else f"{netloc}{parts.path}"
    if parts.query:
        keys = [item.split("=", 1)[0] for item in parts.query.split("&") if item]
        shown += "?" + "&".join(f"{k}={REDACTED}" for k in keys)
    if parts.fragment:
        shown += f"#{REDACTED}"
    return shown


def url_secrets(url: str) -> list[str]:
    """The secret parts of `url` (userinfo, its user and password, query and fragment values), raw and
    percent-decoded, for `scrub`."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return [url]
    found: list[str] = []
    if "@" in parts.netloc:
        userinfo = parts.netloc.rsplit("@", 1)[0]
        found += [userinfo, *userinfo.split(":", 1)]
    for item in parts.query.split("&"):
        if "=" in item:
            found.append(item.split("=", 1)[1])
    if parts.fragment:
        found.append(parts.fragment)
    return _expand(found)


def header_secrets(headers: Mapping[str, str]) -> list[str]:
    """Values of secret-looking headers (Authorization, X-Api-Key, Cookie, ...) and their credential part
    (``Bearer <token>`` -> ``<token>``)."""
    found: list[str] = []
    for name, value in headers.items():
        if SECRET_NAME.search(name) and value:
            found += [value, value.split(" ", 1)[-1]]
    return _expand(found)


def _expand(values: Iterable[str]) -> list[str]:
    out = {v for raw in values for v in (raw, unquote(raw)) if len(v) >= MIN_SCRUB}
    return sorted(out, key=len, reverse=True)  # longest first: a secret containing another is scrubbed whole


def scrub(text: str, secrets: Iterable[str]) -> str:
    """`text` with every occurrence of each secret replaced by ***."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text


def redact_config(value: Any, key: str = "") -> Any:
    """A copy of a (nested) config dict fit for metrics sinks: URLs redacted, string values under secret keys
    (`SECRET_KEY`: ``api_key``, ``token``, a headers mapping's ``Authorization``) replaced by ***."""
    if isinstance(value, Mapping):
        return {k: redact_config(v, str(k)) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(redact_config(v, key) for v in value)
    if isinstance(value, str) and value:
        if key and SECRET_KEY.search(key):
            return REDACTED
        if "://" in value:
            return redact_url(value)
    return value
