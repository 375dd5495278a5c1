"""Every key of the pipeline schema, with its type, default, bounds and description.

``kdflow params`` prints these rows. They are read from the pydantic models (and, for a section
chosen by name such as ``condense.method``, from every registered method's params model), so the
list is never written twice.
"""
from __future__ import annotations

import json
import types
import typing
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from schemas.params import PipelineParams, _by_name, _sub_models

_BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<", "min_length": "min length", "max_length": "max length",
           "pattern": "pattern"}


@dataclass(frozen=True)
class Key:
    key: str  # dotted; list items as ``teachers[]``
    type: str
    default: str
    bounds: str
    description: str
    when: str = ""  # e.g. ``condense.method=rded``: the key exists only for that method

    def as_dict(self) -> dict[str, str]:
        return dict(self.__dict__)


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _type_name(typing.get_args(annotation)[0])
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(annotation))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return getattr(annotation, "__name__", str(annotation))


def _default(field: FieldInfo) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "(required)"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(section)"
    return json.dumps(value, default=str)


def _bounds(field: FieldInfo) -> str:
    found = []
    for meta in field.metadata:
        for attr, label in _BOUNDS.items():
            value = getattr(meta, attr, None)
            if value is not None:
                found.append(f"{label} {value}")
    return ", ".join(found)


def schema_rows(model: type[BaseModel] = PipelineParams, prefix: str = "", when: str = "") -> list[Key]:
    """Every key of ``model`` (recursively), in declaration order."""
    rows: list[Key] = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        chooser = _by_name(field)
        annotation = field.annotation
        is_list = typing.get_origin(annotation) is list
        type_name = "section (by name)" if chooser else _type_name(annotation)
        rows.append(Key(path, type_name, _default(field), _bounds(field), field.description or "", when))
        if chooser is not None:
            names = chooser.registry.names()
            rows.append(Key(f"{path}.{chooser.key}", " | ".join(json.dumps(n) for n in names),
                            json.dumps(chooser.default), "", f"Method of {path} (each takes only its own keys).", when))
            for method in chooser.registry.names():
                sub = chooser.model(method)
                cond = f"{path}.{chooser.key}={method}"
                rows += [r for r in schema_rows(sub, path + ".", cond) if r.key != f"{path}.{chooser.key}"]
            continue
        for sub in _sub_models(annotation):
            rows += schema_rows(sub, path + ("[]." if is_list else "."), when)
    return rows
