"""metrics.jsonl / TensorBoard / wandb offline logging, resume truncation, and `relay plot`. No Ray."""
from __future__ import annotations

import json

from relay.launch.plot_cmd import plot_run
from relay.metrics import MetricsLogger, read_metrics


def test_logger_writes_jsonl_tensorboard_and_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = MetricsLogger(tmp_path, use_tensorboard=True, use_wandb=True, config={"a": 1})
    for step in range(1, 4):
        logger.log(step, {"loss": 1.0 / step, "lr": 1e-3, "note": "x", "bad": float("nan")})
    logger.close()
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[1]["loss"] == 0.5 and records[0]["bad"] == "nan"
    assert list((tmp_path / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    assert list((tmp_path / "logs").rglob("*.wandb"))


def test_resume_drops_the_partial_tail(tmp_path):
    logger = MetricsLogger(tmp_path, use_tensorboard=False)
    for step in range(1, 6):
        logger.log(step, {"loss": float(step)})
    logger.close()
    resumed = MetricsLogger(tmp_path, use_tensorboard=False, resume_step=3)
    resumed.log(3, {"loss": 30.0})
    resumed.close()
    steps = [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert read_metrics(tmp_path)[-1]["loss"] == 30.0


def test_truncate_mid_run_drops_the_rewound_steps_and_keeps_appending(tmp_path):
    logger = MetricsLogger(tmp_path, use_tensorboard=False)
    for step in range(0, 5):
        logger.log(step, {"loss": float(step)})
    logger.truncate(3)  # the run went back to its episode-2 checkpoint
    for step in (3, 4):
        logger.log(step, {"loss": 10.0 * step})
    logger.close()
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert [r["loss"] for r in rows] == [0.0, 1.0, 2.0, 30.0, 40.0]


def test_plot_draws_known_metrics(tmp_path):
    logger = MetricsLogger(tmp_path, use_tensorboard=False)
    for step in range(1, 5):
        logger.log(step, {"loss": 1.0 / step, "lr": 1e-3 * step, "train/acc": step / 4})
    logger.close()
    paths = plot_run(tmp_path)
    names = sorted(p.name for p in paths)
    assert names == ["accuracy.png", "loss.png", "lr.png"]
    assert all(p.stat().st_size > 1000 and p.read_bytes()[:4] == b"\x89PNG" for p in paths)
