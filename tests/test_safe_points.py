"""Stopping cleanly: the signal flag, the grace period, the save schedule, `--resume auto` on the command line and
the config fields behind them. No Ray."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from relay.launch import safe_points
from relay.launch.safe_points import GracefulStop, SaveSchedule, resume_command


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_save_schedule_by_steps_and_by_minutes():
    clock = FakeClock()
    by_steps = SaveSchedule(interval=3, minutes=0, clock=clock)
    assert [n for n in range(1, 10) if by_steps.due(n)] == [3, 6, 9]
    by_time = SaveSchedule(interval=0, minutes=2, clock=clock)
    clock.now += 119
    assert not by_time.due(1)
    clock.now += 1  # two minutes since the schedule started
    assert by_time.due(2)
    by_time.saved()
    clock.now += 60
    assert not by_time.due(3)  # counted from the last save, not from the start
    assert not SaveSchedule(interval=0, minutes=0, clock=clock).due(5)  # both off: only the final save


def test_first_signal_asks_second_stops_at_once():
    notes: list[str] = []
    stop = GracefulStop(grace_s=0, note=notes.append)
    assert not stop.requested
    stop.request(signal.SIGTERM)
    assert stop.requested and stop.name == "SIGTERM" and stop.exit_code() == 143
    assert len(notes) == 1 and "received SIGTERM" in notes[0] and "next safe point" in notes[0]
    with pytest.raises(KeyboardInterrupt):
        stop.request(signal.SIGINT)


def test_grace_period_runs_cleanups_then_exits():
    exited = threading.Event()
    codes: list[int] = []
    cleaned: list[str] = []
    notes: list[str] = []

    def fake_exit(code: int) -> None:
        codes.append(code)
        exited.set()

    stop = GracefulStop(grace_s=0.2, note=notes.append, exit=fake_exit)
    stop.add_cleanup(lambda: cleaned.append("shm"))
    forget = stop.add_cleanup(lambda: cleaned.append("unregistered"))
    forget()
    t0 = time.monotonic()
    stop.request(signal.SIGTERM)
    assert exited.wait(5)
    assert time.monotonic() - t0 >= 0.2
    assert codes == [143] and cleaned == ["shm"]
    assert "no safe point reached within 0.2 s of SIGTERM" in notes[-1] and "--resume auto" in notes[-1]


def test_reaching_the_safe_point_in_time_cancels_the_forced_exit():
    codes: list[int] = []
    stop = GracefulStop(grace_s=0.2, note=lambda m: None, exit=codes.append)
    stop.request(signal.SIGINT)
    stop.uninstall()  # what `stop_on_signals` does when the run has returned
    time.sleep(0.4)
    assert codes == []


def test_a_real_sigterm_sets_the_flag_and_handlers_are_restored(capfd):
    before = signal.getsignal(signal.SIGTERM)
    with safe_points.stop_on_signals(grace_s=0) as stop:
        assert safe_points.active() is stop and not safe_points.stop_requested()
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while not stop.requested and time.monotonic() < deadline:
            time.sleep(0.01)  # Python runs the handler between bytecodes of the main thread
        assert safe_points.stop_requested() and stop.name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before and safe_points.active() is None
    assert "[relay] received SIGTERM" in capfd.readouterr().err


def test_signals_are_taken_back_after_ray_replaces_the_handler():
    """ray.init installs its own SIGTERM handler (sys.exit) in the driver; init_ray reclaims ours."""
    with safe_points.stop_on_signals(grace_s=0) as stop:
        signal.signal(signal.SIGTERM, lambda s, f: None)  # what ray.init does
        safe_points.reclaim_signals()
        handler = signal.getsignal(signal.SIGTERM)
        assert getattr(handler, "__self__", None) is stop
    assert signal.getsignal(signal.SIGTERM) is not handler  # the original comes back, not Ray's


def test_finish_and_resume_command():
    stop = GracefulStop(grace_s=0, note=lambda m: None)
    stop.request(signal.SIGTERM)
    stop.finish("after step 3 of 10", None)
    assert stop.outcome == "stopped by SIGTERM after step 3 of 10; no checkpoint yet (nothing trained)"
    argv = ["--config", "configs/sft_tiny.yaml", "--resume", "/old/run", "--set", "save_dir=/runs/a b"]
    assert resume_command("sft", argv) == ("relay sft --config configs/sft_tiny.yaml --set 'save_dir=/runs/a b' "
                                           "--resume auto")
    assert resume_command("ppo", ["--resume=auto"]) == "relay ppo --resume auto"


# ------------------------------------------------------------------------------------------- CLI and config
@pytest.mark.parametrize("pipeline", ["sft", "rm", "dpo", "ppo"])
def test_resume_flag_sets_checkpoint_path(pipeline, capsys):
    import yaml

    from relay.launch.pipeline_cmd import run_pipeline

    assert run_pipeline(pipeline, ["--resume", "auto", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["checkpoint_path"] == "auto"
    assert printed["keep_checkpoints"] == 2 and printed["stop_grace_s"] == 60.0
    assert printed["save_every_minutes"] == 30.0  # lost work is bounded by default, not only at the end


@pytest.mark.parametrize("field, value", [("keep_checkpoints", "-1"), ("save_every_minutes", "nan"),
                                          ("stop_grace_s", "-5"), ("stop_grace_s", "inf")])
@pytest.mark.parametrize("pipeline", ["sft", "ppo"])
def test_bad_saving_fields_are_named(pipeline, field, value):
    from relay.config import ConfigError, load_config, validate

    with pytest.raises(ConfigError, match=rf"\b{field}: must be"):
        validate(load_config(pipeline, None, [f"{field}={value}"]), "cpu")


def fake_runner(cfg) -> int:
    """Stands in for relay.launch.train:run_sft: a SIGTERM arrives, the loop stops at its safe point."""
    from pathlib import Path

    os.kill(os.getpid(), signal.SIGTERM)
    stop = safe_points.active()
    deadline = time.monotonic() + 5
    while not stop.requested and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.finish("after step 2 of 5", Path(cfg.save_dir) / "checkpoints" / "step-00000002")
    return 0


def test_a_stopped_run_exits_143_and_prints_how_to_continue(monkeypatch, tmp_path, capsys):
    from relay.launch import pipeline_cmd

    monkeypatch.setitem(pipeline_cmd.RUNNERS, "sft", "test_safe_points:fake_runner")
    argv = ["--set", f"save_dir={tmp_path}", "--set", "stop_grace_s=30"]
    assert pipeline_cmd.run_pipeline("sft", argv) == 143
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == (f"relay sft: stopped by SIGTERM after step 2 of 5; checkpoint {tmp_path}/checkpoints/step-00000002. "
                    f"To continue: relay sft --set save_dir={tmp_path} --set stop_grace_s=30 --resume auto")
    assert safe_points.active() is None  # handlers and the grace timer are gone with the run


def test_forced_exit_after_the_checkpoint_says_it_was_written():
    notes: list[str] = []
    codes: list[int] = []
    stop = GracefulStop(grace_s=0, note=notes.append, exit=codes.append)
    stop.request(signal.SIGTERM)
    stop.finish("after step 4 of 9", None)
    stop.expire()
    assert codes == [143] and notes[-1].startswith("stopped by SIGTERM after step 4 of 9") and "exiting now" in notes[-1]
