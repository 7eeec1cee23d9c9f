"""A release described as a composition of Poisson-sampled Gaussian mechanisms.

This is what PLD and PRV accountants can account: a mechanism that can state its release this way
(``Mechanism.sampled_gaussians``) gets every accountant; one with only an RDP curve gets RDP only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from dpbench.privacy.rdp import sgm_rdp


@dataclass(frozen=True)
class SampledGaussian:
    """``steps`` compositions of the Gaussian mechanism (std ``noise_multiplier`` x sensitivity) on a
    Poisson sample of rate ``rate``."""

    noise_multiplier: float
    rate: float
    steps: int

    def __post_init__(self) -> None:
        if not (0.0 <= self.rate <= 1.0 and self.steps >= 0 and self.noise_multiplier >= 0):
            raise ValueError(f"not a sampled Gaussian: {self}")


#: A release: its parts compose (they may be adaptive; each part's noise is public).
Release = tuple[SampledGaussian, ...]


def release_rdp(release: Release, orders: Sequence[float]) -> np.ndarray:
    """Total RDP of the release at ``orders``: the parts' sampled-Gaussian curves, added."""
    total = np.zeros(len(orders))
    for part in release:
        if part.steps:
            total = total + sgm_rdp(part.rate, part.noise_multiplier, part.steps, orders)
    return total


def accounted_parts(release: Release) -> tuple[tuple[float, float, int], ...] | None:
    """(noise, rate, steps) of the parts that can reveal a record (some steps at a positive rate), as the PLD and
    PRV accountants take them; None when one of them adds no noise (eps is infinite)."""
    parts = tuple((float(p.noise_multiplier), float(p.rate), int(p.steps)) for p in release
                  if p.steps > 0 and p.rate > 0)
    return None if any(noise <= 0 for noise, _, _ in parts) else parts
