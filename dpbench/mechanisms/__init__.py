"""Mechanism plugins. Built-ins register on import; others come from the entry-point group
``dpbench.mechanisms`` (the entry point names a :class:`~dpbench.mechanisms.base.Mechanism` subclass)."""

from __future__ import annotations

from typing import Any

from dpbench.mechanisms.base import Mechanism
from dpbench.registry import Registry

MECHANISMS: Registry[Any] = Registry("mechanism", entry_point_group="dpbench.mechanisms", base=Mechanism)

from dpbench.mechanisms import dpsgd, nonprivate  # noqa: E402,F401  (registers the built-ins)
from dpbench.mechanisms import rs, scaling  # noqa: E402,F401  (auto_s, psac, psasc, rs)
from dpbench.mechanisms import modelmix  # noqa: E402,F401
from dpbench.mechanisms import dpis  # noqa: E402,F401
from dpbench.mechanisms import ged  # noqa: E402,F401


def get_mechanism(name: str) -> Any:
    """The mechanism class registered under ``name``."""
    return MECHANISMS.get(name)


__all__ = ["MECHANISMS", "get_mechanism"]
