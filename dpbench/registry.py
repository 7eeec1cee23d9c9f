"""One generic registry for mechanisms, datasets and models.

Entries are registered with a decorator, or lazily as ``"module:attr"`` strings that are imported
on first use. Third-party entries come from a Python entry-point group and are lazy as well.
Unknown names raise :class:`UnknownName` with a "did you mean" hint.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, Generic, TypeVar

from dpbench.errors import BrokenPlugin, UnknownName

T = TypeVar("T")


def did_you_mean(name: str, choices: list[str]) -> str:
    """A hint like ``" (did you mean 'dpsgd'?)"``, or an empty string when nothing is close."""
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"


@dataclass
class Entry(Generic[T]):
    name: str
    target: T | str  # the object, or "module:attr" still to be imported
    meta: dict[str, Any] = field(default_factory=dict)

    def load(self) -> T:
        if isinstance(self.target, str):
            module, _, attr = self.target.partition(":")
            self.target = getattr(importlib.import_module(module), attr)
        return self.target  # type: ignore[return-value]


class Registry(Generic[T]):
    """A name -> object table with decorator registration and plugin discovery.

    With ``base``, every entry must be a subclass of it whose ``name`` attribute is its registered name
    (a plugin class that forgot ``name`` would otherwise run, and be recorded, as its parent).
    """

    def __init__(self, kind: str, entry_point_group: str | None = None, base: type | None = None) -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self.base = base
        self._entries: dict[str, Entry[T]] = {}
        self._plugins_loaded = False

    def register(self, name: str | None = None, **meta: Any) -> Callable[[T], T]:
        """Decorator: ``@MODELS.register("cnn_tanh", datasets=("mnist",))``."""

        def wrap(obj: T) -> T:
            key = name or getattr(obj, "name", None) or getattr(obj, "__name__")
            self._add(Entry(key, obj, dict(meta)))
            return obj

        return wrap

    def register_lazy(self, name: str, target: str, **meta: Any) -> None:
        """Register ``"module:attr"`` without importing it until it is used."""
        self._add(Entry(name, target, dict(meta)))

    def _add(self, entry: Entry[T]) -> None:
        if entry.name in self._entries and self._entries[entry.name].target is not entry.target:
            raise ValueError(f"{self.kind} {entry.name!r} is registered twice")
        self._entries[entry.name] = entry

    def _load_plugins(self) -> None:
        if self._plugins_loaded or not self.entry_point_group:
            return
        self._plugins_loaded = True
        for ep in metadata.entry_points(group=self.entry_point_group):
            if ep.name not in self._entries:
                self._entries[ep.name] = Entry(ep.name, ep.value, {"plugin": ep.dist.name if ep.dist else "?"})

    def get(self, name: str) -> T:
        """The object registered as ``name``; a :class:`BrokenPlugin` if it is a plugin that cannot be used."""
        entry = self.entry(name)
        plugin = entry.meta.get("plugin")
        try:
            obj = entry.load()
        except Exception as exc:  # noqa: BLE001 (any import-time failure of third-party code)
            if plugin is None:
                raise
            raise BrokenPlugin(f"{self.kind} plugin {name!r} (from {plugin}, {entry.target}) cannot be imported: "
                               f"{type(exc).__name__}: {exc}") from None
        problem = self._problem_with(name, obj)
        if problem:
            source = f" (from {plugin})" if plugin else ""
            raise BrokenPlugin(f"{self.kind} {name!r}{source} is not usable: {problem}")
        return obj

    def _problem_with(self, name: str, obj: Any) -> str | None:
        if self.base is None:
            return None
        if not (isinstance(obj, type) and issubclass(obj, self.base)):
            return f"{obj!r} is not a subclass of {self.base.__module__}.{self.base.__qualname__}"
        declared = getattr(obj, "name", None)
        if declared != name:
            return (f"class {obj.__qualname__} has name = {declared!r}; it must set name = {name!r}, "
                    f"the name it is registered under")
        return None

    def problem(self, name: str) -> str | None:
        """Why ``name`` cannot be used (a broken plugin), or None when it loads and checks out."""
        try:
            self.get(name)
        except BrokenPlugin as exc:
            return str(exc)
        return None

    def entry(self, name: str) -> Entry[T]:
        self._load_plugins()
        if name not in self._entries:
            known = sorted(self._entries)
            raise UnknownName(
                f"unknown {self.kind} {name!r}{did_you_mean(name, known)}; "
                f"known: {', '.join(known)} (see 'dpbench ls {self.kind}s')"
            )
        return self._entries[name]

    def names(self, pattern: str = "*", *, plugins: bool = True) -> list[str]:
        """Registered names matching a shell-style pattern, e.g. ``names("*cnn*")``; ``plugins=False``: built-ins only."""
        self._load_plugins()
        return sorted(n for n, e in self._entries.items()
                      if fnmatch.fnmatch(n, pattern) and (plugins or "plugin" not in e.meta))

    def __contains__(self, name: str) -> bool:
        self._load_plugins()
        return name in self._entries

    def __len__(self) -> int:
        self._load_plugins()
        return len(self._entries)
