"""A name -> entry table: quantization schemes, backends, tasks, built-in models, model sources and mitigations
all use it, so `qharness list X` and `--X name` read the same table and a new entry is one file (or one line).
Entries come by a decorator or by `add`:

    MITIGATIONS = Registry("mitigation")

    @MITIGATIONS.register("kv_bias")
    class KVBias: ...

    SCHEMES.add("int8-w8a8-token", QuantScheme(...), aliases=("int8",))
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from qharness.core.errors import QHarnessError, UnknownName

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    obj: T
    owner: str  # module that registered it, named in duplicate errors
    meta: dict[str, Any] = field(default_factory=dict)


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind  # "scheme", "task", ...: used in error messages
        self._entries: dict[str, Entry[T]] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, *, aliases: tuple[str, ...] = (), **meta: Any) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            self.add(name, obj, aliases=aliases, **meta)
            return obj

        return decorator

    def add(self, name: str, obj: T, *, aliases: tuple[str, ...] = (), **meta: Any) -> None:
        owner = getattr(obj, "__module__", None) or type(obj).__module__
        for key in (name, *aliases):
            clash = self._entries.get(key) or self._entries.get(self._aliases.get(key, ""))
            if clash is not None:
                raise QHarnessError(
                    f"{self.kind} name '{key}' registered twice: by {clash.owner} and by {owner}"
                )
        self._entries[name] = Entry(name, obj, owner, dict(meta))
        self._aliases.update({alias: name for alias in aliases})

    def resolve(self, name: str) -> str:
        """The canonical name for `name` or one of its aliases."""
        if name in self._entries:
            return name
        if name in self._aliases:
            return self._aliases[name]
        raise UnknownName(self._unknown_message(name))

    def get(self, name: str) -> T:
        return self._entries[self.resolve(name)].obj

    def entry(self, name: str) -> Entry[T]:
        return self._entries[self.resolve(name)]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def aliases_of(self, name: str) -> list[str]:
        return sorted(alias for alias, target in self._aliases.items() if target == name)

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._aliases

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(self._entries[name] for name in self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def _unknown_message(self, name: str) -> str:
        known = sorted([*self._entries, *self._aliases])
        # difflib misses short prefixes ("kjv" for "kjv-heldout"), so substrings count as close too
        close = [k for k in known if name and name in k][:3] or difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
        return f"unknown {self.kind} '{name}'; {hint}known: {', '.join(known) or '(none)'}"
