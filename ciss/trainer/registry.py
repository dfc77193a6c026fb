"""Named builders of one kind (methods, backbones, dataset readers), so that a config or flag names
one and an unknown name is refused the same way everywhere.

An entry is the builder itself, or "module:attribute" for one imported on first use (a dataset
reader pulls in only what it needs; the command line lists and checks names without importing torch).
Adding a method, backbone or reader is its module plus one entry in its registry.
"""

from __future__ import annotations

import importlib
from typing import Generic, Iterator, Mapping, TypeVar

from ciss.errors import CissError

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """A read-only mapping of names to builders; `registry[name]` raises CissError for an unknown name."""

    def __init__(self, kind: str, entries: Mapping[str, T | str]):
        self.kind = kind  # what a name names, for the error: "method", "dataset kind"
        self._entries: dict[str, T | str] = dict(entries)

    def check(self, name: str) -> str:
        """`name` if it is registered, without importing its entry; else the one-line refusal."""
        if name not in self._entries:
            raise CissError(f"unknown {self.kind} '{name}'; known: {', '.join(self._entries)}")
        return name

    def __getitem__(self, name: str) -> T:
        entry = self._entries[self.check(name)]
        if isinstance(entry, str):
            module, _, attribute = entry.partition(":")
            entry = self._entries[name] = getattr(importlib.import_module(module), attribute)
        return entry  # type: ignore[return-value]

    # Mapping's own `in` and `get` expect a KeyError from __getitem__
    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def get(self, name: str, default: T | None = None) -> T | None:  # type: ignore[override]
        return self[name] if name in self._entries else default

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
