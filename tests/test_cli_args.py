"""Numeric command-line options are finite and in range: a bad one is one usage line naming it. No Ray."""
from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("argv, needle", [
    (["--temperature", "nan"], "argument --temperature: expected a finite number, got 'nan'"),
    (["--temperature", "-1"], "argument --temperature: must be >= 0, got -1"),
    (["--pass-threshold", "inf"], "argument --pass-threshold: expected a finite number, got 'inf'"),
    (["--beta", "x"], "argument --beta: expected a number, got 'x'"),
])
def test_eval_rejects_bad_numbers(argv, needle, capsys):
    from relay.launch.eval_cmd import build_parser

    with pytest.raises(SystemExit) as err:
        build_parser().parse_args(["--model", "m", *argv])
    assert err.value.code == 2 and needle in capsys.readouterr().err


def test_chat_top_p_is_a_probability(capsys):
    from relay.launch.chat import build_parser

    assert build_parser().parse_args(["--model", "m", "--top-p", "1"]).top_p == 1.0
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--model", "m", "--top-p", "1.5"])
    assert "argument --top-p: must be in [0, 1], got 1.5" in capsys.readouterr().err


def test_cli_number_error_is_one_line():
    out = subprocess.run([sys.executable, "-m", "relay.launch.cli", "eval", "--model", "m", "--temperature", "nan"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == "relay eval: error: argument --temperature: expected a finite number, got 'nan'"
