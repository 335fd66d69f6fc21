"""Ray token authentication: the token file Relay makes (mode 0600, kept once made, none when RAY_AUTH_TOKEN holds
the token), and a cluster Relay starts refusing a client without the token."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a user who never set up Ray's auth, with `home` as their home folder."""
    env = {k: v for k, v in os.environ.items() if k not in AUTH_VARS}
    return {**env, "HOME": str(home), "PYTHONPATH": str(REPO), **extra}


def ensure_token(env: dict[str, str]) -> str:
    """`ray_auth.ensure_token()` in a fresh process: Ray caches tokens per process, and this one runs the suite's."""
    code = "from relay.launch import ray_auth; print(ray_auth.ensure_token())"
    return subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True,
                          timeout=60).stdout.strip()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_token_file_is_made_once_and_private(tmp_path):
    env = clean_env(tmp_path)
    made = Path(ensure_token(env))
    assert made == tmp_path / ".ray" / "auth_token"  # where `ray get-auth-token` and Ray's CLI look
    assert mode(made) == 0o600 and mode(made.parent) == 0o700
    token = made.read_text()
    assert len(token) == 64 and int(token, 16) >= 0  # 256 random bits, hex
    assert ensure_token(env) == str(made) and made.read_text() == token  # an existing token is kept
    assert [p.name for p in made.parent.iterdir()] == ["auth_token"]  # no temporary files left behind


def test_token_path_env_is_honoured_and_a_readable_token_is_made_private(tmp_path):
    path = tmp_path / "keys" / "cluster_token"
    env = clean_env(tmp_path, RAY_AUTH_TOKEN_PATH=str(path))
    assert ensure_token(env) == str(path) and mode(path) == 0o600
    path.chmod(0o644)  # what Ray 2.60's own `ray get-auth-token --generate` leaves
    token = path.read_text()
    ensure_token(env)
    assert mode(path) == 0o600 and path.read_text() == token
    assert not (tmp_path / ".ray").exists()


def test_no_token_file_for_an_env_token(tmp_path):
    assert ensure_token(clean_env(tmp_path, RAY_AUTH_TOKEN="ab" * 32)) == "None"
    assert not (tmp_path / ".ray").exists()


# A driver that starts a local cluster the way every `relay` command does, then waits until stdin closes.
DRIVER = textwrap.dedent("""
    import json, sys
    from relay.launch.cluster import init_ray
    info = init_ray(address="local", num_cpus=1, include_dashboard=True)
    print(json.dumps(info), flush=True)
    sys.stdin.read()
    import ray
    ray.shutdown()
""")


def status_of(url: str, headers: dict[str, str]) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_cluster_relay_starts_refuses_clients_without_the_token(tmp_path):
    """A user with no token and no RAY_AUTH_MODE: Relay turns auth on, makes ~/.ray/auth_token (0600), and the
    cluster's job-submission API answers 401 without it, 403 with a wrong one, 200 with it."""
    env = clean_env(tmp_path, RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", DRIVER], env=env, cwd=tmp_path, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = ""
        while not line.startswith("{"):  # skip anything else a dependency prints
            line = proc.stdout.readline()
            assert line, "the driver exited before its cluster came up"
        info = json.loads(line)
        token_file = tmp_path / ".ray" / "auth_token"
        assert mode(token_file) == 0o600
        dashboard = info["dashboard_url"]
        assert dashboard.startswith("127.0.0.1:")  # the dashboard stays private to this machine
        jobs = f"http://{dashboard}/api/jobs/"
        assert status_of(jobs, {}) == 401
        assert status_of(jobs, {"Authorization": "Bearer " + "0" * 64}) == 403
        assert status_of(jobs, {"Authorization": f"Bearer {token_file.read_text().strip()}"}) == 200
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_a_user_who_turns_token_mode_off_is_told_once(monkeypatch, capsys):
    from relay.launch import ray_auth

    monkeypatch.setattr(ray_auth, "_warned", False)
    monkeypatch.setenv(ray_auth.MODE_ENV, "off")  # any mode but token
    assert ray_auth.enable() is False and ray_auth.enable() is False
    err = capsys.readouterr().err
    assert err.count("Ray token authentication is off at your request") == 1, err
