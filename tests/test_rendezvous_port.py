"""The learner group's rendezvous port: drawn outside the kernel's ephemeral range, so an outgoing connection
cannot take it between the check and the process group's bind (the EADDRINUSE a group start once hit under load)."""
from __future__ import annotations

import random
import socket

import pytest

from relay.cluster import calls


def _ephemeral_low() -> int:
    with open(calls.EPHEMERAL_RANGE_FILE) as f:
        return int(f.read().split()[0])


def test_port_is_free_and_below_the_ephemeral_range():
    if calls.rendezvous_range() is None:
        pytest.skip(f"this kernel's ephemeral range ({calls.EPHEMERAL_RANGE_FILE}) leaves no room below it")
    for _ in range(20):
        port = calls.free_port()
        assert calls.RENDEZVOUS_PORTS[0] <= port < _ephemeral_low()
        with socket.socket() as s:
            s.bind(("", port))  # still free: raises if the check lied


def test_a_taken_port_is_skipped(monkeypatch):
    monkeypatch.setattr(calls, "rendezvous_range", lambda: (20000, 20001))  # two ports: the draw must skip one
    first = random.Random(7).randint(20000, 20001)
    with socket.socket() as held:
        held.bind(("", first))
        held.listen()
        assert calls.free_port(random.Random(7)) != first


def test_range_follows_the_kernels_ephemeral_range(tmp_path, monkeypatch):
    f = tmp_path / "range"
    f.write_text("25000\t60999\n")
    assert calls.rendezvous_range(str(f)) == (20000, 24999)
    f.write_text("1024\t65535\n")  # no room below it: the kernel's pick (port 0) is used
    assert calls.rendezvous_range(str(f)) is None
    monkeypatch.setattr(calls, "EPHEMERAL_RANGE_FILE", str(f))
    with socket.socket() as s:
        s.bind(("", calls.free_port()))
    assert calls.rendezvous_range(str(tmp_path / "missing")) == calls.RENDEZVOUS_PORTS
