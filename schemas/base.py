"""The base of every params model: unknown keys are errors, values are frozen.

Method params (a condenser's knobs, a loss's knobs, a track's options) live next to the method
and subclass ``Section``; ``schemas/params.py`` assembles them into discriminated unions keyed on
``method`` / ``name`` from the registries, so the allowed names are never listed twice.
"""
from __future__ import annotations

import difflib
import types
import typing
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator

from kdflow.errors import ParamsError


class Section(BaseModel):
    """A params section: ``extra="forbid"`` (a misspelt key is an error), frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, value: Any, info: ValidationInfo) -> Any:
        """``epochs: true`` is a mistake, not 1: a boolean is refused where a number is expected
        (pydantic's lax mode would take it as 1 or 0)."""
        if isinstance(value, bool) and info.field_name in cls.model_fields:
            kinds = _number_kinds(cls.model_fields[info.field_name].annotation)
            if kinds and bool not in kinds:
                raise ValueError(f"must be {'an integer' if float not in kinds else 'a number'}, not a boolean (got {str(value).lower()})")
        return value


def _number_kinds(annotation: Any) -> set[type]:
    """The scalar types among ``int``/``float``/``bool`` an annotation admits (a union's members too)."""
    if annotation in (int, float, bool):
        return {annotation}
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return set().union(*(_number_kinds(a) for a in typing.get_args(annotation)))
    return set()


S = TypeVar("S", bound=Section)

_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _num(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def message(err: dict[str, Any], model: type[BaseModel] | None) -> str:
    """One pydantic problem in words: ``unknown key; did you mean 'factor'?``, ``must be >= 1
    (got 0)``; ``model`` holds the erroneous key (for did-you-mean; None: unknown)."""
    kind, ctx, got = err["type"], err.get("ctx") or {}, err.get("input")
    if kind in _BOUNDS:
        bound = next(iter(ctx.values()))
        return f"must be {_BOUNDS[kind]} {_num(bound)} (got {_num(got)})"
    if kind == "extra_forbidden":
        known = list(model.model_fields) if model is not None else []
        close = difflib.get_close_matches(str(err["loc"][-1]), known, n=1, cutoff=0.5)
        if close:
            return f"unknown key; did you mean '{close[0]}'?"
        return "unknown key" + (f" (allowed: {', '.join(known)})" if known else "")
    if kind == "union_tag_invalid":
        return f"must be one of [{ctx.get('expected_tags')}] (got {ctx.get('tag')!r})"
    if kind == "missing":
        return "required key is missing"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')} (got {got!r})"
    msg = err["msg"].removeprefix("Value error, ")
    return msg if kind == "value_error" or isinstance(got, dict | list) or got is None else f"{msg} (got {got!r})"


def parse_section(model: type[S], raw: dict[str, Any], where: str) -> S:
    """Validate ``raw`` as ``model``; raises ``ParamsError`` with one ``where.key: message`` line
    per problem (e.g. ``condense.factr: unknown key; did you mean 'factor'?``)."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            problems.append(f"{where}.{key}: {message(err, model)}" if key else f"{where}: {message(err, model)}")
        raise ParamsError(problems, source=where) from None
