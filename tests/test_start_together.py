"""`start_together`: starters run side by side; every result reaches `keep` even when another starter fails, and
the first failure (in the starters' order) is raised once all have ended."""
from __future__ import annotations

import threading
import time

import pytest

from relay.cluster.together import start_together


def test_starters_run_side_by_side_and_every_result_is_kept():
    barrier = threading.Barrier(3, timeout=10)  # only passes if all three are running at once
    kept: dict[str, int] = {}

    def starter(value: int):
        def run() -> int:
            barrier.wait()
            return value
        return run

    start_together({"a": starter(1), "b": starter(2), "c": starter(3)}, keep=kept.__setitem__)
    assert kept == {"a": 1, "b": 2, "c": 3}


def test_a_failure_is_raised_after_the_others_finish_and_they_are_kept():
    kept: dict[str, str] = {}
    finished: list[str] = []

    def slow() -> str:
        time.sleep(0.3)
        finished.append("slow")
        return "up"

    def fail(msg: str):
        def run():
            raise RuntimeError(msg)
        return run

    with pytest.raises(RuntimeError, match="first") as info:
        start_together({"one": fail("first"), "slow": slow, "two": fail("second")}, keep=kept.__setitem__)
    assert finished == ["slow"] and kept == {"slow": "up"}  # the caller can shut down what did start
    assert any("two" in note and "second" in note for note in info.value.__notes__)
