"""Per-sample gradients, their norms and bounded factors: Opacus' reference path and the fast book-keeping path."""

from __future__ import annotations

from dpbench.persample.bookkeeping import BookKeeping, unsupported_layer

__all__ = ["BookKeeping", "unsupported_layer"]
