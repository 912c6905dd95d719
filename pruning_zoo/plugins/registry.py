"""A named registry of things plugins registered, remembering which distribution registered each."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Generic, TypeVar

from pruning_zoo.errors import PluginError, UnknownNameError

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Source:
    """Where a registered thing came from: the plugin and, when installed, its distribution."""

    plugin: str
    distribution: str | None = None
    version: str | None = None

    def __str__(self) -> str:
        if self.distribution is None:
            return f"plugin {self.plugin!r} (not from an installed distribution)"
        return f"{self.distribution} {self.version} (plugin {self.plugin!r})"


@dataclasses.dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    value: T
    source: Source


class Registry(Generic[T]):
    """Names to registered values for one kind of thing ("strategy", "model family")."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def add(self, name: str, value: T, source: Source) -> None:
        if name in self._entries:
            first = self._entries[name].source
            raise PluginError(
                f"{self.kind} {name!r} is registered twice: by {first} and by {source}. Uninstall one "
                "of the two distributions, or load only one of the plugins with PRUNING_ZOO_PLUGINS"
            )
        self._entries[name] = Entry(name, value, source)

    def get(self, name: str) -> T:
        return self.entry(name).value

    def entry(self, name: str) -> Entry[T]:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(self.kind, name, self._entries) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(sorted(self._entries.values(), key=lambda entry: entry.name))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)
