"""The benchmarks' comma-list options (`benchmarks.common.int_list` / `name_list` as argparse types): what they
parse to, and a bad list refused by argparse with the option named. No Ray, no benchmark run."""
from __future__ import annotations

import argparse

import pytest

from benchmarks.common import int_list, name_list


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bench")
    ap.add_argument("--threads", type=int_list, default="1,2")
    ap.add_argument("--placements", type=name_list, default="separate,timeshare")
    return ap


def test_defaults_and_given_lists_parse_to_lists():
    args = _parser().parse_args([])
    assert args.threads == [1, 2] and args.placements == ["separate", "timeshare"]
    args = _parser().parse_args(["--threads", " 4, ,8,", "--placements", "timeshare , separate"])
    assert args.threads == [4, 8] and args.placements == ["timeshare", "separate"]


def test_a_list_that_is_not_integers_is_refused_naming_the_option(capsys):
    with pytest.raises(SystemExit) as stop:
        _parser().parse_args(["--threads", "1,two"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "--threads" in err and "not a comma-separated list of integers: '1,two'" in err
