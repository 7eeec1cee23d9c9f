"""Opacus' PRV accountant for compositions of sampled Gaussians."""

from __future__ import annotations

import warnings

import pytest
from opacus.accountants import PRVAccountant

from dpbench.privacy.prv import prv_eps, prv_error
from dpbench.privacy.release import SampledGaussian


def opacus_prv(history, delta, eps_error):
    accountant = PRVAccountant()
    accountant.history = list(history)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return accountant.get_epsilon(delta, eps_error=eps_error)


@pytest.mark.parametrize("history", [[(1.1, 256 / 60000, 4000)], [(1.0, 0.02, 500), (4.0, 0.005, 500)]])
def test_prv_eps_is_opacus_for_one_or_several_parts(history):
    release = tuple(SampledGaussian(*h) for h in history)
    assert prv_eps(release, 1e-5, 0.01) == pytest.approx(opacus_prv(history, 1e-5, 0.01), rel=1e-12)


def test_prv_error_scales_with_eps_so_small_eps_stay_tight():
    assert prv_error(3.0) == 0.01 and prv_error(0.1) == pytest.approx(1e-3) and prv_error(1e-9) == 1e-4
    release = (SampledGaussian(20.0, 256 / 60000, 9375),)
    tight, loose = prv_eps(release, 1e-5, prv_error(0.07)), prv_eps(release, 1e-5, 0.01)
    assert tight < loose  # Opacus returns the upper end of its error interval
    assert loose > 1.1 * tight  # a fixed 0.01 would cost more than 10 % at eps ~ 0.06
