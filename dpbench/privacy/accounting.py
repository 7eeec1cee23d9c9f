"""eps for given noise, and the noise for a target eps, for any mechanism.

A mechanism supplies its RDP curve (``Mechanism.rdp``); everything here is shared so that every
mechanism is converted and calibrated the same way. Privacy rule: calibration returns the
smallest noise found whose eps is at most the target, and that eps is recomputed from it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from dpbench.errors import BadInput
from dpbench.privacy.rdp import eps_classic, eps_opacus, sgm_rdp

if TYPE_CHECKING:
    from dpbench.mechanisms.base import Mechanism

#: Largest noise multiplier calibration will try before declaring the budget too small.
MAX_NOISE = 1e4

#: PRV is computed only where the RDP eps is at most this. Its grid grows as the noise shrinks: at
#: eps ~ 30 it took up to 17 s and 4 GB, at sigma 0.2 (eps ~ 300+) 150 s and 18 GB, at sigma 1e-6 13 TiB.
PRV_MAX_EPS = 30.0


@dataclass(frozen=True)
class PrivacyReport:
    """The privacy of one configuration, in every accountant that applies."""

    mech: str
    accountant: str
    noise_multiplier: float
    sample_rate: float  # q = B/N, for every mechanism
    steps: int
    delta: float
    eps: float  # the mechanism's own accountant, Opacus conversion: what comparisons use
    eps_classic: float  # same curve, classic conversion
    eps_rdp: float | None  # plain sampled-Gaussian RDP for the same noise, rate and steps
    eps_prv: float | None  # Opacus PRV, where the mechanism is a sampled Gaussian
    alpha: float  # order at which ``eps`` is attained
    #: accountant-specific values shown beside eps (``Mechanism.privacy_extras``), e.g. GED's z_eq
    extras: dict[str, Any] = field(default_factory=dict)
    #: rate at which the differing record can enter the gradient release (q_cap for DPIS, else q)
    release_rate: float | None = None

    def as_json(self) -> dict[str, Any]:
        """A JSON-ready dict (extras at the top level); infinite values are written as the string ``"inf"``."""
        out: dict[str, Any] = {}
        fields = asdict(self)
        extras = fields.pop("extras")
        for k, v in {**fields, **extras}.items():
            if isinstance(v, float) and math.isinf(v):
                v = "inf"
            elif isinstance(v, float) and math.isnan(v):
                v = None
            out[k] = v
        return out


def sgm_prv_eps(noise_multiplier: float, q: float, steps: int, delta: float) -> float | None:
    """Opacus' PRV accountant for the Poisson-subsampled Gaussian; None where it cannot answer."""
    if noise_multiplier <= 0:
        return float("inf")
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    acc.history = [(noise_multiplier, q, steps)]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(acc.get_epsilon(delta))
    except (ValueError, RuntimeError, OverflowError, FloatingPointError, MemoryError):
        return None


def account(mech: "Mechanism", noise_multiplier: float, q: float, steps: int, delta: float,
            with_prv: bool = True) -> PrivacyReport:
    """eps spent by ``steps`` steps of ``mech`` at expected rate ``q`` with this noise."""
    if not mech.private:
        inf = float("inf")
        return PrivacyReport(mech.name, "none", 0.0, q, steps, delta, inf, inf, None, None, float("nan"),
                             release_rate=q)
    orders, rdp = mech.rdp(noise_multiplier, q, steps)
    eps, alpha = eps_opacus(orders, rdp, delta)
    classic, _ = eps_classic(orders, rdp, delta)
    rate = mech.sample_rate(q)
    if mech.accountant == "sgm-rdp":
        eps_rdp = eps
    else:
        eps_rdp, _ = eps_opacus(mech.sgm_orders, sgm_rdp(q, noise_multiplier, steps, mech.sgm_orders), delta)
    with_prv = with_prv and mech.prv_applies and eps_rdp is not None and eps_rdp <= PRV_MAX_EPS
    eps_prv = sgm_prv_eps(noise_multiplier, rate, steps, delta) if with_prv else None
    extras = mech.privacy_extras(noise_multiplier, q, steps, delta)
    return PrivacyReport(mech.name, mech.accountant, noise_multiplier, q, steps, delta,
                         eps, classic, eps_rdp, eps_prv, alpha, extras, release_rate=rate)


def calibrate(mech: "Mechanism", target_eps: float, q: float, steps: int, delta: float,
              rel_tol: float = 1e-4) -> float:
    """Smallest noise multiplier (to ``rel_tol``) whose eps is at most ``target_eps``.

    eps is decreasing in the noise, so a bisection between a noise that overshoots and one that
    does not converges from the safe side; the returned value is always on the safe side.
    """
    if not mech.private:
        return 0.0

    def eps_at(noise: float) -> float:
        orders, rdp = mech.rdp(noise, q, steps)
        return eps_opacus(orders, rdp, delta)[0]

    hi = 1.0
    while eps_at(hi) > target_eps:
        hi *= 2.0
        if hi > MAX_NOISE:
            raise BadInput(
                f"eps target {target_eps:g} is unreachable for {mech.name} with q={q:.4g}, "
                f"steps={steps}, delta={delta:g} (noise multiplier above {MAX_NOISE:g})"
            )
    lo = hi / 2.0
    while eps_at(lo) <= target_eps:
        hi, lo = lo, lo / 2.0
        if lo < 1e-6:
            return hi
    while (hi - lo) / hi > rel_tol:
        mid = 0.5 * (lo + hi)
        if eps_at(mid) <= target_eps:
            hi = mid
        else:
            lo = mid
    if not eps_at(hi) <= target_eps:  # never report more privacy than the noise gives
        raise RuntimeError("calibration produced a noise multiplier that overshoots the target")
    return hi
