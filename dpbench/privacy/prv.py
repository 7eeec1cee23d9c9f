"""Opacus' PRV accountant (Gopi, Lee & Wutschitz 2021) for a composition of sampled Gaussians.

Opacus composes heterogeneous history entries ``(noise_multiplier, sample_rate, steps)`` and returns
the upper end of its error interval. Its error ``eps_error`` is absolute, so it is scaled with the eps
being measured (``prv_error``): a fixed 0.01 would be 10 % of eps = 0.1.
"""

from __future__ import annotations

import math
import warnings

from dpbench.privacy.release import Release, accounted_parts

#: PRV's eps error, relative to the eps measured, and never above Opacus' default 0.01.
PRV_RELATIVE_ERROR = 0.01
#: PRV is computed only where the RDP eps is at most this. Its grid grows as the noise shrinks: at
#: eps ~ 30 it took up to 17 s and 4 GB, at sigma 0.2 (eps ~ 300+) 150 s and 18 GB, at sigma 1e-6 13 TiB.
PRV_MAX_EPS = 30.0


def prv_error(eps_estimate: float) -> float:
    """Opacus' ``eps_error`` for an eps near ``eps_estimate``: 1 % of it, at most 0.01, at least 1e-4."""
    return min(0.01, max(1e-4, PRV_RELATIVE_ERROR * eps_estimate))


def prv_eps(release: Release, delta: float, eps_error: float = 0.01) -> float | None:
    """eps of ``release`` at ``delta`` by Opacus' PRV accountant; None where it cannot answer."""
    history = accounted_parts(release)
    if history is None:
        return math.inf
    if not history:
        return 0.0
    from opacus.accountants import PRVAccountant

    accountant = PRVAccountant()
    accountant.history = list(history)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(accountant.get_epsilon(delta, eps_error=eps_error))
    except (ValueError, RuntimeError, OverflowError, FloatingPointError, MemoryError):
        return None
