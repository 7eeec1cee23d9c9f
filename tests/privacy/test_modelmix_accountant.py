"""The ModelMix accountant against the vectors of specs/modelmix.md §2.5, and its properties."""

from __future__ import annotations

import json

import numpy as np
import pytest
from opacus.accountants.analysis import rdp as opacus_rdp
from typer.testing import CliRunner

import dpbench.privacy.modelmix as mm
from dpbench.errors import BadInput
from dpbench.mechanisms import get_mechanism
from dpbench.privacy import account, calibrate, eps_classic, eps_opacus, sgm_rdp
from dpbench.privacy.modelmix import AUTHOR_ORDERS, log_moments, modelmix_rdp, per_step_rdp, rho
from dpbench.privacy.rdp import INTEGER_ORDERS

DELTA = 1e-5
CIFAR_Q, CIFAR_T, CIFAR_Z = 1500 / 50000, 3400, 0.335
CIFAR_RHO = rho(tau=0.15 * 0.15, eta=0.15, batch_size=1500, clip=20)  # gamma 0.15, lr 0.15, B 1500, C 20


def classic(q: float, z: float, width: float, p: int, steps: int, orders=AUTHOR_ORDERS) -> tuple[float, float]:
    return eps_classic(orders, modelmix_rdp(q, z, [(steps, width)], p, orders), DELTA)


def test_rho_helper_units():
    assert CIFAR_RHO == pytest.approx(11.25)
    # tau = gamma * lr makes rho independent of the learning rate
    assert rho(0.15 * 0.4, 0.4, 1500, 20) == pytest.approx(rho(0.15 * 0.01, 0.01, 1500, 20))
    # an update of the unaveraged sum would be rho = gamma / C: B times smaller
    assert rho(0.15, 1.0, 1, 20) == pytest.approx(CIFAR_RHO / 1500)
    with pytest.raises(ValueError):
        rho(0.1, 0.0, 1500, 20)


def test_golden_cifar_vector():
    eps, alpha = classic(CIFAR_Q, CIFAR_Z, CIFAR_RHO, 100, CIFAR_T)
    assert eps == pytest.approx(8.000, abs=0.01)
    assert alpha == 4


@pytest.mark.parametrize("steps,z,p,width,expected", [
    (3500, 0.335, 100, 11.25, 8.122),
    (3400, 0.33, 100, 11.25, 8.095),
    (3400, 0.335, 25, 11.25, 9.316),
    (3400, 0.335, 1, 11.25, 450.48),
    (3400, 0.335, 100, 7.5, 11.077),
    (3400, 0.335, 100, 15.0, 6.545),
])
def test_other_cifar_rows(steps, z, p, width, expected):
    assert classic(CIFAR_Q, z, width, p, steps)[0] == pytest.approx(expected, abs=0.01)


@pytest.mark.parametrize("width,expected", [
    (1e-3, (2.5383, 2.5383, 2.5383)),
    (1.0, (2.3909, 2.3567, 2.3500)),
    (5.0, (1.7810, 1.2198, 1.1063)),
    (20.0, (1.5247, 0.7769, 0.7314)),
])
def test_small_rows(width, expected):
    got = [classic(0.01, 1.0, width, p, 1000)[0] for p in (1, 25, 100)]
    np.testing.assert_allclose(got, expected, atol=0.01)


@pytest.mark.parametrize("q,z,p", [(0.01, 1.0, 1), (0.05, 0.7, 100), (0.3, 2.0, 25), (1.0, 1.5, 4)])
def test_zero_width_is_the_sampled_gaussian_at_integer_orders(q, z, p):
    expected = opacus_rdp.compute_rdp(q=q, noise_multiplier=z, steps=7, orders=list(INTEGER_ORDERS))
    np.testing.assert_allclose(modelmix_rdp(q, z, [(7, 0.0)], p), expected, rtol=1e-6)
    # a vanishing uniform tends to the same curve
    np.testing.assert_allclose(modelmix_rdp(q, z, [(7, 1e-4)], p)[:20], expected[:20], rtol=1e-3)


def test_eps_decreases_in_rho_z_and_p_and_increases_in_q_and_steps():
    base = dict(q=0.01, z=1.0, width=5.0, p=25, steps=1000)

    def eps(**change):
        return classic(**{**base, **change})[0]

    for key, values in (("width", [0.0, 1.0, 5.0, 20.0, 80.0]), ("z", [0.5, 0.8, 1.0, 2.0]), ("p", [1, 4, 25, 100])):
        series = [eps(**{key: v}) for v in values]
        assert all(a > b for a, b in zip(series, series[1:])), (key, series)
    for key, values in (("q", [0.001, 0.01, 0.05, 0.2]), ("steps", [10, 100, 1000, 5000])):
        series = [eps(**{key: v}) for v in values]
        assert all(a < b for a, b in zip(series, series[1:])), (key, series)


def test_moments_are_converged_in_the_grid(monkeypatch):
    coarse = log_moments(0.335, 11.25, 0.1, 64)
    mm._log_moments_cached.cache_clear()
    monkeypatch.setattr(mm, "POINTS_PER_SIGMA", 200)
    monkeypatch.setattr(mm, "TAIL_SIGMAS", 30.0)
    try:
        fine = log_moments(0.335, 11.25, 0.1, 64)
    finally:
        mm._log_moments_cached.cache_clear()
    assert coarse[:2].tolist() == [0.0, 0.0]
    np.testing.assert_allclose(coarse, fine, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("width", [1e-13, 1e-11, 1e-9, 1e-7, 1e-5])
def test_a_vanishing_uniform_never_gives_less_than_the_gaussian_moments(width):
    # The uniform changes log M_k by about k^2 width^2 / sigma^2 (under 1e-5 here); a quadrature
    # lost in the cancellation of the two CDFs must not report a smaller moment than that.
    gaussian = np.arange(65) * np.arange(-1, 64) / 2.0  # sigma = 1, shift = 1
    got = log_moments(1.0, width, 1.0, 64)
    assert np.isfinite(got).all()
    assert np.all(got >= gaussian - 1e-5)


def test_a_grid_too_large_gives_infinite_rdp_not_a_small_one(monkeypatch):
    mm._log_moments_cached.cache_clear()
    monkeypatch.setattr(mm, "MAX_GRID_POINTS", 100)
    try:
        assert np.isinf(per_step_rdp(0.01, 1.0, 5.0, 25)).all()
    finally:
        mm._log_moments_cached.cache_clear()


def modelmix(batch_size: int = 1500, clip: float = 20.0, **params):
    mech = get_mechanism("modelmix")(**params)
    mech.bind(batch_size=batch_size, clip=clip)
    return mech


def test_mechanism_rdp_is_the_cifar_setting_on_integer_orders():
    mech = modelmix(p=100, gamma=0.15, gamma_decay=1.0)
    assert mech.phases(CIFAR_T) == [(1700, pytest.approx(11.25)), (1700, pytest.approx(11.25))]
    orders, curve = mech.rdp(CIFAR_Z, CIFAR_Q, CIFAR_T)
    at_integers = [orders.index(float(a)) for a in range(2, 65)]
    own = [o for o in orders if o.is_integer() and 2 <= o <= 64]
    assert own == list(range(2, 65))
    assert eps_classic(own, curve[at_integers], DELTA)[0] == pytest.approx(8.000, abs=0.01)


def test_phase_schedule_is_charged_step_by_step():
    steps = 1001
    mech = modelmix(1000, 1.0, p=100, gamma=0.004, gamma_decay=0.5)
    (n1, rho1), (n2, rho2) = mech.phases(steps)
    assert (n1, n2) == (501, 500) and rho1 == pytest.approx(4.0) and rho2 == pytest.approx(2.0)
    orders, curve = mech.rdp(1.0, 0.01, steps)
    at_integers = [orders.index(float(a)) for a in INTEGER_ORDERS]
    sgm_step = sgm_rdp(0.01, 1.0, 1, INTEGER_ORDERS)
    expected = (n1 * np.minimum(per_step_rdp(0.01, 1.0, 4.0, 100), sgm_step)
                + n2 * np.minimum(per_step_rdp(0.01, 1.0, 2.0, 100), sgm_step))
    np.testing.assert_allclose(curve[at_integers], expected, rtol=1e-12)
    first_only = modelmix(1000, 1.0, p=100, gamma=0.004, gamma_decay=1.0).rdp(1.0, 0.01, steps)[1]
    second_only = modelmix(1000, 1.0, p=100, gamma=0.002, gamma_decay=1.0).rdp(1.0, 0.01, steps)[1]
    assert np.all(first_only <= curve) and np.all(curve <= second_only)


def test_account_reports_both_eps_columns():
    mech = modelmix(p=100, gamma=0.15, gamma_decay=1.0)
    report = account(mech, CIFAR_Z, CIFAR_Q, CIFAR_T, DELTA)
    assert report.accountant == "modelmix-rdp" and report.eps_prv is None
    assert report.eps <= report.eps_classic == pytest.approx(8.000, abs=0.01)
    plain = eps_opacus(mech.sgm_orders, sgm_rdp(CIFAR_Q, CIFAR_Z, CIFAR_T, mech.sgm_orders), DELTA)[0]
    assert report.eps_rdp == pytest.approx(plain) and report.eps_rdp > 30 * report.eps


def test_calibration_is_never_above_target():
    mech = get_mechanism("modelmix")(p=100, gamma=0.02, gamma_decay=0.5)
    mech.bind(batch_size=512, clip=1.0)
    q, steps = 512 / 60000, 1171
    z = calibrate(mech, 3.0, q, steps, DELTA)
    assert account(mech, z, q, steps, DELTA, with_others=False).eps <= 3.0
    assert account(mech, z * 0.999, q, steps, DELTA, with_others=False).eps > 3.0


def test_unbound_mechanism_refuses_to_account():
    with pytest.raises(BadInput, match="clip"):
        get_mechanism("modelmix")().rdp(1.0, 0.01, 100)


def test_account_cli_with_sets():
    from dpbench.cli import app

    args = ["account", "--mech", "modelmix", "--n", "50000", "--batch-size", "1500", "--clip", "20", "--steps", "3400",
            "--sigma", "0.335", "--set", "gamma=0.15", "--set", "gamma_decay=1", "--json"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["accountant"] == "modelmix-rdp" and out["eps_prv"] is None
    assert out["eps_classic"] == pytest.approx(8.000, abs=0.01) and out["eps_rdp"] > 100
    res = CliRunner().invoke(app, args + ["--set", "p=25"])
    assert json.loads(res.stdout)["eps_classic"] == pytest.approx(9.316, abs=0.01)
    res = CliRunner().invoke(app, [a if a != "20" else "40" for a in args])  # C twice as large halves rho
    assert json.loads(res.stdout)["eps_classic"] > 11.0
    res = CliRunner().invoke(app, args + ["--set", "gama=0.1"])
    assert res.exit_code == 2 and "gamma" in res.output
