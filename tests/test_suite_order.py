"""The parallel suite's order (tests/conftest.py HEAVY_FIRST) names test files that exist: a renamed file would
silently drop to the end of the queue, where one xdist worker would run it alone."""
from __future__ import annotations

from pathlib import Path

from conftest import HEAVY_FIRST  # tests/ is on sys.path under pytest

TESTS = Path(__file__).resolve().parent


def test_heavy_first_names_existing_test_files_once():
    assert len(set(HEAVY_FIRST)) == len(HEAVY_FIRST)
    assert [name for name in HEAVY_FIRST if not (TESTS / name).is_file()] == []
