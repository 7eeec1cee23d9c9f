"""RDP accountant of DPIS-core, our reconstruction of DPIS (Wei, Bao, Xiao & Yang, CCS 2022).

The paper's own analysis was not available; this is the accountant derived in ``specs/dpis.md`` §2
for the mechanism of §1.3 and its two-stage variant of §3.1(b). One step releases two things:

1. the noisy norm sum ``K~ = sum_{i in Omega'} n_i + N(0, sigma_K^2 C^2)`` over an independent Poisson
   sample ``Omega'`` of rate ``norm_rate`` (``norm_rate = 1``: all N records, the plain Gaussian
   mechanism). Sensitivity C, so this is the sampled Gaussian SGM(norm_rate, sigma_K);
2. given ``K^ = max(K~ / norm_rate, B C / q_cap)``, the importance-sampled sum. The differing record
   enters it with probability at most ``q_cap`` and then adds a vector of norm exactly ``K^/B``; the
   noise has std ``sigma_G K^/B``. Rescaled by ``B/K^`` this is SGM(q_cap, sigma_G) (the SGM RDP is
   non-decreasing in the rate, so a smaller realised rate is covered).

Per step ``RDP(a) = SGM(a; q_cap, sigma_G) + SGM(a; norm_rate, sigma_K)``; steps add. Both curves are
Opacus' (``dpbench.privacy.rdp.sgm_rdp``), converted to (eps, delta) by the shared conversion.

The default ``sigma_K`` ("auto") is data-independent: the smallest value on a fixed geometric grid
for which the norm release (bounded above by its value at the next integer order) costs at most
``NORM_SHARE`` of the total RDP at *every* order of Opacus' grid (up to 63), hence at the optimal
one for any eps above about 0.2, whatever sigma_G calibration picks (below, the share may exceed
5 %; the accounting stays exact, it only costs utility). It grows with sigma_G, so the total RDP still falls as sigma_G grows and the
generic bisection on sigma_G stays valid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np

from dpbench.errors import BadInput
from dpbench.privacy.rdp import OPACUS_ORDERS, SGM_ORDERS, sgm_rdp

#: Largest share of the total RDP (at every order) that the automatic sigma_K leaves to the norm release.
NORM_SHARE = 0.05
#: Grid of automatic sigma_K values, ``2 ** (k / GRID_PER_OCTAVE)``: a fixed grid keeps sigma_K(sigma_G) monotone.
GRID_PER_OCTAVE = 64
#: Range of the grid exponent k (sigma_K from 2^-10 to 2^40).
GRID_K_MIN, GRID_K_MAX = -10 * GRID_PER_OCTAVE, 40 * GRID_PER_OCTAVE


@dataclass(frozen=True)
class DPISRates:
    """The public rates of one DPIS configuration at DP-SGD rate ``q = B/N``."""

    q: float  # B/N, the expected batch size over the dataset size
    q_cap: float  # cap on any record's probability of entering the gradient release
    candidate_rate: float  # Poisson rate of the uniform candidate set (1 = every record, the exact variant)
    norm_rate: float  # Poisson rate of the independent sample that estimates the normaliser

    @property
    def r_hat(self) -> float:
        """The mean clipped-norm ratio a/C at which the floor ``B C / q_cap`` stops binding."""
        return self.q / self.q_cap


def resolve_rates(q: float, *, r_hat: float, q_cap: float | None = None, candidate_rate: float | None = None,
                  norm_rate: float | None = None) -> DPISRates:
    """Defaults: ``q_cap = min(candidate_rate, q/r_hat)``, candidate rate ``q_cap``, norm rate ``q``.

    The spec (§3.3) suggests ``min(1, 4q)`` for both rates. Any candidate rate at or above ``q_cap``
    gives the same output distribution (a record is kept overall w.p. ``B n_i / K^`` with weight
    ``K^ / (B n_i)``), so ``q_cap`` does the least work; a norm sample at rate q makes ``K^`` a little
    noisier but stays unbiased and costs a quarter of 4q. Together about 3x DP-SGD's per-sample work
    instead of 8x. With ``candidate_rate = 1`` (the exact variant) the normaliser is over all N records
    unless ``norm_rate`` is given. ``q_cap`` above ``candidate_rate`` would need inclusion probabilities
    above 1 inside the candidate set and is a BadInput.
    """
    if not 0.0 < q <= 1.0:
        raise BadInput(f"sampling rate q = {q}: must be in (0, 1]")
    if not 0.0 < r_hat <= 1.0:
        raise BadInput(f"--set r_hat={r_hat}: must be in (0, 1]")
    if candidate_rate is not None and not 0.0 < candidate_rate <= 1.0:
        raise BadInput(f"--set candidate_rate={candidate_rate}: must be in (0, 1]")
    cap = min(candidate_rate if candidate_rate is not None else 1.0, q / r_hat) if q_cap is None else q_cap
    if not 0.0 < cap <= 1.0:
        raise BadInput(f"--set q_cap={cap}: must be in (0, 1]")
    q0 = cap if candidate_rate is None else candidate_rate
    if cap > q0:
        raise BadInput(f"--set q_cap={cap:.6g} exceeds candidate_rate={q0:.6g}: inclusion probabilities inside "
                       f"the candidate set would exceed 1; lower q_cap or raise candidate_rate")
    q0n = (1.0 if q0 == 1.0 else q) if norm_rate is None else norm_rate
    if not 0.0 < q0n <= 1.0:
        raise BadInput(f"--set norm_rate={q0n}: must be in (0, 1]")
    return DPISRates(q=q, q_cap=cap, candidate_rate=q0, norm_rate=q0n)


@lru_cache(maxsize=4096)
def _sgm_step(q: float, sigma: float, orders: tuple[float, ...]) -> np.ndarray:
    curve = sgm_rdp(q, sigma, 1, orders)
    curve.setflags(write=False)
    return curve


def norm_release_rdp(norm_rate: float, sigma_k: float, steps: int,
                     orders: Sequence[float] = SGM_ORDERS) -> np.ndarray:
    """RDP of ``steps`` norm-sum releases: SGM(norm_rate, sigma_K); zero when sigma_K is infinite."""
    if math.isinf(sigma_k):
        return np.zeros(len(orders))
    return steps * _sgm_step(float(norm_rate), float(sigma_k), tuple(orders))


def gradient_release_rdp(q_cap: float, sigma_g: float, steps: int,
                         orders: Sequence[float] = SGM_ORDERS) -> np.ndarray:
    """RDP of ``steps`` importance-sampled gradient releases: SGM(q_cap, sigma_G)."""
    return steps * _sgm_step(float(q_cap), float(sigma_g), tuple(orders))


def norm_release_upper_bound(norm_rate: float, sigma_k: float, orders: tuple[float, ...] = SGM_ORDERS) -> np.ndarray:
    """Per-step RDP of the norm release bounded from above by its value at the next integer order.

    RDP is non-decreasing in the order, so ``eps(ceil(a)) >= eps(a)``; integer orders are exact finite sums
    and 10-50x faster than fractional ones, which matters inside the sigma_K search.
    """
    ceilings = tuple(sorted({math.ceil(a) for a in orders}))
    at_integers = dict(zip(ceilings, _sgm_step(float(norm_rate), float(sigma_k), ceilings)))
    return np.array([at_integers[math.ceil(a)] for a in orders])


def _norm_share_ok(k: int, norm_rate: float, gradient: np.ndarray, orders: tuple[float, ...]) -> bool:
    norm = norm_release_upper_bound(norm_rate, 2.0 ** (k / GRID_PER_OCTAVE), orders)
    bound = gradient * (NORM_SHARE / (1.0 - NORM_SHARE))  # norm <= share * (norm + gradient)
    finite = np.isfinite(gradient)  # an order where the gradient release is already infinite constrains nothing
    return bool(np.all(np.isfinite(norm[finite]) & (norm[finite] <= bound[finite])))


@lru_cache(maxsize=4096)
def auto_sigma_k(sigma_g: float, q_cap: float, norm_rate: float,
                 orders: tuple[float, ...] = OPACUS_ORDERS) -> float:
    """Smallest grid sigma_K whose norm release is at most ``NORM_SHARE`` of the per-step RDP at every order.

    The norm release is measured by ``norm_release_upper_bound`` (so the share holds for the exact curve
    too). Depends only on public quantities (sigma_G and the rates), never on data. Raising sigma_G lowers
    the gradient curve, which can only move the answer up the grid: sigma_K(sigma_G) is non-decreasing.
    A zero sigma_G (no privacy at all) leaves every sigma_K feasible: the grid's smallest.
    """
    if sigma_g <= 0:
        return 2.0 ** (GRID_K_MIN / GRID_PER_OCTAVE)
    gradient = _sgm_step(float(q_cap), float(sigma_g), orders)
    # Start from the small-rate approximation SGM ~ a q^2 / sigma^2 (exact for q = 1 as a / (2 sigma^2)),
    # then gallop and bisect on the integer grid: the result is the smallest feasible k wherever we start.
    ratio = norm_rate / q_cap * math.sqrt((1.0 - NORM_SHARE) / NORM_SHARE)
    guess = round(GRID_PER_OCTAVE * math.log2(max(sigma_g * ratio, 2.0 ** -10)))
    guess = min(max(guess, GRID_K_MIN), GRID_K_MAX)

    def ok(k: int) -> bool:
        return _norm_share_ok(k, float(norm_rate), gradient, orders)

    if ok(guess):
        hi, step = guess, 1
        while True:
            lo = max(hi - step, GRID_K_MIN)
            if not ok(lo):
                break
            if lo == GRID_K_MIN:
                return 2.0 ** (lo / GRID_PER_OCTAVE)
            hi, step = lo, step * 2
    else:
        lo, step = guess, 1
        while True:
            hi = min(lo + step, GRID_K_MAX)
            if ok(hi):
                break
            if hi == GRID_K_MAX:
                raise RuntimeError("no sigma_K on the grid keeps the norm release within its share")
            lo, step = hi, step * 2
    while hi - lo > 1:  # invariant: ok(hi), not ok(lo)
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return 2.0 ** (hi / GRID_PER_OCTAVE)


def dpis_rdp(sigma_g: float, sigma_k: float, rates: DPISRates, steps: int,
             orders: Sequence[float] = SGM_ORDERS) -> np.ndarray:
    """Total RDP of ``steps`` DPIS-core steps: gradient release plus norm release, composed."""
    if sigma_g <= 0:
        return np.full(len(orders), np.inf)
    return (gradient_release_rdp(rates.q_cap, sigma_g, steps, orders)
            + norm_release_rdp(rates.norm_rate, sigma_k, steps, orders))
