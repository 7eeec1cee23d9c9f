"""PLD accounting (dp_accounting) and calibration by every accountant: known values and properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from dpbench.errors import BadInput
from dpbench.mechanisms import get_mechanism
from dpbench.privacy import SGM_ORDERS, account, calibrate, eps_opacus, sgm_rdp
from dpbench.privacy.pld import pld_eps
from dpbench.privacy.rdp import OPACUS_ORDERS
from dpbench.privacy.release import SampledGaussian, release_rdp

DELTA = 1e-5
DPSGD = get_mechanism("dpsgd")()


def sgm_event(sigma: float, q: float, steps: int) -> dp_event.DpEvent:
    return dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)


def google_pld(event: dp_event.DpEvent, delta: float, discretization: float = 1e-4) -> float:
    accountant = PLDAccountant(value_discretization_interval=discretization)
    accountant.compose(event)
    return accountant.get_epsilon(delta)


def google_rdp(event: dp_event.DpEvent, delta: float, orders=SGM_ORDERS) -> float:
    accountant = RdpAccountant(orders=list(orders))
    accountant.compose(event)
    return accountant.get_epsilon(delta)


# (sigma, q, steps, delta): DP-SGD recipes of the seed papers and a few extremes
VECTORS = [(1.1, 256 / 60000, 14062, 1e-5), (1.3, 256 / 60000, 4687, 1e-5), (4.0, 0.01, 10000, 1e-5),
           (1.0, 1024 / 60000, 2343, 1e-6), (0.7, 0.05, 300, 1e-5), (20.0, 256 / 60000, 9375, 1e-5),
           (2.0, 1.0, 50, 1e-3)]


@pytest.mark.parametrize("sigma,q,steps,delta", VECTORS)
def test_pld_eps_is_dp_accountings(sigma, q, steps, delta):
    ours = pld_eps((SampledGaussian(sigma, q, steps),), delta)
    assert ours == pytest.approx(google_pld(sgm_event(sigma, q, steps), delta), rel=1e-12)


INTEGER_SGM_ORDERS = [a for a in SGM_ORDERS if float(a).is_integer()]


def integer_order_eps(orders, curve, delta: float) -> float:
    at = [list(orders).index(a) for a in INTEGER_SGM_ORDERS]
    return eps_opacus(INTEGER_SGM_ORDERS, np.asarray(curve)[at], delta)[0]


@pytest.mark.parametrize("sigma,q,steps,delta", VECTORS)
def test_sgm_rdp_is_dp_accountings_rdp_at_integer_orders(sigma, q, steps, delta):
    """At integer orders both libraries sum the same finite series; the conversions are the same."""
    ours = integer_order_eps(*DPSGD.rdp(sigma, q, steps), delta)
    assert ours == pytest.approx(google_rdp(sgm_event(sigma, q, steps), delta, INTEGER_SGM_ORDERS), rel=1e-9)


@pytest.mark.parametrize("alpha,exact", [(2.5, 0.027296006851599115), (3.5, 0.11277649486092342)])
def test_fractional_orders_are_exact_where_dp_accounting_is_an_upper_bound(alpha, exact):
    """One SGM step at q = 0.05, sigma = 0.7: E_mu0[(mu/mu0)^alpha] by 40-digit quadrature (mpmath) gives
    ``exact``. Opacus sums the binomial series with its signs and matches; dp_accounting 0.6.0 adds the terms'
    absolute values, an upper bound (0.75 % above at 2.5), so at fractional orders ours is the smaller, and right."""
    ours = sgm_rdp(0.05, 0.7, 1, [alpha])[0]
    google = RdpAccountant(orders=[alpha])
    google.compose(sgm_event(0.7, 0.05, 1))
    assert ours == pytest.approx(exact, rel=1e-10)
    assert google._rdp[0] > ours


@pytest.mark.parametrize("sigma,q,steps,delta", VECTORS)
def test_pld_is_below_rdp_for_the_same_noise(sigma, q, steps, delta):
    report = account(DPSGD, sigma, q, steps, delta)
    assert report.eps_pld is not None and report.eps_pld < report.eps_rdp
    if report.eps_prv is not None:  # PRV, the other tight accountant, agrees with PLD to its error
        assert report.eps_prv == pytest.approx(report.eps_pld, rel=0.02, abs=0.02)


def test_a_coarser_discretisation_never_lowers_eps():
    release = (SampledGaussian(1.0, 0.01, 1000),)
    fine, coarse = pld_eps(release, DELTA, 1e-4), pld_eps(release, DELTA, 1e-3)
    assert fine <= coarse < 1.01 * fine


def dpis(**params):
    return get_mechanism("dpis")(**params)


@pytest.mark.parametrize("sigma,q,steps,params", [
    (1.0, 512 / 60000, 4687, {}), (2.0, 2048 / 60000, 1171, {"q_cap": 0.1}),
    (3.0, 0.01, 500, {"sigma_k": 5.0, "norm_rate": 0.05}), (1.5, 0.02, 200, {"candidate_rate": 1.0}),
])
def test_dpis_release_is_both_sampled_gaussians_composed(sigma, q, steps, params):
    mech = dpis(**params)
    rates, sigma_k = mech.rates(q), mech.sigma_k(sigma, q)
    event = dp_event.ComposedDpEvent([sgm_event(sigma, rates.q_cap, steps), sgm_event(sigma_k, rates.norm_rate, steps)])
    report = account(mech, sigma, q, steps, DELTA)
    assert report.accountant == "dpis-rdp"
    assert report.eps_pld == pytest.approx(google_pld(event, DELTA), rel=1e-12)
    # its RDP is the same composition (compared where both libraries are exact: integer orders)
    assert integer_order_eps(*mech.rdp(sigma, q, steps), DELTA) == pytest.approx(
        google_rdp(event, DELTA, INTEGER_SGM_ORDERS), rel=1e-9)
    # the norm release costs something, and the gradient release alone is at q_cap, not q
    assert google_pld(sgm_event(sigma, q, steps), DELTA) < google_pld(sgm_event(sigma, rates.q_cap, steps), DELTA) \
        < report.eps_pld < report.eps


# The issue's table, measured with dp_accounting: sigma needed at (N, B, epochs, eps), by RDP and by PLD.
ISSUE_TABLE = [(60000, 256, 30, 2, 1.035, 0.985), (60000, 512, 40, 3, 1.123, 1.068),
               (60000, 2048, 40, 1, 4.833, 4.461), (50000, 8192, 60, 3, 4.811, 4.480)]


@pytest.mark.parametrize("n,batch,epochs,eps,sigma_rdp,sigma_pld", ISSUE_TABLE)
def test_calibration_finds_the_published_noise_and_pld_is_tight(n, batch, epochs, eps, sigma_rdp, sigma_pld):
    q, steps = batch / n, int(epochs * n / batch)
    by_rdp = calibrate(DPSGD, eps, q, steps, DELTA)
    by_pld = calibrate(DPSGD, eps, q, steps, DELTA, "pld")
    assert by_rdp == pytest.approx(sigma_rdp, abs=6e-4) and by_pld == pytest.approx(sigma_pld, abs=2e-3)
    # tightness: dp_accounting itself, at discretisation 1e-4, puts eps within [0.97, 1] x the target
    spent = google_pld(sgm_event(by_pld, q, steps), DELTA)
    assert 0.97 * eps <= spent <= eps
    assert account(DPSGD, by_pld, q, steps, DELTA, "pld").eps == pytest.approx(spent, rel=1e-12)


GRID = [("dpsgd", 0.5, 0.01, 800), ("dpsgd", 2.0, 256 / 60000, 4687), ("dpsgd", 8.0, 0.05, 400),
        ("dpsgd", 1.0, 1.0, 30), ("dpis", 0.5, 0.01, 800), ("dpis", 2.0, 256 / 60000, 4687)]


@pytest.mark.parametrize("accountant", ["rdp", "pld", "prv"])
@pytest.mark.parametrize("name,target,q,steps", GRID)
def test_calibration_by_each_accountant_is_never_above_target(accountant, name, target, q, steps):
    mech = get_mechanism(name)()
    noise = calibrate(mech, target, q, steps, DELTA, accountant)
    report = account(mech, noise, q, steps, DELTA, accountant, with_others=False)
    assert report.eps <= target and report.calibrated_by == accountant
    assert report.eps >= 0.97 * target  # and not loose
    assert report.accountant == f"{mech.accountant.split('-')[0]}-{accountant}"
    # the smallest such noise (to the calibration's precision)
    assert account(mech, noise * (1 - 2e-3), q, steps, DELTA, accountant, with_others=False).eps > target
    if accountant != "rdp":  # a tighter accountant needs less noise than RDP for the same target
        assert noise < calibrate(mech, target, q, steps, DELTA, "rdp")


@pytest.mark.parametrize("target", [0.1, 0.2])
def test_small_eps_calibrates_where_opacus_orders_cannot(target):
    q, steps = 0.01, 1000
    for accountant in ("rdp", "pld") if target == 0.1 else ("rdp",):
        noise = calibrate(DPSGD, target, q, steps, DELTA, accountant)
        assert target * 0.97 <= account(DPSGD, noise, q, steps, DELTA, accountant).eps <= target
    noise = calibrate(DPSGD, target, q, steps, DELTA)
    # Opacus' grid ends at 63: at any noise its eps stays above log(1/delta)/62 - log(63)/62 ~ 0.12
    assert eps_opacus(OPACUS_ORDERS, sgm_rdp(q, noise, steps, OPACUS_ORDERS), DELTA)[0] > target
    assert eps_opacus(OPACUS_ORDERS, sgm_rdp(q, 1e6, steps, OPACUS_ORDERS), DELTA)[0] > 0.1
    mech = dpis()
    noise = calibrate(mech, target, q, steps, DELTA)
    assert account(mech, noise, q, steps, DELTA, with_others=False).eps <= target


def test_release_rdp_adds_its_parts():
    release = (SampledGaussian(1.0, 0.02, 100), SampledGaussian(3.0, 0.5, 100))
    expected = sgm_rdp(0.02, 1.0, 100) + sgm_rdp(0.5, 3.0, 100)
    np.testing.assert_allclose(release_rdp(release, SGM_ORDERS), expected, rtol=1e-12)


def test_pld_of_a_noiseless_release_is_infinite():
    assert math.isinf(pld_eps((SampledGaussian(0.0, 0.1, 10),), DELTA))
    assert pld_eps((SampledGaussian(1.0, 0.0, 10),), DELTA) == 0.0


def test_pld_and_prv_refuse_targets_beyond_their_grids():
    with pytest.raises(BadInput, match="--accountant rdp"):
        calibrate(DPSGD, 500.0, 0.01, 100, DELTA, "pld")
    with pytest.raises(BadInput, match="PRV"):
        calibrate(DPSGD, 50.0, 0.01, 100, DELTA, "prv")


def test_accounting_a_tiny_noise_by_pld_is_refused_not_attempted():
    with pytest.raises(BadInput, match="spends eps .* by RDP"):
        account(DPSGD, 0.05, 0.1, 1000, DELTA, "pld")
    assert account(DPSGD, 0.05, 0.1, 1000, DELTA).eps_pld is None  # nor computed as a column
