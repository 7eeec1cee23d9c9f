"""Per-sample gradients, their norms and bounded factors: Opacus' reference path and the fast book-keeping path."""

from __future__ import annotations

from dpbench.persample.bookkeeping import BookKeeping, unsupported_layer

#: ``--grad-sample`` values: the fast book-keeping path, or Opacus' per-sample gradients (the reference).
GRAD_SAMPLE_PATHS = ("fast", "reference")

__all__ = ["BookKeeping", "GRAD_SAMPLE_PATHS", "unsupported_layer"]
