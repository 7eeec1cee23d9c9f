"""DP-SGD (Abadi et al., CCS 2016): Poisson sampling, per-sample clipping, Gaussian noise on the sum."""

from __future__ import annotations

from dpbench.mechanisms import MECHANISMS
from dpbench.mechanisms.base import Mechanism


@MECHANISMS.register("dpsgd")
class DPSGD(Mechanism):
    """Everything is the base class's default: this is the reference every mechanism changes."""

    name = "dpsgd"
    summary = "DP-SGD (Abadi et al. 2016): clip to C, Gaussian noise; the baseline"
