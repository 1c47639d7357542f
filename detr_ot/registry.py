"""A name -> class registry, so a new matcher or loss is one file plus one line of config."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps a config name to a constructor.

    >>> MATCHERS = Registry("matcher")
    >>> @MATCHERS.register("hungarian")
    ... class HungarianMatcher: ...
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., T]] = {}
        self._options: dict[str, type | None] = {}

    def register(
        self, name: str, options: type | None = None
    ) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Register ``obj`` under ``name``. ``options`` is an optional dataclass holding the entry's own
        config keys (e.g. ``matcher.sinkhorn.epsilon``); the config loader validates them against it."""

        def deco(obj: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise KeyError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            self._options[name] = options
            return obj

        return deco

    def options(self, name: str) -> type | None:
        """The options dataclass of ``name`` (None if it takes none)."""
        self.get(name)
        return self._options[name]

    def get(self, name: str) -> Callable[..., T]:
        if name not in self._entries:
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {sorted(self._entries)}")
        return self._entries[name]

    def build(self, name: str, *args: Any, **kwargs: Any) -> T:
        return self.get(name)(*args, **kwargs)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries
