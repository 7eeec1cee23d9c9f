"""RDP of ModelMix (Xiao, Wan & Devadas 2022, arXiv 2210.03843, Corollary 4.1).

Each ModelMix step releases, per coordinate and in units of the summed-gradient sensitivity C,
the sampled clipped sum plus ``N(0, z^2)`` convolved with a uniform of width
``rho = tau * B / (eta * C)`` (the secret mixing weights). The differing record's worst case puts
``1/sqrt(p)`` on ``p`` coordinates (l2 bound C, l-infinity bound C/sqrt(p)). With

    f0(x) = [Phi((x + rho/2)/z) - Phi((x - rho/2)/z)] / rho,    f1(x) = f0(x - 1/sqrt(p)),
    M_k   = integral of f1^k f0^(1-k),

one step of Poisson rate q has, at integer order a,

    (a - 1) * RDP(a) = log sum_k C(a, k) (1-q)^(a-k) q^k M_k^p,

which is the expansion of ``E_{P0}[((1-q) + q P1/P0)^a]`` for the mixture against the base
distribution, and steps compose additively. This is the authors' analysis as rebuilt in
``specs/modelmix.md`` §2; it has not been independently verified (see that spec, §4.2).

The integrals are computed by quadrature on a uniform grid in log space, so nothing underflows;
a grid that cannot hold the integrand's mass gives an infinite RDP, never a too-small one.

ModelMix is also plain DP-SGD (its release is the sampled Gaussian's, followed by secret mixing), so
the sampled-Gaussian curve bounds it too: ``bounded_modelmix_rdp`` takes, for every step and order,
the smaller of the two, and keeps the sampled-Gaussian curve alone at the orders where this curve is
not computed (fractional ones and those above 64). Its eps is therefore never above the ``eps_rdp``
column, and small targets (eps 0.1) calibrate through the large orders.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Iterable, Sequence

import numpy as np
from scipy.special import gammaln, log_ndtr, logsumexp

from dpbench.privacy.rdp import INTEGER_ORDERS, SGM_ORDERS, sgm_rdp

#: The integer orders the authors' accountant minimises over (their golden values use these).
AUTHOR_ORDERS: tuple[int, ...] = tuple(range(2, 20))
#: Grid points per standard deviation of the Gaussian component.
POINTS_PER_SIGMA = 50
#: Half-width of the Gaussian tails kept beyond the uniform's edges, in standard deviations.
TAIL_SIGMAS = 12.0
#: Beyond this many grid points the integrals are not attempted and the RDP is reported infinite.
MAX_GRID_POINTS = 4_000_000
#: The integrand at either end of the grid must be this many nats below the integral's value.
NEGLIGIBLE_NATS = 40.0
#: Below this width (in units of sigma) the uniform is dropped and the Gaussian's exact moments are used.
#: A narrower uniform is lost in the cancellation Phi(x + w/2) - Phi(x - w/2), which then errs by more
#: than the uniform's effect (about w^2/sigma^2), in either direction; the Gaussian alone is a safe
#: upper bound, since adding independent uniform noise is post-processing.
MIN_WIDTH_SIGMAS = 1e-4


def rho(tau: float, eta: float, batch_size: float, clip: float) -> float:
    """Width of the mixing uniform in units of C, for an update ``eta * (noisy sum) / B``.

    The release ``w_k = m - eta * (G + N(0, z^2 C^2)) / B`` divided by ``eta * C / B`` carries a
    uniform of width ``tau`` scaled the same way. With ``tau = gamma * eta`` this is ``gamma * B / C``.
    """
    if not (tau >= 0 and eta > 0 and batch_size > 0 and clip > 0):
        raise ValueError(f"rho needs tau >= 0 and positive eta, B, C; got {tau}, {eta}, {batch_size}, {clip}")
    return tau * batch_size / (eta * clip)


def _log_density(x: np.ndarray, sigma: float, width: float) -> np.ndarray:
    """log of N(0, sigma^2) convolved with U[-width/2, width/2], stable in both tails."""
    if width == 0.0:
        return -0.5 * (x / sigma) ** 2 - 0.5 * math.log(2 * math.pi) - math.log(sigma)
    upper = (x + width / 2) / sigma
    lower = (x - width / 2) / sigma
    out = np.empty_like(x)
    # Left of zero, Phi(upper) - Phi(lower) loses nothing as log Phi(upper) + log(1 - Phi(lower)/Phi(upper));
    # right of zero the same with survival functions, Phi(-lower) - Phi(-upper).
    left = x <= 0
    big, small = log_ndtr(upper[left]), log_ndtr(lower[left])
    out[left] = big + np.log(-np.expm1(small - big))
    big, small = log_ndtr(-lower[~left]), log_ndtr(-upper[~left])
    out[~left] = big + np.log(-np.expm1(small - big))
    return out - math.log(width)


@lru_cache(maxsize=256)
def _log_moments_cached(sigma: float, width: float, shift: float, max_order: int) -> tuple[float, ...]:
    ks = np.arange(2, max_order + 1, dtype=float)
    step = sigma / POINTS_PER_SIGMA
    left = -width / 2 - TAIL_SIGMAS * sigma
    # The integrand f0 * (f1/f0)^k peaks near width/2 + k * shift in the right tail.
    right = width / 2 + shift + max_order * shift + TAIL_SIGMAS * sigma
    for _ in range(4):
        points = int(math.ceil((right - left) / step)) + 1
        if points > MAX_GRID_POINTS:
            return (0.0, 0.0) + (math.inf,) * len(ks)
        x = np.linspace(left, right, points)
        h = (right - left) / (points - 1)
        log_f0 = _log_density(x, sigma, width)
        log_ratio = _log_density(x - shift, sigma, width) - log_f0
        log_moments = np.empty(len(ks))
        edge_ok = True
        for i, k in enumerate(ks):
            log_integrand = log_f0 + k * log_ratio
            # trapezoid rule; the ends are negligible (checked below), so half-weights change nothing
            log_moments[i] = logsumexp(log_integrand) + math.log(h)
            edge = max(log_integrand[0], log_integrand[-1]) + math.log(h)
            if not edge < log_moments[i] - NEGLIGIBLE_NATS:
                edge_ok = False
                break
        if edge_ok:
            return (0.0, 0.0) + tuple(float(v) for v in log_moments)
        right += (right - left)  # the mass reaches the end of the grid: widen and redo
    return (0.0, 0.0) + (math.inf,) * len(ks)


def log_moments(sigma: float, width: float, shift: float, max_order: int) -> np.ndarray:
    """``log M_k`` for k = 0..max_order (``M_0 = M_1 = 1``) of one coordinate shifted by ``shift``.

    ``sigma`` is the Gaussian std and ``width`` the uniform's width, both in units of C. Cached,
    so the phases of one run and the evaluations of ``account`` after calibration cost nothing.
    """
    if not (sigma > 0 and width >= 0 and shift >= 0 and max_order >= 1):
        raise ValueError(f"log_moments needs sigma > 0, width >= 0, shift >= 0; got {sigma}, {width}, {shift}")
    if width < MIN_WIDTH_SIGMAS * sigma:
        k = np.arange(max_order + 1, dtype=float)
        return k * (k - 1) * shift**2 / (2 * sigma**2)
    return np.array(_log_moments_cached(float(sigma), float(width), float(shift), int(max_order)))


def per_step_rdp(q: float, noise_multiplier: float, width: float, p: int,
                 orders: Sequence[int] = INTEGER_ORDERS) -> np.ndarray:
    """RDP of one ModelMix step at each integer order, for Poisson rate q and p worst-case coordinates."""
    orders = [int(a) for a in orders]
    if any(a < 2 for a in orders):
        raise ValueError("the ModelMix accountant is defined at integer orders >= 2")
    if not (0.0 <= q <= 1.0 and p >= 1):
        raise ValueError(f"need 0 <= q <= 1 and p >= 1; got q={q}, p={p}")
    if noise_multiplier <= 0:
        return np.full(len(orders), np.inf)
    if q == 0.0:
        return np.zeros(len(orders))
    log_m = log_moments(noise_multiplier, width, 1.0 / math.sqrt(p), max(orders))
    log_a = p * log_m  # the p worst-case coordinates are independent and identical
    out = np.empty(len(orders))
    for i, a in enumerate(orders):
        k = np.arange(a + 1)
        log_binom = gammaln(a + 1) - gammaln(k + 1) - gammaln(a - k + 1)
        log_terms = log_binom + log_a[: a + 1] + k * math.log(q)
        if q < 1.0:
            log_terms = log_terms + (a - k) * math.log1p(-q)
        else:
            log_terms = np.where(k == a, log_terms, -np.inf)
        out[i] = logsumexp(log_terms) / (a - 1)
    return out


def modelmix_rdp(q: float, noise_multiplier: float, phases: Iterable[tuple[int, float]], p: int,
                 orders: Sequence[int] = INTEGER_ORDERS) -> np.ndarray:
    """Total RDP of consecutive phases ``(steps, rho)``, each phase with its own uniform width."""
    total = np.zeros(len(orders))
    for steps, width in phases:
        if steps < 0:
            raise ValueError(f"negative step count {steps}")
        if steps:
            total = total + steps * per_step_rdp(q, noise_multiplier, width, p, orders)
    return total


#: Orders of the bounded curve: the sampled-Gaussian grid and the integer orders of the ModelMix curve.
BOUNDED_ORDERS: tuple[float, ...] = tuple(sorted({float(a) for a in SGM_ORDERS} | {float(a) for a in INTEGER_ORDERS}))


def bounded_modelmix_rdp(q: float, noise_multiplier: float, phases: Iterable[tuple[int, float]], p: int,
                         ) -> tuple[tuple[float, ...], np.ndarray]:
    """(orders, total RDP) of ModelMix, per step and order the smaller of its own and the sampled-Gaussian RDP.

    Both are valid bounds on every step at every order, so their minimum is, and RDP composes by addition.
    """
    orders = BOUNDED_ORDERS
    own_at = [i for i, a in enumerate(orders) if a.is_integer() and int(a) in INTEGER_ORDERS]
    own_orders = [int(orders[i]) for i in own_at]
    sgm_step = sgm_rdp(q, noise_multiplier, 1, orders)
    total = np.zeros(len(orders))
    for steps, width in phases:
        if steps < 0:
            raise ValueError(f"negative step count {steps}")
        if steps:
            step = sgm_step.copy()
            step[own_at] = np.minimum(step[own_at], per_step_rdp(q, noise_multiplier, width, p, own_orders))
            total = total + steps * step
    return orders, total
