"""RDP of the sampled Gaussian mechanism and the two RDP -> (eps, delta) conversions.

The sampled-Gaussian curve comes from Opacus; the conversions are the two that design.md fixes:
``eps`` uses Opacus' conversion (Balle et al. 2020), ``eps_classic`` the classic one
(Mironov 2017), ``min_a [R(a) + log(1/delta)/(a-1)]``.

Orders: Opacus' default grid stops at 63, where ``log(1/delta)/(a-1)`` alone is 0.18 at delta = 1e-5,
so smaller targets were unreachable whatever the noise. ``SGM_ORDERS`` adds large integer orders up
to 1024 (dp_accounting's default grid ends with 128, 256, 512, 1024; the points between keep the
optimum near the truth for eps between 0.02 and 0.2). Adding orders only lowers a minimum over them,
and every order is a valid RDP bound, so no eps grows.
"""

from __future__ import annotations

import warnings

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as opacus_rdp

#: Opacus' default order grid (1.1 .. 10.9, 12 .. 63).
OPACUS_ORDERS: tuple[float, ...] = tuple(RDPAccountant.DEFAULT_ALPHAS)
#: Integer orders beyond Opacus' grid, for small eps.
LARGE_ORDERS: tuple[int, ...] = (64, 80, 96, 112, 128, 160, 192, 256, 320, 384, 512, 768, 1024)
#: The orders of every sampled-Gaussian curve.
SGM_ORDERS: tuple[float, ...] = OPACUS_ORDERS + tuple(float(a) for a in LARGE_ORDERS)
#: Integer orders 2..64, for curves only defined at integer orders.
INTEGER_ORDERS: tuple[int, ...] = tuple(range(2, 65))


def sgm_rdp(q: float, noise_multiplier: float, steps: int, orders=SGM_ORDERS) -> np.ndarray:
    """Total RDP of ``steps`` compositions of the Poisson-subsampled Gaussian (Opacus)."""
    if noise_multiplier <= 0:
        return np.full(len(orders), np.inf)
    return np.asarray(
        opacus_rdp.compute_rdp(q=q, noise_multiplier=noise_multiplier, steps=steps, orders=list(orders)),
        dtype=float,
    )


def eps_opacus(orders, rdp, delta: float) -> tuple[float, float]:
    """(eps, best order) by Opacus' conversion; ``inf`` when every order is infinite."""
    rdp = np.asarray(rdp, dtype=float)
    if not np.isfinite(rdp).any():
        return float("inf"), float("nan")
    with warnings.catch_warnings():
        # Opacus warns when the optimum sits at the edge of the grid; we report the order instead.
        warnings.simplefilter("ignore")
        eps, alpha = opacus_rdp.get_privacy_spent(orders=list(orders), rdp=rdp, delta=delta)
    return float(eps), float(alpha)


def eps_classic(orders, rdp, delta: float) -> tuple[float, float]:
    """(eps, best order) by the classic conversion ``min_a R(a) + log(1/delta)/(a-1)``."""
    orders = np.asarray(orders, dtype=float)
    rdp = np.asarray(rdp, dtype=float)
    eps = rdp + np.log(1.0 / delta) / (orders - 1.0)
    if not np.isfinite(eps).any():
        return float("inf"), float("nan")
    i = int(np.nanargmin(eps))
    return float(eps[i]), float(orders[i])
