"""Ray token authentication, on for every cluster Relay starts or attaches to.

Ray reads the token from RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH names, else ~/.ray/auth_token (what
`ray get-auth-token` prints and the dashboard asks for). A local cluster Relay starts gets a token file if none
exists; Relay writes it itself, readable by its owner only (Ray 2.60's own generator leaves it 0644).
Standard library only: callers set this up before Ray starts.
"""
from __future__ import annotations

import os
import secrets
import sys
import tempfile
from pathlib import Path

MODE_ENV = "RAY_AUTH_MODE"
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"


def token_path() -> Path:
    """Where Ray looks for the token file: RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token."""
    return Path(os.environ.get(TOKEN_PATH_ENV) or Path.home() / ".ray" / "auth_token").expanduser()


_warned = False


def enable() -> bool:
    """Token mode unless the user chose otherwise (RAY_AUTH_MODE, said once on stderr); returns whether it is on."""
    global _warned
    mode = os.environ.get(MODE_ENV)
    if mode is not None and mode.lower() != "token" and not _warned:
        _warned = True
        print(f"[relay] {MODE_ENV}={mode}: Ray token authentication is off at your request; anyone who reaches "
              "the cluster's ports can run code on it (unset it to turn authentication back on)",
              file=sys.stderr, flush=True)
    if MODE_ENV not in os.environ:
        os.environ[MODE_ENV] = "token"
        raylet = sys.modules.get("ray._raylet")
        if raylet is not None and not _ray_initialized():
            # Ray caches RAY_AUTH_MODE when it first reads it; ray.init refreshes it the same way when it turns
            # token mode on by itself.
            raylet.Config.initialize("")
    return os.environ[MODE_ENV].lower() == "token"


def ensure_token() -> Path | None:
    """For a cluster Relay starts: make sure a token exists. Returns the token file, or None where RAY_AUTH_TOKEN
    holds the token or token mode is off. A missing file is created with mode 0600 (folder 0700); an existing one
    that others can read (Ray's generator writes 0644) is made 0600: the token lets anyone run code on the cluster."""
    if not enable() or os.environ.get(TOKEN_ENV):
        return None
    path = token_path()
    if path.is_file() and path.read_text().strip():
        if path.stat().st_mode & 0o077 and path.stat().st_uid == os.getuid():
            path.chmod(0o600)
    else:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".auth_token.")  # mkstemp: 0600
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))  # 256 bits, like `ray get-auth-token --generate`
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)  # atomic and never replaces: a token another process wrote first wins
            except FileExistsError:
                if not path.read_text().strip():  # an empty file: no cluster can be using it
                    os.replace(tmp, path)
                    tmp = ""
        finally:
            if tmp:
                os.unlink(tmp)
        raylet = sys.modules.get("ray._raylet")
        if raylet is not None:  # Ray caches "no token" once it has looked
            raylet.AuthenticationTokenLoader.instance().reset_cache()
    return path


def token() -> str | None:
    """The token this process would send (RAY_AUTH_TOKEN, else the token file), or None."""
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV].strip()
    path = token_path()
    if not path.is_file():
        return None
    return path.read_text().strip() or None


def headers() -> dict[str, str]:
    """HTTP headers for the dashboard and job-submission API (Ray's SDK adds them itself in token mode)."""
    value = token()
    return {"Authorization": f"Bearer {value}"} if value else {}


def _ray_initialized() -> bool:
    ray = sys.modules.get("ray")
    return bool(ray is not None and getattr(ray, "is_initialized", lambda: False)())
