"""Imports point one way (DESIGN.md, "Package layout"): `launch` drives everything; nothing below it imports it;
`relay.cluster` (Ray plumbing) sits below actors, learners and buffer; `relay.config` imports nothing of Relay's
but itself and the task registry. Read from the source (lazy imports inside functions count too). No Ray."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

RELAY = Path(__file__).resolve().parents[1] / "relay"


def relay_imports(package: str) -> dict[str, set[str]]:
    """module file -> the relay.* modules it imports anywhere (top level or inside functions)."""
    out: dict[str, set[str]] = {}
    for path in sorted((RELAY / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names if a.name.startswith("relay")}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("relay"):
                names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        out[str(path.relative_to(RELAY.parent))] = names
    return out


def offending(package: str, allowed: tuple[str, ...]) -> list[str]:
    """'file: module' for every import of a relay module outside `allowed` prefixes."""
    def ok(name: str) -> bool:
        return name == "relay" or any(name == a or name.startswith(a + ".") for a in allowed)

    return [f"{f}: {m}" for f, names in relay_imports(package).items() for m in sorted(names) if not ok(m)]


@pytest.mark.parametrize("package", ["actors", "learners", "buffer", "cluster", "config", "models", "data", "algos"])
def test_nothing_below_launch_imports_launch(package):
    bad = [f"{f}: {m}" for f, names in relay_imports(package).items() for m in names if m.startswith("relay.launch")]
    assert not bad, bad


def test_cluster_plumbing_imports_no_layer_above_it():
    assert offending("cluster", ("relay.cluster", "relay.logs", "relay.procmem")) == []  # leaf utilities


def test_config_imports_only_itself_and_the_task_registry():
    assert offending("config", ("relay.config", "relay.tasks")) == []


def test_the_checks_see_lazy_imports():
    # the rule-reward check imports relay.tasks inside a function: the walk must find it, or the tests above
    # would pass on files they never really read
    assert "relay.tasks" in relay_imports("config")["relay/config/rules.py"]
