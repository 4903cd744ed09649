"""Registries with exact keys for the open families (vision towers, connectors, LLM families, ...).

A duplicate key raises; an unknown key raises a :class:`TinyLlavaError` that lists the known ones.
Registries are populated by explicit imports in each package's ``__init__``, never by scanning.
"""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from tinyllava_edge.errors import TinyLlavaError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, key: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            self.add(key, obj)
            return obj

        return add

    def add(self, key: str, obj: T) -> None:
        if key in self._entries:
            raise ValueError(f"{self.kind} {key!r} is registered twice")
        self._entries[key] = obj

    def get(self, key: str) -> T:
        try:
            return self._entries[key]
        except KeyError:
            known = ", ".join(sorted(self._entries))
            raise TinyLlavaError(f"unknown {self.kind} {key!r}; known: {known}") from None

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def keys(self) -> list[str]:
        return sorted(self._entries)
