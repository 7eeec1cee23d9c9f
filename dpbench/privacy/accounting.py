"""eps for given noise, and the noise for a target eps, for any mechanism, by a choice of accountant.

A mechanism supplies its RDP curve (``Mechanism.rdp``) and, where its release is a composition of
Poisson-sampled Gaussians, that composition (``Mechanism.sampled_gaussians``), which the PLD
(``dp_accounting``) and PRV (Opacus) accountants take. Everything here is shared so that every
mechanism is converted and calibrated the same way. Privacy rule: calibration returns the smallest
noise found whose eps, by the chosen accountant, is at most the target, and that eps is recomputed
from it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from dpbench.errors import BadInput
from dpbench.privacy.pld import PLD_DISCRETIZATION, PLD_MAX_EPS, pld_eps
from dpbench.privacy.prv import PRV_MAX_EPS, prv_eps, prv_error
from dpbench.privacy.rdp import SGM_ORDERS, eps_classic, eps_opacus, sgm_rdp

if TYPE_CHECKING:
    from dpbench.mechanisms.base import Mechanism

#: ``--accountant`` values: Renyi DP (the seed papers' and the default), privacy loss distributions
#: (Google's dp_accounting), privacy random variables (Opacus).
ACCOUNTANTS: tuple[str, ...] = ("rdp", "pld", "prv")
#: Largest noise multiplier calibration will try before declaring the budget too small.
MAX_NOISE = 1e4
#: Relative precision of the noise found by PLD and PRV calibration: eps then lies within about 0.3 % of the
#: target (eps moves by 1-3 times the relative change of the noise), finer than PRV's own error.
ACCOUNTANT_REL_TOL = 1e-3
#: PLD discretisation of the first, coarse calibration pass (only the fine one decides the answer).
PLD_COARSE_DISCRETIZATION = 1e-3
#: Largest eps each accountant is asked for (beyond it its grids grow too large; RDP has no limit).
MAX_EPS = {"rdp": math.inf, "pld": PLD_MAX_EPS, "prv": PRV_MAX_EPS}
#: Largest RDP eps at which the chosen accountant is still computed (its own eps is smaller than RDP's, so a
#: target of MAX_EPS can sit at an RDP eps somewhat above it); beyond, ``account`` refuses instead of running
#: out of memory.
HARD_MAX_RDP_EPS = {"rdp": math.inf, "pld": 4 * PLD_MAX_EPS, "prv": 2 * PRV_MAX_EPS}

__all__ = ["ACCOUNTANTS", "MAX_NOISE", "PLD_MAX_EPS", "PRV_MAX_EPS", "PrivacyReport", "account",
           "accountant_name", "calibrate", "check_accountant", "check_accountant_name", "eps_reachable"]


@dataclass(frozen=True)
class PrivacyReport:
    """The privacy of one configuration, in every accountant that applies."""

    mech: str
    accountant: str  # the calibrating accountant's full name, e.g. sgm-rdp, dpis-pld, none
    noise_multiplier: float
    sample_rate: float  # q = B/N, for every mechanism
    steps: int
    delta: float
    eps: float  # the calibrating accountant's eps: what comparisons use (``eps_spent``)
    eps_classic: float  # the mechanism's RDP curve, classic conversion
    eps_rdp: float | None  # plain sampled-Gaussian RDP for the same noise, rate and steps
    eps_prv: float | None  # Opacus PRV of the mechanism's release, where it is a composition of sampled Gaussians
    alpha: float  # order at which the mechanism's RDP eps is attained
    #: accountant-specific values shown beside eps (``Mechanism.privacy_extras``), e.g. GED's z_eq
    extras: dict[str, Any] = field(default_factory=dict)
    #: rate at which the differing record can enter the gradient release (q_cap for DPIS, else q)
    release_rate: float | None = None
    eps_pld: float | None = None  # dp_accounting PLD of the mechanism's release, where it applies
    calibrated_by: str = "rdp"  # rdp, pld or prv
    #: eps of the mechanism's release by each accountant (None: not applicable or not computed)
    by_accountant: dict[str, float | None] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        """A JSON-ready dict (extras at the top level); infinite values are written as the string ``"inf"``."""
        out: dict[str, Any] = {}
        fields = asdict(self)
        extras = fields.pop("extras")
        fields["eps_by_accountant"] = {k: _json_number(v) for k, v in fields.pop("by_accountant").items()}
        for k, v in {**fields, **extras}.items():
            out[k] = _json_number(v)
        return out


def _json_number(v: Any) -> Any:
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def check_accountant_name(accountant: str) -> None:
    """An accountant that exists (``ACCOUNTANTS``)."""
    if accountant not in ACCOUNTANTS:
        raise BadInput(f"--accountant {accountant!r}: must be one of {', '.join(ACCOUNTANTS)}")


def check_accountant(mech: "Mechanism", accountant: str) -> None:
    """``accountant`` exists and can account ``mech`` (a non-private mechanism takes any)."""
    check_accountant_name(accountant)
    if accountant != "rdp" and mech.private and mech.rdp_only_reason is not None:
        raise BadInput(f"--accountant {accountant}: {mech.name} has only an RDP analysis ({mech.rdp_only_reason}); "
                       f"use --accountant rdp")


def accountant_name(mech: "Mechanism", accountant: str) -> str:
    """The ``accountant`` column: the mechanism's analysis and the accountant, e.g. ``sgm-pld``, ``dpis-rdp``."""
    if not mech.private:
        return "none"
    return f"{mech.accountant.rsplit('-', 1)[0]}-{accountant}"


def _rdp_eps(mech: "Mechanism", noise: float, q: float, steps: int, delta: float) -> tuple[float, float]:
    orders, rdp = mech.rdp(noise, q, steps)
    return eps_opacus(orders, rdp, delta)


def _release_eps(mech: "Mechanism", accountant: str, noise: float, q: float, steps: int, delta: float,
                 rdp_eps: float, pld_discretization: float = PLD_DISCRETIZATION) -> float | None:
    """PLD or PRV eps of the mechanism's release; ``rdp_eps`` (its RDP eps at this noise) sets PRV's error."""
    release = mech.sampled_gaussians(noise, q, steps)
    if release is None:
        return None
    if accountant == "pld":
        return pld_eps(release, delta, pld_discretization)
    return prv_eps(release, delta, prv_error(rdp_eps))


def account(mech: "Mechanism", noise_multiplier: float, q: float, steps: int, delta: float,
            accountant: str = "rdp", with_others: bool = True) -> PrivacyReport:
    """eps spent by ``steps`` steps of ``mech`` at expected rate ``q`` with this noise.

    ``eps`` is the eps of ``accountant``; with ``with_others`` the other accountants that apply are
    computed too (PLD where the RDP eps is at most ``PLD_MAX_EPS``, PRV at most ``PRV_MAX_EPS``).
    """
    check_accountant(mech, accountant)
    if not mech.private:
        inf = float("inf")
        return PrivacyReport(mech.name, "none", 0.0, q, steps, delta, inf, inf, None, None, float("nan"),
                             release_rate=q, calibrated_by=accountant)
    orders, rdp = mech.rdp(noise_multiplier, q, steps)
    own, alpha = eps_opacus(orders, rdp, delta)
    classic, _ = eps_classic(orders, rdp, delta)
    if mech.accountant == "sgm-rdp":
        eps_rdp = own
    else:
        eps_rdp, _ = eps_opacus(SGM_ORDERS, sgm_rdp(q, noise_multiplier, steps, SGM_ORDERS), delta)
    if own > HARD_MAX_RDP_EPS[accountant]:
        raise BadInput(f"--accountant {accountant}: this noise ({noise_multiplier:g}) spends eps {own:.4g} by RDP, "
                       f"beyond what {accountant.upper()} is computed for here (its grid grows with eps); "
                       f"use --accountant rdp")
    by: dict[str, float | None] = {"rdp": own}
    for other in ("pld", "prv"):
        wanted = other == accountant or (with_others and own <= MAX_EPS[other])
        by[other] = _release_eps(mech, other, noise_multiplier, q, steps, delta, own) if wanted else None
    eps = by[accountant]
    if eps is None:
        raise BadInput(f"--accountant {accountant}: could not account {mech.name} at noise {noise_multiplier:g}, "
                       f"q={q:.4g}, steps={steps}")
    extras = mech.privacy_extras(noise_multiplier, q, steps, delta)
    return PrivacyReport(mech.name, accountant_name(mech, accountant), noise_multiplier, q, steps, delta,
                         eps, classic, eps_rdp, by["prv"], alpha, extras, release_rate=mech.sample_rate(q),
                         eps_pld=by["pld"], calibrated_by=accountant, by_accountant=by)


def calibrate(mech: "Mechanism", target_eps: float, q: float, steps: int, delta: float,
              accountant: str = "rdp", rel_tol: float = 1e-4) -> float:
    """Smallest noise multiplier (to ``rel_tol``) whose eps by ``accountant`` is at most ``target_eps``.

    eps is decreasing in the noise, so a bisection between a noise that overshoots and one that
    does not converges from the safe side; the returned value is always one that was checked to fit.
    PLD and PRV start from the RDP answer, which is an upper bound on theirs in practice (checked,
    and widened if ever not), and stop at ``ACCOUNTANT_REL_TOL``; PLD first narrows the noise down
    at a coarse discretisation (a tenth of the evaluation time), then finishes at the fine one.
    """
    if not mech.private:
        return 0.0
    check_accountant(mech, accountant)
    if target_eps > MAX_EPS[accountant]:
        raise BadInput(f"--eps {target_eps:g}: the {accountant.upper()} accountant is limited to eps <= "
                       f"{MAX_EPS[accountant]:g} here (its grids grow with eps); use --accountant rdp")

    def rdp_fits(noise: float) -> bool:
        return _rdp_eps(mech, noise, q, steps, delta)[0] <= target_eps

    def unreachable() -> BadInput:
        return BadInput(f"eps target {target_eps:g} is unreachable for {mech.name} with q={q:.4g}, steps={steps}, "
                        f"delta={delta:g} by {accountant.upper()} (noise multiplier above {MAX_NOISE:g})")

    rdp_noise = _bisect(rdp_fits, 1.0, rel_tol, unreachable)
    if accountant == "rdp":
        return rdp_noise

    def fits(noise: float, discretization: float = PLD_DISCRETIZATION) -> bool:
        rdp_eps = _rdp_eps(mech, noise, q, steps, delta)[0] if accountant == "prv" else math.nan  # PRV's error
        eps = _release_eps(mech, accountant, noise, q, steps, delta, rdp_eps, discretization)
        return eps is not None and eps <= target_eps

    tol = max(rel_tol, ACCOUNTANT_REL_TOL)
    start = rdp_noise
    if accountant == "pld":
        start = _bisect(lambda noise: fits(noise, PLD_COARSE_DISCRETIZATION), rdp_noise, tol, unreachable, shrink=0.8)
    return _bisect(fits, start, tol, unreachable, shrink=0.8 if accountant == "prv" else 1.0 - 4.0 * tol)


def eps_reachable(mech: "Mechanism", target_eps: float, q: float, steps: int, delta: float) -> bool:
    """Whether ``calibrate`` can reach ``target_eps`` at this q and T: its RDP stage (which every accountant
    runs first) declares a target unreachable exactly when the noise ``MAX_NOISE`` does not fit by RDP."""
    return not mech.private or _rdp_eps(mech, MAX_NOISE, q, steps, delta)[0] <= target_eps


def _bisect(fits: Callable[[float], bool], start: float, rel_tol: float, unreachable: Callable[[], BadInput],
            shrink: float = 0.5) -> float:
    """Smallest noise (to ``rel_tol``) that ``fits``, assuming fits is monotone; the answer always fits."""
    hi = start
    while not fits(hi):
        if hi >= MAX_NOISE:  # MAX_NOISE itself is the last noise tried, so ``eps_reachable`` is exact
            raise unreachable()
        hi = min(hi / shrink, MAX_NOISE)
    lo = hi * shrink
    while fits(lo):
        hi, lo = lo, lo * shrink
        if lo < 1e-6:
            return hi
    while (hi - lo) / hi > rel_tol:
        mid = 0.5 * (lo + hi)
        if fits(mid):
            hi = mid
        else:
            lo = mid
    if not fits(hi):  # never report more privacy than the noise gives
        raise RuntimeError("calibration produced a noise multiplier that overshoots the target")
    return hi
