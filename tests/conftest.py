"""Shared fixtures: one Ray session for the suite, tiny models built once."""
from __future__ import annotations

import os
import shutil
import tempfile

for _k, _v in {
    "RAY_AUTH_MODE": "token",
    "RAY_USAGE_STATS_ENABLED": "0",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "TOKENIZERS_PARALLELISM": "false",
    # Every cluster the suite starts (the session's, private heads, multi-node ones) skips Ray's metrics
    # collection: nothing here reads it, and its dashboard agents used a third as much CPU with it off.
    "RAY_enable_metrics_collection": "0",
}.items():
    os.environ.setdefault(_k, _v)

from relay.launch.cluster import DRIVER_ENV  # noqa: E402

# What a `relay` driver sets before its cluster starts, set here too for the clusters tests start with `ray start`
# (private heads, multi-node), which init_ray never sees.
for _k, _v in DRIVER_ENV.items():
    os.environ.setdefault(_k, _v)

# Ray token authentication on, with a token private to this session (RAY_AUTH_TOKEN_PATH, made by Relay as for any
# cluster it starts) unless the caller brought one: the suite never writes ~/.ray/auth_token. Every cluster the
# tests start, `relay` subprocesses and private `ray start` heads included, inherits it.
_TOKEN_DIR = None
if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
    _TOKEN_DIR = tempfile.mkdtemp(prefix="relay-auth-")
    os.environ["RAY_AUTH_TOKEN_PATH"] = os.path.join(_TOKEN_DIR, "auth_token")

from relay.launch import ray_auth  # noqa: E402

ray_auth.ensure_token()

import pytest  # noqa: E402


# Test files that start PPO systems, vLLM engines or Ray clusters, heaviest first (by their time in a serial run
# on 2 cores). With `make test TEST_WORKERS=2` (pytest-xdist, a file per worker at a time, in collection order:
# `--no-loadscope-reorder`) the workers take these first and the many light files fill in behind them; xdist's
# default order (files with the most tests first) left the heaviest for the end, one worker finishing alone.
HEAVY_FIRST = (
    "faults/test_fault_learners.py", "test_ppo_e2e.py", "test_multinode_ppo.py", "test_console.py", "test_jobs.py",
    "test_generator_pool.py", "faults/test_fault_engine.py", "test_ppo_determinism.py", "test_ppo_ops.py",
    "faults/test_fault_actors.py", "test_stop_job.py", "test_generator.py", "test_eval_cmd.py", "test_chat.py",
    "test_placement_cluster.py", "test_learner_group.py", "test_train_stages.py", "test_weight_sync.py",
    "test_quantize.py",
)


def pytest_collection_modifyitems(config, items):
    if not hasattr(config, "workerinput"):  # a serial run keeps the file order
        return
    from pathlib import Path

    tests, rank = Path(__file__).resolve().parent, {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(Path(item.path).resolve().relative_to(tests).as_posix(), len(rank)))


def pytest_unconfigure(config):
    if _TOKEN_DIR:
        shutil.rmtree(_TOKEN_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """One local Ray cluster for the whole suite, with generous logical CPUs (actors use fractional quotas)."""
    import ray

    from relay.launch.cluster import init_ray

    init_ray(address="local", num_cpus=16, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_llama_dir():
    from relay.models.tiny import TinyModelSpec, build_tiny_model

    return build_tiny_model(TinyModelSpec(family="llama"))


@pytest.fixture(scope="session")
def tiny_qwen2_dir():
    from relay.models.tiny import TinyModelSpec, build_tiny_model

    return build_tiny_model(TinyModelSpec(family="qwen2"))


@pytest.fixture(scope="session")
def tiny_demo_data(tmp_path_factory):
    """`relay data demo OUT -t tiny` once for the suite: prepared sft/preference/prompt/ptx folders under OUT."""
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path_factory.mktemp("tiny_demo_data")
    subprocess.run([sys.executable, "-m", "relay.launch.cli", "data", "demo", str(out), "-t", "tiny"],
                   check=True, cwd=Path(__file__).resolve().parents[1], capture_output=True, timeout=300)
    return out


@pytest.fixture(scope="module")
def no_kept_transfer_folder():
    """A module whose pushes run in the test process starts and ends without a transfer folder kept by this
    process (`WeightPush.reuse`: pool pushes with `local_sender` keep one until the process ends), so
    leftover checks see only their own pushes and later files none of theirs."""
    from relay import scratch

    scratch.release_reused_dirs()
    yield
    scratch.release_reused_dirs()


@pytest.fixture
def log_lines():
    """`log_lines("relay.x")` -> a list that collects that logger's messages (INFO and up) until the test ends.
    A handler on the logger itself: caplog misses records once `relay.logs.quiet_console` stops propagation."""
    import logging

    attached: list[tuple[logging.Logger, logging.Handler, int]] = []

    class Collect(logging.Handler):
        def __init__(self, sink: list[str]) -> None:
            super().__init__(logging.INFO)
            self.sink = sink

        def emit(self, record: logging.LogRecord) -> None:
            self.sink.append(record.getMessage())

    def attach(name: str) -> list[str]:
        lines: list[str] = []
        logger, handler = logging.getLogger(name), Collect(lines)
        attached.append((logger, handler, logger.level))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        return lines

    yield attach
    for logger, handler, level in attached:
        logger.removeHandler(handler)
        logger.setLevel(level)
