"""The sampled-Gaussian accountant against the vectors of specs/dpis.md §2.6, and its properties."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dpbench.mechanisms import get_mechanism
from dpbench.privacy import SGM_ORDERS, account, calibrate, eps_classic, eps_opacus, sgm_rdp
from .vectors import SGM_SPEC_VECTORS

DPSGD = get_mechanism("dpsgd")()


@pytest.mark.parametrize("q,sigma,alpha,expected", SGM_SPEC_VECTORS)
def test_per_step_sgm_rdp_matches_spec(q, sigma, alpha, expected):
    assert sgm_rdp(q, sigma, 1, [alpha])[0] == pytest.approx(expected, rel=1e-5)


def test_order_two_closed_form():
    q = 0.01
    assert sgm_rdp(q, 1.0, 1, [2])[0] == pytest.approx(math.log(1 + q * q * (math.e - 1)), rel=1e-9)


@pytest.mark.parametrize("q,sigma,steps,eps,alpha,eps_cl,alpha_cl", [
    (256 / 60000, 1.1, 14062, 2.5966, 8.1, 3.0083, 8.8),
    (256 / 60000, 1.3, 4687, 1.1064, 16, 1.3497, 17),
    (0.01, 4.0, 10000, 1.0355, 17, 1.2586, 20),
    (0.01, 1.0, 10000, 6.7127, 4.1, 7.4287, 4.3),
    (1024 / 60000, 1.0, 2343, 5.5956, 4.5, 6.2705, 4.6),
])
def test_dpsgd_composition_matches_spec(q, sigma, steps, eps, alpha, eps_cl, alpha_cl):
    report = account(DPSGD, sigma, q, steps, 1e-5, with_others=False)
    assert report.eps == pytest.approx(eps, abs=5e-4)
    assert report.alpha == pytest.approx(alpha)
    assert report.eps_classic == pytest.approx(eps_cl, abs=5e-4)
    rdp = sgm_rdp(q, sigma, steps)
    assert eps_classic(SGM_ORDERS, rdp, 1e-5)[1] == pytest.approx(alpha_cl)


def test_external_anchor_moments_accountant():
    # Bu, Dong, Long & Su (2020), Fig. 4: (1.34, 1e-5) by the moments accountant (classic conversion).
    report = account(DPSGD, 1.3, 256 / 60000, 4687, 1e-5, with_others=False)
    assert report.eps_classic == pytest.approx(1.34, abs=0.02)


def test_opacus_conversion_never_looser_than_classic():
    for sigma in (0.7, 1.0, 2.0, 5.0):
        rdp = sgm_rdp(0.01, sigma, 1000)
        assert eps_opacus(SGM_ORDERS, rdp, 1e-5)[0] <= eps_classic(SGM_ORDERS, rdp, 1e-5)[0]


def test_q_one_is_the_plain_gaussian():
    sigma, steps = 1.7, 13
    orders = [2, 3, 5.5, 10, 32]
    expected = [steps * a / (2 * sigma**2) for a in orders]
    np.testing.assert_allclose(sgm_rdp(1.0, sigma, steps, orders), expected, rtol=1e-10)


def test_steps_compose_linearly():
    np.testing.assert_allclose(sgm_rdp(0.02, 1.1, 300), 3 * sgm_rdp(0.02, 1.1, 100), rtol=1e-12)


def eps(sigma=1.0, q=0.01, steps=1000):
    return account(DPSGD, sigma, q, steps, 1e-5, with_others=False).eps


def test_eps_decreases_in_sigma():
    values = [eps(sigma=s) for s in (0.6, 0.8, 1.0, 1.5, 3.0, 10.0)]
    assert all(a > b for a, b in zip(values, values[1:]))


def test_eps_increases_in_q_and_steps():
    by_q = [eps(q=q) for q in (0.001, 0.005, 0.01, 0.05, 0.2)]
    by_t = [eps(steps=t) for t in (10, 100, 1000, 10000)]
    assert all(a < b for a, b in zip(by_q, by_q[1:]))
    assert all(a < b for a, b in zip(by_t, by_t[1:]))


def test_prv_is_reported_and_tighter_than_rdp():
    report = account(DPSGD, 1.1, 256 / 60000, 14062, 1e-5)
    assert report.eps_prv is not None
    assert 0.8 * report.eps < report.eps_prv < report.eps


@pytest.mark.parametrize("target", [0.5, 1.0, 2.0, 3.0, 4.0, 8.0])
@pytest.mark.parametrize("q,steps", [(512 / 60000, 4687), (2048 / 60000, 1171), (0.1, 50)])
def test_calibration_never_above_target_and_tight(target, q, steps):
    sigma = calibrate(DPSGD, target, q, steps, 1e-5)
    spent = account(DPSGD, sigma, q, steps, 1e-5, with_others=False).eps
    assert spent <= target
    # the smallest such noise: 0.1 % less noise overshoots
    assert account(DPSGD, sigma * 0.999, q, steps, 1e-5, with_others=False).eps > target


def test_calibration_matches_opacus_within_its_tolerance():
    from opacus.accountants.utils import get_noise_multiplier

    ours = calibrate(DPSGD, 3.0, 256 / 60000, 14062, 1e-5)
    theirs = get_noise_multiplier(target_epsilon=3.0, target_delta=1e-5, sample_rate=256 / 60000,
                                  steps=14062, accountant="rdp")
    assert ours <= theirs + 1e-9
    assert ours == pytest.approx(theirs, rel=0.02)


def test_nonprivate_reports_infinite_eps():
    report = account(get_mechanism("nonprivate")(), 0.0, 0.01, 100, 1e-5)
    assert math.isinf(report.eps) and report.accountant == "none"


def test_eps_reachable_is_exactly_where_calibration_gives_up():
    from dpbench.errors import BadInput
    from dpbench.privacy import eps_reachable
    from dpbench.privacy.accounting import MAX_NOISE

    q, steps = 1.0, 10**6  # the plain Gaussian: eps at noise MAX_NOISE is well above zero, and cheap
    edge = account(DPSGD, MAX_NOISE, q, steps, 1e-5, with_others=False).eps  # the least eps calibration reaches
    assert eps_reachable(DPSGD, edge, q, steps, 1e-5)
    sigma = calibrate(DPSGD, edge, q, steps, 1e-5)  # reachable means calibrate finds it, up to MAX_NOISE itself
    assert sigma <= MAX_NOISE and account(DPSGD, sigma, q, steps, 1e-5).eps <= edge
    assert not eps_reachable(DPSGD, 0.999 * edge, q, steps, 1e-5)
    with pytest.raises(BadInput, match="unreachable"):
        calibrate(DPSGD, 0.999 * edge, q, steps, 1e-5)
