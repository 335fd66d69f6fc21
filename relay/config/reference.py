"""The field reference (`relay <pipeline> --help`, docs/CONFIG.md): every leaf field with its type, default,
documentation, choices and range, read from the dataclasses."""
from __future__ import annotations

import json
from dataclasses import MISSING

from relay.config.fields import FieldKind, field_kinds, is_group


def _type_name(kind: FieldKind) -> str:
    name = f"{kind.base.__name__}[{'str, ' if kind.base is dict else ''}{_type_name(kind.item)}]" if kind.item else kind.base.__name__
    return f"{name} | None" if kind.optional else name


def _limits(kind: FieldKind) -> str:
    """' Choices: a, b.' / ' Range: > 0.' / ' Each value >= 0 and < 1; 2 values.'"""
    if kind.choices:
        return f" Choices: {', '.join(map(str, kind.choices))}."
    if kind.range:
        return f" Range: {kind.range.text()}."
    if kind.item and kind.item.range:
        low, high = kind.length or (0, None)
        count = f"; {low} values" if low == high else ""
        return f" Each value {kind.item.range.text()}{count}."
    return ""


def field_reference(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted name, type, default, help) for every leaf field: used by --help and the README."""
    rows = []
    for name, (f, kind) in field_kinds(cls).items():
        path = f"{prefix}.{name}" if prefix else name
        if is_group(kind):
            rows += field_reference(kind.base, path)
            continue
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        rows.append((path, _type_name(kind), json.dumps(default), f.metadata.get("help", "") + _limits(kind)))
    return rows
