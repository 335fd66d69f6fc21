"""Generate docs/CONFIG.md from the config dataclasses, so the reference cannot drift from the code.

`python -m relay.launch.config_docs` rewrites it; a test fails when the committed file is stale.
"""
from __future__ import annotations

import sys
from pathlib import Path

from relay.config import PIPELINES, field_reference

DOC_PATH = Path(__file__).resolve().parents[2] / "docs" / "CONFIG.md"


def render() -> str:
    lines = [
        "# Configuration reference",
        "",
        "Generated from the dataclasses in `relay/config/` by `python -m relay.launch.config_docs`; do not edit by hand.",
        "Every field can be set in a YAML preset (nested groups as mappings) or on the command line with",
        "`--set group.field=value`. Invalid values stop the run before any actor starts.",
        "",
    ]
    for name, cls in PIPELINES.items():
        lines += [f"## `relay {name}` ({cls.__name__})", "", (cls.__doc__ or "").strip(), ""]
        lines += ["| field | type | default | meaning |", "|---|---|---|---|"]
        for path, type_name, default, help_text in field_reference(cls):
            lines.append(f"| `{path}` | {type_name.replace(' | ', ' or ')} | `{default}` | {help_text.replace('|', '/')} |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    DOC_PATH.parent.mkdir(parents=True, exist_ok=True)
    DOC_PATH.write_text(render())
    print(DOC_PATH)
    return 0


if __name__ == "__main__":
    sys.exit(main())
