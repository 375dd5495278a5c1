"""Name -> factory registries (models, losses, condensation methods, selection strategies)."""
from __future__ import annotations

import difflib
import importlib
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

    A name may also be *declared* with the module that registers it and its metadata
    (``declare``, see ``kdflow.catalog``): names and metadata are then known without importing
    that module (and torch with it); ``get`` imports it on first use, and its ``register`` call
    must repeat the declared metadata (a mismatch is an error, so the two cannot drift).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._meta: dict[str, dict[str, Any]] = {}
        self._declared: dict[str, str] = {}  # name -> module whose import registers it (not yet imported)

    def declare(self, name: str, module: str, **meta: Any) -> None:
        """Declare ``name``, registered by importing ``module``, with its metadata."""
        if name in self._meta:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._declared[name] = module
        self._meta[name] = dict(meta)

    def register(self, name: str, **meta: Any) -> Callable[[T], T]:
        """Register under ``name``; ``meta`` is what the rest derives from (a params model,
        what the entry needs and provides, the tracks it serves, ...)."""
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            full = dict(meta)
            if name in self._declared:
                declared = self._meta[name]
                wrong = sorted(k for k in meta if k not in declared or declared[k] != meta[k])
                if wrong:
                    raise ValueError(f"{self.kind} {name!r}: registered with {wrong} = "
                                     f"{[meta[k] for k in wrong]}, declared (kdflow/catalog.py) with "
                                     f"{[declared.get(k, '<absent>') for k in wrong]}")
                del self._declared[name]
                full = {**declared, **meta}
            self._items[name] = obj
            self._meta[name] = full
            return obj

        return deco

    def meta(self, name: str) -> dict[str, Any]:
        """The metadata ``name`` was registered (or declared) with (UnknownNameError if unknown)."""
        if name not in self._meta:
            self.get(name)
        return self._meta[name]

    def declared(self, name: str) -> str | None:
        """The module a declared, not yet imported ``name`` is registered by (None otherwise)."""
        return self._declared.get(name)

    def items(self) -> list[tuple[str, T]]:
        for name in list(self._declared):
            self.get(name)
        return sorted(self._items.items())

    def get(self, name: str) -> T:
        if name in self._declared:
            module = self._declared[name]
            importlib.import_module(module)
            if name in self._declared:
                raise ValueError(f"{self.kind} {name!r}: importing {module} did not register it "
                                 "(kdflow/catalog.py declares it there)")
        try:
            return self._items[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._meta, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}{hint} (known: {', '.join(sorted(self._meta))})"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._meta)

    def __contains__(self, name: object) -> bool:
        return name in self._meta
