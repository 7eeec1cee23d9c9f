"""The one-run audit's statistics against values derived by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import brentq

from dpbench.audit import stats


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_all_correct_without_delta_is_the_closed_form():
    # P[Bin(r, p) >= r] = p^r = beta  =>  p = beta^(1/r), eps = logit(p)
    for r in (5, 10, 100):
        expected = logit(0.05 ** (1 / r))
        assert stats.eps_lower_bound(1000, r, r, delta=0.0, beta=0.05) == pytest.approx(expected, abs=1e-5)
    assert stats.eps_lower_bound(1000, 10, 10, 0.0, 0.05) == pytest.approx(1.05187, abs=1e-4)


def test_one_wrong_guess_matches_the_binomial_polynomial():
    # P[Bin(20, p) >= 19] = p^20 + 20 p^19 (1 - p)
    r, beta = 20, 0.05
    p = brentq(lambda p: p ** r + r * p ** (r - 1) * (1 - p) - beta, 0.5, 1 - 1e-12)
    assert stats.eps_lower_bound(1000, r, r - 1, delta=0.0, beta=beta) == pytest.approx(logit(p), abs=1e-5)


def test_delta_term_by_hand():
    # m = r = v = 2: tail p^2; slack max(P[W=1], (P[W=1] + P[W=0]) / 2) = 2p(1-p) for p > 1/3
    eps, delta = 1.0, 0.01
    p = math.exp(eps) / (1 + math.exp(eps))
    expected = p ** 2 + 2 * 2 * delta * 2 * p * (1 - p)
    assert stats.p_value(2, 2, 2, eps, delta) == pytest.approx(expected, rel=1e-12)
    # and delta only ever weakens the bound
    assert stats.eps_lower_bound(100, 50, 45, 1e-3) < stats.eps_lower_bound(100, 50, 45, 0.0)


def test_chance_level_guesses_give_zero():
    for r in (2, 10, 100, 1000):
        assert stats.eps_lower_bound(1000, r, r // 2, delta=1e-5) == 0.0
    # scores that put exactly half of every top and bottom slice right, at every k of the grid
    m = 400
    scores = -np.arange(m, dtype=float)
    included = np.arange(m) % 2 == 0
    assert stats.audit(scores, included, delta=1e-5).eps_lower_bound == 0.0
    assert stats.auroc(scores, included) == pytest.approx(0.5, abs=0.01)


def test_bound_grows_with_correct_guesses():
    bounds = [stats.eps_lower_bound(1000, 100, v, delta=1e-5) for v in range(50, 101)]
    assert all(b2 >= b1 for b1, b2 in zip(bounds, bounds[1:]))
    assert bounds[-1] > bounds[len(bounds) // 2] > 0 == bounds[0]


def test_perfect_separation_is_large_but_finite_and_pays_for_the_k_search():
    m = 1000
    included = np.arange(m) < m // 2
    scores = included.astype(float) + np.linspace(0, 0.1, m)
    result = stats.audit(scores, included, delta=0.0)
    grid = stats.k_grid(m)
    assert result.correct == result.k == m
    # the search over the grid is paid with a union bound: level beta / len(grid)
    assert result.eps_lower_bound == pytest.approx(logit((0.05 / len(grid)) ** (1 / m)), abs=1e-5)
    assert result.eps_lower_bound < math.log(m)
    assert result.eps_lower_bound < stats.audit(scores, included, delta=0.0, ks=[m]).eps_lower_bound
    assert result.auroc == 1.0 and result.tpr_at_fpr_001 == 1.0


def test_guesses_take_the_top_and_bottom_of_the_ranking():
    scores = np.array([0.1, 5.0, 3.0, -2.0, 0.0, 4.0])
    g = stats.guesses(scores, 3)
    assert list(g) == [0, 1, 0, -1, 0, 1]
    included = np.array([False, True, False, False, True, False])
    assert stats.count_correct(scores, included, 3) == 2  # canary 1 in (right), 3 out (right), 5 in (wrong)


def test_roc_and_tpr_at_low_fpr_by_hand():
    # 100 excluded at scores 0..99, 10 included at 99.5 and above, except one at -1
    excl = np.arange(100, dtype=float)
    incl = np.r_[99.5 + np.arange(9), -1.0]
    scores = np.r_[excl, incl]
    included = np.r_[np.zeros(100, bool), np.ones(10, bool)]
    assert stats.tpr_at_fpr(scores, included, 0.01) == pytest.approx(0.9)
    assert stats.auroc(scores, included) == pytest.approx(0.9)
    fpr, tpr = stats.roc(scores, included)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1


def test_invalid_counts_are_rejected():
    with pytest.raises(ValueError):
        stats.p_value(10, 5, 6, 1.0, 0.0)
    with pytest.raises(ValueError):
        stats.audit([1.0], [True], 1e-5)
