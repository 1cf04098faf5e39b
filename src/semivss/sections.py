"""The base of every config section: unknown keys are errors and numbers are not coerced.

pydantic's default ("lax") mode reads ``iters: true`` as 1 and ``lr: "0.01"`` as 0.01; a config
typo then runs silently with a value nobody wrote. :class:`Section` refuses a bool or a string
where a number (int or float, optionally inside ``Optional``/``Union``/a tuple or list) is
expected, and a float with a fraction where an int is expected; ints stay valid for float fields.
:data:`ConfigLoader` reads YAML numbers as YAML 1.2 does (``1e-4`` is a float, not the string
PyYAML's YAML 1.1 rules make of it), so that strictness does not reject a usual spelling.
"""

from __future__ import annotations

import re
import types
import typing
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

__all__ = ["ConfigLoader", "Section", "load_yaml"]


def _numeric_kinds(annotation: Any) -> set[type]:
    """The numeric types (int, float) an annotation admits at its top level."""
    if annotation in (int, float):
        return {annotation}
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        kinds: set[type] = set()
        for arg in typing.get_args(annotation):
            if arg is str or arg is bool:
                return set()  # a str or bool is a valid value of this field
            kinds |= _numeric_kinds(arg)
        return kinds
    if origin is typing.Annotated:
        return _numeric_kinds(typing.get_args(annotation)[0])
    return set()


def _item_kinds(annotation: Any) -> set[type]:
    """The numeric item types of a tuple / list annotation (or of its Optional form)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        out: set[type] = set()
        for arg in typing.get_args(annotation):
            out |= _item_kinds(arg)
        return out
    if origin in (tuple, list):
        kinds: set[type] = set()
        for arg in typing.get_args(annotation):
            if arg is not Ellipsis:
                kinds |= _numeric_kinds(arg)
        return kinds
    return set()


def _check_number(value: Any, kinds: set[type]) -> None:
    if not kinds or value is None:
        return
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got the boolean {value}")
    if isinstance(value, str):
        raise ValueError(f"expected a number, got the string {value!r}")
    if kinds == {int} and isinstance(value, float) and not value.is_integer():
        raise ValueError(f"expected an integer, got {value}")


class Section(BaseModel):
    """A config section: ``extra="forbid"`` and no bool/str -> number coercion."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _no_number_coercion(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if field is None:
            return value
        _check_number(value, _numeric_kinds(field.annotation))
        if isinstance(value, (list, tuple)):
            kinds = _item_kinds(field.annotation)
            for item in value:
                _check_number(item, kinds)
        return value


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats (``1e-4``, ``5E3``, ``.5``)."""


ConfigLoader.add_implicit_resolver(  # type: ignore[no-untyped-call]
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """Parse YAML text with :class:`ConfigLoader`."""
    return yaml.load(text, Loader=ConfigLoader)  # noqa: S506 (a SafeLoader subclass)
