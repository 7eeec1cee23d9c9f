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


def is_non_private(release: Release) -> bool:
    """Whether some part releases a record without noise (eps infinite)."""
    return any(p.noise_multiplier <= 0 and p.rate > 0 and p.steps > 0 for p in release)
