"""Field helpers shared by every config dataclass: `doc` (the one-line documentation), `Range` (bounds declared
with the field, checked by pydantic), the `Group` base (pydantic's strictness settings) and `ConfigError`.

A numeric field declares its range in its type, e.g. `lr: Annotated[float, Range(gt=0)]`; floats are finite
everywhere (`Group`). Imports nothing of Relay's.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import MISSING, dataclass, field
from typing import Annotated, Any, ClassVar, Iterator, Literal

import annotated_types
from pydantic import AfterValidator, BeforeValidator, ConfigDict

Plugin = Literal["ddp", "zero2", "zero2_cpu", "gemini", "gemini_auto", "3d"]
Precision = Literal["fp32", "fp16", "bf16"]
PLUGINS: tuple[str, ...] = typing.get_args(Plugin)
PRECISIONS: tuple[str, ...] = typing.get_args(Precision)


class ConfigError(ValueError):
    """A config value is invalid; the message names the field (dotted path) and, when loaded from one, the file.

    `problems` holds (field path, message) pairs when the error is about fields ("" for the whole config)."""

    def __init__(self, message: str, problems: list[tuple[str, str]] | None = None):
        super().__init__(message)
        self.problems = problems or []

    @classmethod
    def invalid(cls, problems: list[tuple[str, str]], source: str | None = None,
                overridden: dict[str, str] | None = None) -> ConfigError:
        """One error listing every problem; those whose field came from `--set` say so."""
        overridden = overridden or {}
        lines = []
        for path, msg in problems:
            origin = next((f" (from --set {item})" for key, item in overridden.items()
                           if paths_overlap(path, key)), "")
            lines.append(f"{path}: {msg}{origin}" if path else msg)
        head = f"invalid config {source}" if source else "invalid config"
        body = f": {lines[0]}" if len(lines) == 1 else ":\n  " + "\n  ".join(lines)
        return cls(head + body, problems)


def paths_overlap(path: str, key: str) -> bool:
    """Whether dotted field paths `path` and `key` are the same field, or one holds the other."""
    return any(a == b or a.startswith(f"{b}.") or a.startswith(f"{b}[") for a, b in ((path, key), (key, path)))


def doc(help: str, default: Any = MISSING, *, factory: Any = MISSING) -> Any:
    """A dataclass field with its one-line documentation (shown by `--help` and docs/CONFIG.md)."""
    meta = {"help": help}
    if factory is not MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


class Group:
    """Base of every config dataclass. pydantic reads `__pydantic_config__` from plain dataclasses: unknown keys
    are errors, floats must be finite, and numbers given for text fields become text (`wandb_project: 2024`)."""

    __pydantic_config__: ClassVar[ConfigDict] = ConfigDict(
        extra="forbid", allow_inf_nan=False, coerce_numbers_to_str=True)


def _number(value: Any) -> Any:
    # YAML leaves `3e-4` and `nan` as text; true/false are not numbers (pydantic would read them as 1/0).
    if isinstance(value, bool):
        raise ValueError("expected a number")
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value  # pydantic names the type it expected
    return value


@dataclass(frozen=True)
class Range(annotated_types.GroupedMetadata):
    """Bounds of a numeric field, declared in its type: `Annotated[int, Range(ge=1)]`. No bounds = any finite
    value. Also turns numeric text into numbers and refuses booleans."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def __iter__(self) -> Iterator[object]:
        yield BeforeValidator(_number)
        yield annotated_types.Interval(gt=self.gt, ge=self.ge, lt=self.lt, le=self.le)

    def bounds(self) -> dict[str, float]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def text(self) -> str:
        """'> 0', '>= 0 and <= 1', or 'any finite value'."""
        ops = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
        return " and ".join(f"{ops[k]} {v:g}" if isinstance(v, float) else f"{ops[k]} {v}"
                            for k, v in self.bounds().items()) or "any finite value"


def _one_or_many(value: Any) -> Any:
    # `--set dataset=path` means a one-element list
    return [value] if isinstance(value, (str, int, float)) and not isinstance(value, bool) else value


PosInt = Annotated[int, Range(ge=1)]
NonNegInt = Annotated[int, Range(ge=0)]
PosFloat = Annotated[float, Range(gt=0)]
NonNegFloat = Annotated[float, Range(ge=0)]
Fraction = Annotated[float, Range(ge=0, le=1)]
Seed = Annotated[int, Range(ge=0, lt=2**32)]  # numpy's limit; torch takes more
StrList = Annotated[list[str], BeforeValidator(_one_or_many)]

# Placement. Ray's own resource names have their own fields (num_cpus, num_gpus); a custom resource is any other
# name a node was started with (`ray start --resources`), e.g. an accelerator type or a node's `node:<ip>`.
RESERVED_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")
PlacementMode = Literal["auto", "separate", "colocate", "timeshare"]  # auto + relay.cluster.placement.MODES


def _custom_resources(value: dict[str, float]) -> dict[str, float]:
    taken = sorted(k for k in value if k in RESERVED_RESOURCES or not k.strip())
    if taken:
        raise ValueError(f"{', '.join(map(repr, taken))} cannot be a custom resource (CPU/GPU have their own fields)")
    return value


def _node_pin(value: str) -> str:
    key, eq, label = value.partition("=")
    if not key.strip() or (eq and not label.strip()):
        raise ValueError("expected a node label as KEY=VALUE or a custom resource name")
    if not eq and value in RESERVED_RESOURCES:
        raise ValueError(f"{value!r} is on every node; pin to a label or a custom resource")
    return value


Resources = Annotated[dict[str, Annotated[float, Range(ge=0)]], AfterValidator(_custom_resources)]
NodePin = Annotated[str, AfterValidator(_node_pin)]


# ------------------------------------------------------------------------------------------ introspection
@dataclass
class FieldKind:
    """What a field's type declares, for the reference, the checks and the tests."""

    base: Any  # int, float, bool, str, list, or a Group dataclass
    optional: bool = False
    range: Range | None = None
    choices: tuple[Any, ...] = ()
    item: FieldKind | None = None  # list items, or dict values
    length: tuple[int, int | None] | None = None  # list length bounds

    @property
    def numeric(self) -> bool:
        return self.base in (int, float)


def describe(hint: Any) -> FieldKind:
    """Unpack `Annotated[...]`, `X | None`, `Literal[...]` and `list[...]` into a FieldKind."""
    optional = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        if len(args) != 1:
            raise TypeError(f"config fields take one type (or that type | None), got {hint}")
        hint = args[0]
    extras: tuple[Any, ...] = ()
    if typing.get_origin(hint) is Annotated:
        hint, *rest = typing.get_args(hint)
        extras = tuple(rest)
    kind = FieldKind(base=hint, optional=optional)
    kind.range = next((m for m in extras if isinstance(m, Range)), None)
    length = next((m for m in extras if isinstance(m, annotated_types.Len)), None)
    if length is not None:
        kind.length = (length.min_length, length.max_length)
    if typing.get_origin(hint) is Literal:
        kind.choices = typing.get_args(hint)
        kind.base = type(kind.choices[0])
    elif typing.get_origin(hint) is list:
        kind.base, kind.item = list, describe(typing.get_args(hint)[0])
    elif typing.get_origin(hint) is dict:  # text keys; `item` describes the values
        kind.base, kind.item = dict, describe(typing.get_args(hint)[1])
    return kind


def field_kinds(cls: type) -> dict[str, tuple[dataclasses.Field, FieldKind]]:
    """name -> (dataclass field, FieldKind) for every field of a config dataclass."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: (f, describe(hints[f.name])) for f in dataclasses.fields(cls)}


def is_group(kind: FieldKind) -> bool:
    return isinstance(kind.base, type) and dataclasses.is_dataclass(kind.base)
