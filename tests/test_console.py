"""What a person sees on the terminal: Relay's own lines, not its dependencies' (vLLM, ColossalAI, Ray), which go
to SAVE_DIR/logs/*.log unless --verbose; errors as one line, the traceback only with --verbose."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import pytest

from relay import logs
from console_util import console_env, noise_in, relay  # tests/ is on sys.path under pytest


# ------------------------------------------------------------------------------------------------ unit
def test_error_line_is_one_line_without_the_remote_traceback():
    remote = ("actor: train_step failed on rank 1: \x1b[36mray::LearnerWorker.train_step() (pid=123, ip=10.0.0.1, "
              "actor_id=abc)\n  File \"/x/worker.py\", line 10, in train_step\n    raise ValueError('bad batch')\n"
              "ValueError: bad batch")
    assert logs.error_line(RuntimeError(remote)) == "actor: train_step failed on rank 1: ValueError: bad batch"
    assert logs.error_line(ValueError("checkpoint_path: x is a sft checkpoint")) == "checkpoint_path: x is a sft checkpoint"
    assert logs.error_line(KeyError("reward_mean")) == "KeyError: 'reward_mean'"  # the type says what a key is

    class TaskError(Exception):  # like ray.exceptions.RayTaskError: the original exception in .cause
        cause = FileNotFoundError("/data/prompt: no prepared data here")

    assert logs.error_line(TaskError("ray::Foo.bar()\n  File ...\nFileNotFoundError: ...")) == "/data/prompt: no prepared data here"


def test_vllm_reload_warning_explained_once_then_dropped():
    f = logs.ReloadWarningFilter(tied_embeddings=True)

    def record(layer: str) -> logging.LogRecord:
        return logging.LogRecord(logs.VLLM_RELOAD_LOGGER, logging.WARNING, "layerwise.py", 266,
                                 logs.VLLM_RELOAD_MESSAGE, (layer,), None)

    first = record("RotaryEmbedding")
    assert f.filter(first) and first.levelno == logging.INFO
    assert "expected, not an error" in first.getMessage() and first.getMessage().startswith("RotaryEmbedding: ")
    assert not f.filter(record("RotaryEmbedding")) and not f.filter(record("ParallelLMHead"))
    assert f.filter(record("QKVParallelLinear"))  # a layer that should have loaded: vLLM's warning stays
    assert logs.ReloadWarningFilter(tied_embeddings=False).expected("ParallelLMHead") is False


def test_actor_env_carries_log_folder_and_role(monkeypatch, tmp_path):
    from relay.cluster.options import actor_env, actor_options

    monkeypatch.delenv(logs.VERBOSE_ENV, raising=False)
    monkeypatch.delenv(logs.LOG_DIR_ENV, raising=False)
    assert logs.ROLE_ENV not in actor_env(name="generator-0")  # no folder named: nothing redirected
    with logs.run_logs(tmp_path / "logs") as folder:
        env = actor_options(name="generator-0")["runtime_env"]["env_vars"]
        assert env[logs.LOG_DIR_ENV] == str(folder) and env[logs.ROLE_ENV] == "generator-0"
        monkeypatch.setenv(logs.VERBOSE_ENV, "1")
        assert logs.LOG_DIR_ENV not in actor_env(name="generator-0") and logs.log_dir() is None
    assert logs.LOG_DIR_ENV not in os.environ  # restored after the run
    assert logs.role_file_name("relay/control-my run") == "control-my_run.log"


def test_worker_setup_redirects_file_descriptors(tmp_path):
    """Python prints, C-level writes and child processes all land in the role's file, none on the terminal."""
    script = textwrap.dedent("""
        import os, sys, warnings
        from relay import logs
        logs.worker_setup()
        print("python stdout"); print("python stderr", file=sys.stderr)
        warnings.warn("a dependency warning", FutureWarning)
        os.write(2, b"c-level stderr\\n")
        os.system("echo child process")
    """)
    env = console_env(**{logs.LOG_DIR_ENV: str(tmp_path), logs.ROLE_ENV: "generator-3"})
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout == "" and out.stderr == "", out.stdout + out.stderr
    text = (tmp_path / "generator-3.log").read_text()
    for line in ("python stdout", "python stderr", "FutureWarning", "c-level stderr", "child process"):
        assert line in text
    verbose = subprocess.run([sys.executable, "-c", script], env={**env, logs.VERBOSE_ENV: "1"}, capture_output=True,
                             text=True, timeout=120)
    assert "python stdout" in verbose.stdout and "c-level stderr" in verbose.stderr


def test_cli_errors_are_one_line(tmp_path):
    out = relay("plot", str(tmp_path / "missing"), timeout=120)  # an exception inside a command
    lines = out.stderr.strip().splitlines()
    assert out.returncode != 0 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert lines[0].startswith("relay plot: ") and "missing" in lines[0]


# ------------------------------------------------------------------------------------------ pipelines
SFT_SETS = ["--set", "learner.num_ranks=1", "--set", "max_steps=2", "--set", "save_interval=0",
            "--set", "logging.use_tensorboard=false"]


@pytest.fixture(scope="module")
def sft_quiet(tiny_demo_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("console") / "sft"
    out = relay("sft", "--config", "configs/sft_tiny.yaml", "--set", f"dataset={tiny_demo_data / 'sft'}",
                "--set", f"save_dir={run}", *SFT_SETS)
    return run, out


@pytest.mark.slow
def test_sft_console_shows_relay_lines_and_logs_go_to_files(sft_quiet):
    run, out = sft_quiet
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert "[relay sft] step 2/2" in out.stdout and "[relay sft] done: 2 steps" in out.stdout
    assert "Ray dashboard http://127.0.0.1:" in out.stderr  # ray.init's own banner is off
    assert f"actors' output (Ray, vLLM, ColossalAI): {run / 'logs'}/" in out.stderr  # where the rest went
    assert not noise_in(text), (noise_in(text), text[-4000:])
    rank0 = (run / "logs" / "sft-learner-rank0.log").read_text()
    assert "==== relay: sft-learner-rank0" in rank0 and "broadcast_buffers" in rank0  # the DDP FutureWarning


@pytest.mark.slow
def test_sft_verbose_shows_dependency_output(tiny_demo_data, tmp_path):
    out = relay("sft", "--config", "configs/sft_tiny.yaml", "--set", f"dataset={tiny_demo_data / 'sft'}",
                "--set", f"save_dir={tmp_path / 'sft'}", *SFT_SETS, "--verbose")
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert "[relay sft] step 2/2" in out.stdout
    assert "(LearnerWorker pid=" in text and "broadcast_buffers" in text, text[-4000:]
    assert not list((tmp_path / "sft" / "logs").glob("*.log"))


@pytest.mark.slow
def test_pipeline_error_is_one_line_unless_verbose(sft_quiet, tiny_demo_data, tmp_path):
    run, _ = sft_quiet
    args = ["dpo", "--config", "configs/dpo_tiny.yaml", "--set", f"dataset={tiny_demo_data / 'preference'}",
            "--set", f"save_dir={tmp_path / 'dpo'}", "--set", f"checkpoint_path={run}"]
    out = relay(*args, timeout=300)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert lines[0].startswith("relay dpo: error: checkpoint_path: ") and "is a sft checkpoint, not dpo" in lines[0]
    assert f"traceback in {tmp_path / 'dpo' / 'logs' / 'driver.log'}; --verbose prints it" in lines[0]
    assert "Traceback (most recent call last)" in (tmp_path / "dpo" / "logs" / "driver.log").read_text()
    out = relay(*args, "--verbose", timeout=300)
    assert out.returncode == 1 and "Traceback (most recent call last)" in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("ValueError: checkpoint_path: ")


# The PPO console (one line per episode, vLLM in its log) is checked on the first run of test_ppo_determinism.py.
