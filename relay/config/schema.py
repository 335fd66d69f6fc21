"""Field checks: pydantic validates a config dataclass against the types and ranges its fields declare; its
errors become `ConfigError` problems named by dotted path (`algo.temperature`, `dataset[0]`)."""
from __future__ import annotations

import dataclasses
import difflib
import functools
from typing import Any

import pydantic

from relay.config.fields import ConfigError, field_kinds, is_group


@functools.cache
def _adapter(cls: type) -> pydantic.TypeAdapter:
    return pydantic.TypeAdapter(cls)


def parse(cls: type, data: dict[str, Any]) -> Any:
    """Build dataclass `cls` from a nested mapping; raises ConfigError listing every invalid field."""
    try:
        return _adapter(cls).validate_python(data)
    except pydantic.ValidationError as err:
        raise ConfigError.invalid([_problem(cls, e) for e in err.errors()]) from None


def field_problems(cfg: Any) -> list[tuple[str, str]]:
    """(path, message) for every field of a built config whose value breaks its declared type or range (a
    config built in code skips `parse`)."""
    try:
        _adapter(type(cfg)).validate_python(dataclasses.asdict(cfg))
    except pydantic.ValidationError as err:
        return [_problem(type(cfg), e) for e in err.errors()]
    return []


def _path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _group_at(cls: type, names: tuple[Any, ...]) -> type | None:
    """The dataclass holding the field at `names` (a loc without its last part)."""
    for name in names:
        entry = field_kinds(cls).get(name) if isinstance(name, str) else None
        if entry is None or not is_group(entry[1]):
            return None
        cls = entry[1].base
    return cls


def _problem(cls: type, e: Any) -> tuple[str, str]:
    loc, kind, ctx = tuple(e["loc"]), e["type"], e.get("ctx") or {}
    got = f", got {e['input']!r}"
    if kind == "unexpected_keyword_argument":
        owner = _group_at(cls, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), [f.name for f in dataclasses.fields(owner)], n=1) if owner else []
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return _path(loc), f"unknown field of {owner.__name__ if owner else 'this group'}{hint}"
    bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
    if kind in bounds:
        limit = next(iter(ctx.values()))
        return _path(loc), f"must be {bounds[kind]} {limit}{got}"
    messages = {
        "finite_number": "must be a finite number",
        "int_parsing": "expected an integer", "int_type": "expected an integer", "int_from_float": "expected an integer",
        "float_parsing": "expected a number", "float_type": "expected a number",
        "bool_parsing": "expected true or false", "bool_type": "expected true or false",
        "string_type": "expected a string", "list_type": "expected a list", "dict_type": "expected a mapping",
        "dataclass_type": f"expected a mapping of {ctx.get('class_name', '')} fields",
        "too_short": f"expected {ctx.get('min_length')} values", "too_long": f"expected {ctx.get('max_length')} values",
        "literal_error": f"not one of {ctx.get('expected', '').replace(' or ', ', ')}",
    }
    if kind == "value_error":
        return _path(loc), f"{ctx.get('error', e['msg'])}{got}"
    return _path(loc), messages.get(kind, e["msg"]) + got
