"""Readable messages for a spec that does not validate: file and line, dotted path, expected type, got value."""
from __future__ import annotations

import difflib
import types
import typing
from typing import Any

from pydantic import BaseModel, ValidationError

from orchestrator.config.paths import Path_, mentioned_path, suggest, unwrap_section
from orchestrator.config.schema import ExperimentSpec


# pydantic error types of a value outside its allowed range
_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number",
                 "too_short", "too_long", "string_too_short"}


def where(prov: dict[Path_, str], loc: Path_, source: str) -> str:
    """"file:line" of the deepest known key along `loc` (else the source name)."""
    for n in range(len(loc), 0, -1):
        if loc[:n] in prov:
            return prov[loc[:n]]
    return source


def format_validation_errors(err: ValidationError, prov: dict[Path_, str], source: str) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(str(p) for p in e["loc"])
        dotted = ".".join(loc) or "<top level>"
        if e["type"] == "missing":
            lines.append(f"{where(prov, loc, source)}: {dotted}: missing; it is required")
        elif e["type"] == "extra_forbidden":
            near = suggest(dotted)
            hint = f"; did you mean {near}?" if near else ""
            lines.append(f"{where(prov, loc, source)}: {dotted}: unknown key{hint}")
        elif e["type"] == "value_error" and not isinstance(e.get("input"), (int, float, str)):
            # A rule across fields (a section or the whole spec): its message names the path it is about.
            message = e["msg"].removeprefix("Value error, ")
            named = mentioned_path(message) or loc
            path = ".".join(named) or dotted
            said = message if message.startswith(path) else f"{path}: {message}"
            lines.append(f"{where(prov, named, source)}: {said}")
        elif e["type"] in _RANGE_ERRORS or e["type"] == "value_error":
            # The value has the right type but not an allowed value: say what it must be.
            rule = e["msg"].removeprefix("Value error, ").replace("Input should be ", "must be ")
            lines.append(f"{where(prov, loc, source)}: {dotted}: got {show(e.get('input'))}: {rule}")
        else:
            lines.append(f"{where(prov, loc, source)}: {dotted}: expected {expected_at(loc)}, "
                         f"got {show(e.get('input'))} ({e['msg']})")
    if len(lines) == 1:
        return lines[0]
    return f"invalid experiment spec ({len(lines)} problems):\n  " + "\n  ".join(lines)


def expected_at(loc: Path_) -> str:
    """A readable type for the value at `loc`, from the schema."""
    cls: type[BaseModel] | None = ExperimentSpec
    annotation: Any = ExperimentSpec
    for part in loc:
        if cls is not None:
            field = cls.model_fields.get(part)
            if field is None:
                return "a valid value"
            annotation = field.annotation
            cls = unwrap_section(annotation)
            continue
        # Inside a container: step to its element type.
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        origin = typing.get_origin(annotation)
        if origin is dict and len(args) == 2:
            annotation = args[1]
        elif origin is tuple and args:
            annotation = args[min(int(part), len(args) - 1)] if part.isdigit() else args[0]
        elif origin is list and args:
            annotation = args[0]
        else:
            return type_name(annotation)
        cls = unwrap_section(annotation)
    if cls is not None and not typing.get_args(annotation):
        return "a mapping (section)"
    return type_name(annotation)


def type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    if origin is dict:
        return f"a mapping of {type_name(args[0])} to {type_name(args[1])}" if args else "a mapping"
    if origin is tuple:
        return f"a list of {len(args)} values ({', '.join(type_name(a) for a in args)})"
    if origin is list:
        return f"a list of {type_name(args[0])}" if args else "a list"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "a mapping (section)"
    if annotation is typing.Any:
        return "any value"
    return getattr(annotation, "__name__", str(annotation))


def unknown_model(name: str, names: list[str], prov: dict[Path_, str], source: str) -> str:
    near = difflib.get_close_matches(str(name), names, n=1, cutoff=0.5)
    hint = f"; did you mean {near[0]}?" if near else ""
    return (f"{where(prov, ('model', 'name'), source)}: model.name: unknown model {name!r}{hint} "
            f"(known: {', '.join(names)})")


def show(value: Any) -> str:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({type(value).__name__})"
