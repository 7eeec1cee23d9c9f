"""The DPIS-core accountant (specs/dpis.md §2, §3.1(b), §3.3): vectors, identities, monotonicity, calibration."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from dpbench.cli import app
from dpbench.errors import BadInput
from dpbench.mechanisms import get_mechanism
from dpbench.privacy import SGM_ORDERS, account, calibrate, eps_opacus, sgm_rdp
from dpbench.privacy.dpis import (NORM_SHARE, auto_sigma_k, dpis_rdp, gradient_release_rdp, norm_release_rdp,
                                  norm_release_upper_bound, resolve_rates)
from dpbench.privacy.rdp import OPACUS_ORDERS, eps_classic
from .vectors import SGM_SPEC_VECTORS

DPIS = get_mechanism("dpis")
DPSGD = get_mechanism("dpsgd")()
DELTA = 1e-5


def dpis(**params) -> object:
    params.setdefault("adaptive_clip", False)  # clipping does not change the accountant; sigma_k=inf needs it off
    return DPIS(**params)


def test_defaults_do_the_least_work_and_adapt_the_clip():
    mech = DPIS()
    rates = mech.rates(0.01)
    assert mech.params["adaptive_clip"] is True and mech.params["normalise_step"] is True
    assert rates.q_cap == pytest.approx(0.02) and rates.candidate_rate == rates.q_cap and rates.norm_rate == 0.01
    assert mech.rates(0.6).q_cap == 1.0  # q / r_hat capped at 1
    with pytest.raises(BadInput, match="adaptive_clip=false"):
        DPIS(sigma_k=math.inf)


@pytest.mark.parametrize("q,sigma,alpha,value", SGM_SPEC_VECTORS)
def test_spec_per_step_vectors_through_both_releases(q, sigma, alpha, value):
    # Spec §2.6: the gradient release is SGM(q_cap, sigma_G) and the norm release SGM(norm_rate, sigma_K).
    assert gradient_release_rdp(q, sigma, 1, (alpha,))[0] == pytest.approx(value, rel=1e-5)
    assert norm_release_rdp(q, sigma, 1, (alpha,))[0] == pytest.approx(value, rel=1e-5)
    assert norm_release_rdp(q, sigma, 7, (alpha,))[0] == pytest.approx(7 * value, rel=1e-5)


@pytest.mark.parametrize("q,sigma,steps,eps,alpha,classic,classic_alpha", [
    (256 / 60000, 1.1, 14062, 2.5966, 8.1, 3.0083, 8.8),
    (256 / 60000, 1.3, 4687, 1.1064, 16, 1.3497, 17),
    (0.01, 4.0, 10000, 1.0355, 17, 1.2586, 20),
    (0.01, 1.0, 10000, 6.7127, 4.1, 7.4287, 4.3),
    (1024 / 60000, 1.0, 2343, 5.5956, 4.5, 6.2705, 4.6),
])
def test_without_norm_release_and_cap_q_it_is_dpsgd(q, sigma, steps, eps, alpha, classic, classic_alpha):
    # Spec §2.6: sigma_K = inf and q_cap = q must give exactly DP-SGD's curve and the spec's eps.
    mech = dpis(sigma_k=math.inf, q_cap=q, candidate_rate=min(1.0, 4 * q))
    orders, rdp = mech.rdp(sigma, q, steps)
    np.testing.assert_array_equal(rdp, sgm_rdp(q, sigma, steps))
    report = account(mech, sigma, q, steps, DELTA, with_others=False)
    assert report.accountant == "dpis-rdp" and report.sample_rate == q
    assert report.eps == pytest.approx(eps, abs=5e-4) and report.alpha == pytest.approx(alpha)
    assert report.eps_classic == pytest.approx(classic, abs=5e-4)
    assert eps_classic(orders, rdp, DELTA)[1] == pytest.approx(classic_alpha)
    assert report.eps == pytest.approx(account(DPSGD, sigma, q, steps, DELTA, with_others=False).eps, abs=1e-12)


@pytest.mark.parametrize("r_hat,target,dpsgd_sigma,sigma_g", [
    (1.0, 2.0, 1.945, 1.953),
    (0.5, 1.0, 3.455, 6.891),
    (0.25, 4.0, 1.203, 3.929),
])
def test_spec_table_1_4_full_pass_with_sigma_k_1000(r_hat, target, dpsgd_sigma, sigma_g):
    # Spec §1.4: N = 60000, B = 1024, T = 2343, sigma_K = 1000, exact full pass (Gaussian norm release).
    q, steps = 1024 / 60000, 2343
    mech = dpis(r_hat=r_hat, candidate_rate=1, sigma_k=1000)
    assert mech.rates(q).q_cap == pytest.approx(q / r_hat) and mech.rates(q).norm_rate == 1.0
    assert calibrate(mech, target, q, steps, DELTA) == pytest.approx(sigma_g, abs=2e-3)
    assert calibrate(DPSGD, target, q, steps, DELTA) == pytest.approx(dpsgd_sigma, abs=2e-3)


def test_the_two_releases_compose_additively():
    q, steps, sigma_g, sigma_k = 0.01, 300, 1.3, 9.0
    rates = resolve_rates(q, r_hat=0.5)
    assert (rates.q_cap, rates.candidate_rate, rates.norm_rate) == pytest.approx((0.02, 0.02, 0.01))
    expected = sgm_rdp(0.02, sigma_g, steps) + sgm_rdp(0.01, sigma_k, steps)
    np.testing.assert_allclose(dpis(sigma_k=sigma_k).rdp(sigma_g, q, steps)[1], expected, rtol=1e-12)
    # Full pass: the norm release is the plain Gaussian a / (2 sigma_K^2) per step.
    full = dpis(sigma_k=sigma_k, candidate_rate=1).rdp(sigma_g, q, steps)[1]
    gauss = steps * np.asarray(SGM_ORDERS) / (2 * sigma_k**2)
    np.testing.assert_allclose(full, sgm_rdp(0.02, sigma_g, steps) + gauss, rtol=1e-10)


def test_eps_is_at_least_dpsgd_at_the_same_noise():
    # The differing record enters with probability q_cap >= q and there is an extra release.
    q, steps = 512 / 60000, 1000
    for sigma in (0.8, 1.5, 4.0):
        assert account(dpis(), sigma, q, steps, DELTA, with_others=False).eps > account(DPSGD, sigma, q, steps, DELTA,
                                                                                      with_others=False).eps


def eps(sigma: float = 2.0, q: float = 0.01, steps: int = 500, **params) -> float:
    return account(dpis(**params), sigma, q, steps, DELTA, with_others=False).eps


def test_eps_decreases_in_sigma_g_with_the_automatic_sigma_k():
    values = [eps(sigma=s) for s in (0.6, 0.9, 1.3, 2.0, 3.5, 8.0)]
    assert all(a > b for a, b in zip(values, values[1:])), values


def test_eps_increases_in_q_cap_steps_and_decreases_in_sigma_k():
    assert eps(q_cap=0.01) < eps(q_cap=0.02) < eps(q_cap=0.04)
    assert eps(r_hat=1.0) < eps(r_hat=0.5) < eps(r_hat=0.25)
    assert eps(steps=100) < eps(steps=500) < eps(steps=2000)
    assert eps(sigma_k=5.0) > eps(sigma_k=20.0) > eps(sigma_k=math.inf)
    assert eps(norm_rate=0.01, sigma_k=5.0) < eps(norm_rate=0.04, sigma_k=5.0)


def test_automatic_sigma_k_costs_at_most_its_share_and_grows_with_sigma_g():
    q, steps = 512 / 60000, 1170
    rates = resolve_rates(q, r_hat=0.5)
    previous = 0.0
    for sigma_g in (0.7, 1.0, 2.0, 4.0, 8.0):
        sigma_k = auto_sigma_k(sigma_g, rates.q_cap, rates.norm_rate)
        assert sigma_k >= previous
        previous = sigma_k
        # the share holds on Opacus' orders (up to 63), where the optimum of every eps above ~0.2 lies
        norm = norm_release_rdp(rates.norm_rate, sigma_k, steps, OPACUS_ORDERS)
        total = dpis_rdp(sigma_g, sigma_k, rates, steps, OPACUS_ORDERS)
        finite = np.isfinite(total)
        assert np.all(norm[finite] <= NORM_SHARE * total[finite] * (1 + 1e-12))
        _, alpha = eps_opacus(OPACUS_ORDERS, total, DELTA)
        i = OPACUS_ORDERS.index(alpha)
        assert norm[i] <= NORM_SHARE * total[i]
        # It is the smallest such value on its grid: one grid step lower breaks the rule somewhere.
        assert np.all(norm_release_upper_bound(rates.norm_rate, sigma_k, OPACUS_ORDERS) >= norm / steps * (1 - 1e-9))
        bound = norm_release_upper_bound(rates.norm_rate, sigma_k * 2 ** (-1 / 64), OPACUS_ORDERS)
        gradient = (total - norm)[finite] / steps
        assert np.any(bound[finite] > NORM_SHARE / (1 - NORM_SHARE) * gradient)


@pytest.mark.parametrize("target", [0.5, 1.0, 3.0, 8.0])
def test_calibration_never_overshoots(target):
    mech = dpis()
    q, steps = 512 / 60000, 1170
    sigma = calibrate(mech, target, q, steps, DELTA)
    spent = account(mech, sigma, q, steps, DELTA, with_others=False).eps
    assert spent <= target and spent == pytest.approx(target, rel=2e-3)


def test_bad_rates_are_bad_input():
    with pytest.raises(BadInput, match="exceeds candidate_rate"):
        dpis(q_cap=0.2, candidate_rate=0.1)
    with pytest.raises(BadInput, match="exceeds candidate_rate"):
        dpis(q_cap=0.5, candidate_rate=0.04).rdp(1.0, 0.01, 10)
    for key, value in (("r_hat", 0.0), ("r_hat", 1.5), ("sigma_k", -1.0), ("norm_rate", 0.0)):
        with pytest.raises(BadInput):
            dpis(**{key: value}).rdp(1.0, 0.01, 10)
    with pytest.raises(BadInput, match="adaptive_clip=false"):
        dpis(adaptive_clip=True, sigma_k=math.inf)


runner = CliRunner()


def account_json(*args: str) -> dict:
    res = runner.invoke(app, ["account", "--mech", "dpis", "--n", "60000", "--batch-size", "512", "--steps", "1170",
                              "--json", *args])
    assert res.exit_code == 0, res.output
    return json.loads(res.output)


def test_cli_account_takes_every_run_parameter():
    payload = account_json("--sigma", "3", "--set", "sigma_k=inf", "--set", "r_hat=0.1", "--set", "candidate_rate=0.05",
                           "--set", "norm_rate=0.02", "--set", "adaptive_clip=false")
    assert payload["accountant"] == "dpis-rdp" and payload["release_rate"] == pytest.approx(0.05)
    assert payload["sample_rate"] == pytest.approx(512 / 60000)  # q = B/N; q_cap is the release rate
    assert payload["eps"] > payload["eps_rdp"]
    # the release is SGM(q_cap = 0.05, 3) alone (sigma_k = inf): PLD and PRV see exactly that, and are tighter
    assert payload["eps_pld"] < payload["eps"] and payload["eps_prv"] < payload["eps"]
    assert payload["eps_by_accountant"] == {"rdp": payload["eps"], "pld": payload["eps_pld"], "prv": payload["eps_prv"]}
    auto = account_json("--sigma", "3", "--set", "sigma_k=auto", "--set", "q_cap=0.03")
    assert auto["release_rate"] == pytest.approx(0.03)
    assert auto == account_json("--sigma", "3", "--set", "q_cap=0.03")
    calibrated = account_json("--eps", "2")
    assert calibrated["eps"] <= 2.0


def test_cli_account_rejects_q_cap_above_candidate_rate_with_exit_2():
    res = runner.invoke(app, ["account", "--mech", "dpis", "--n", "60000", "--batch-size", "512", "--steps", "100",
                              "--sigma", "2", "--set", "q_cap=0.5", "--set", "candidate_rate=0.1"])
    assert res.exit_code == 2 and "candidate_rate" in res.output
