"""Privacy loss distributions by Google's ``dp_accounting`` (the tightest accountant we offer).

``dp_accounting.pld.PLDAccountant`` composes the Poisson-sampled Gaussians of a release under
add-or-remove-one neighbours, as the RDP and PRV accountants do, with pessimistic discretisation:
a coarser ``value_discretization_interval`` can only raise eps, never lower it.

Cost, measured on this project's 2-core machine: one eps at discretisation 1e-4 takes 0.02-0.6 s for
DP-SGD recipes (MNIST, 30-40 epochs), 4 s and 0.5 GB around eps 100-300, 22 s and 1.7 GB at eps ~1200;
``PLD_MAX_EPS`` keeps the column away from the last. Results are cached per process.
"""

from __future__ import annotations

import math
import warnings
from functools import lru_cache

from dpbench.privacy.release import Release, accounted_parts

#: Value discretisation of the PLD (the interval on the privacy-loss axis).
PLD_DISCRETIZATION = 1e-4
#: The PLD column is computed only where the RDP eps of the same release is at most this
#: (memory and time grow with eps; see the module docstring).
PLD_MAX_EPS = 100.0


def pld_eps(release: Release, delta: float, discretization: float = PLD_DISCRETIZATION) -> float:
    """eps of ``release`` at ``delta`` by dp_accounting's PLD accountant."""
    parts = accounted_parts(release)
    if parts is None:
        return math.inf
    if not parts:
        return 0.0
    return _pld_eps(parts, float(delta), float(discretization))


@lru_cache(maxsize=1024)
def _pld_eps(parts: tuple[tuple[float, float, int], ...], delta: float, discretization: float) -> float:
    from dp_accounting import dp_event
    from dp_accounting.pld import PLDAccountant

    events = [dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(rate, dp_event.GaussianDpEvent(sigma)), steps)
        for sigma, rate, steps in parts]
    accountant = PLDAccountant(value_discretization_interval=discretization)
    accountant.compose(events[0] if len(events) == 1 else dp_event.ComposedDpEvent(events))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(accountant.get_epsilon(delta))
