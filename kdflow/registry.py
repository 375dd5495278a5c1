"""Name -> factory registries (models, losses, condensation methods, selection strategies)."""
from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from kdflow.errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """A registry of factories under string names.

    Example:
        MODELS = Registry("model")

        @MODELS.register("mlp")
        def mlp(...): ...
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._meta: dict[str, dict[str, Any]] = {}

    def register(self, name: str, **meta: Any) -> Callable[[T], T]:
        """Register under ``name``; ``meta`` is what the rest derives from (a params model,
        what the entry needs and provides, the tracks it serves, ...)."""
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            self._meta[name] = dict(meta)
            return obj

        return deco

    def meta(self, name: str) -> dict[str, Any]:
        """The metadata ``name`` was registered with (UnknownNameError if unknown)."""
        self.get(name)
        return self._meta[name]

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._items.items())

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._items, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}{hint} (known: {', '.join(sorted(self._items))})"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items
