"""Errors that the command line turns into exit codes."""

from __future__ import annotations


class BadInput(ValueError):
    """A user-supplied value is invalid. The CLI prints the message and exits with code 2."""


class UnknownName(BadInput):
    """A name looked up in a registry does not exist."""


class BrokenPlugin(BadInput):
    """A third-party registry entry cannot be used: it fails to import, or is not what the registry holds."""
