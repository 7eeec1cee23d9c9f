"""Statistics of the one-run privacy audit (Steinke, Nasr & Jagielski, NeurIPS 2023). numpy/scipy only.

The experiment: m canaries, each put into the training run independently with probability 1/2
(``S_i = +1`` in, ``-1`` out). After the single run the auditor scores every canary and guesses
"in" for its ``k_plus`` highest scores, "out" for its ``k_minus`` lowest, and abstains on the rest:
``r = k_plus + k_minus`` guesses, ``v`` of them correct.

Why a Binomial tail bounds v. If the training run is eps-DP with respect to each canary, then,
given the output and everything about the other canaries, the posterior odds that canary i is
in are at most e^eps times its prior odds of 1. So any single guess is right with probability at
most ``p(eps) = e^eps / (1 + e^eps)`` (randomized response is the case where this is tight), and
because the canaries are independent this holds for each guess conditionally on all earlier ones.
The number of correct guesses is then stochastically dominated by ``Binomial(r, p(eps))``:
``P[V >= v] <= P[Binomial(r, p(eps)) >= v]``. Steinke et al. (their Theorem 3) extend this to
(eps, delta)-DP: delta lets each canary's privacy "fail" with a small probability, which adds

    2 m delta * max_{1 <= i <= v} (1/i) * P[v - i <= Binomial(r, p(eps)) < v]

to the tail (the failure mass can turn at most a few wrong guesses into right ones, and the
max over i is the worst way to spend it). Call the sum ``p_value(eps)``: under the hypothesis
"the run is (eps, delta)-DP", seeing v or more correct guesses has probability at most that.

The lower bound. ``p_value`` grows with eps, so every eps with ``p_value(eps) < beta`` is
rejected at level beta; the reported lower bound is the largest such eps (found by bisection),
0 when even eps = 0 is not rejected. With every guess right (v = r = m) the bound is finite,
``logit(beta^(1/m))`` for delta = 0, about ``log(m / log(1/beta))``: one run with m canaries can
never show more than that, which is why a non-private run audits to a large but finite eps.

Searching k. Trying several guess counts and keeping the best is a multiple test. As Steinke
et al. search k, we fix a grid of candidate counts before looking at the scores and test each at
level ``beta / len(grid)`` (a union bound), so the maximum over the grid is still a valid lower
bound at confidence 1 - beta.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
from scipy import stats

#: Fractions of m tried as the number of guesses k (half "in" at the top, half "out" at the bottom).
K_FRACTIONS: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)
#: No audit with m canaries can show more than about log(m); the bisection searches below this.
EPS_SEARCH_MAX = 200.0


def guess_accuracy(eps: float) -> float:
    """``e^eps / (1 + e^eps)``: the best accuracy of one guess against an eps-DP run."""
    return float(1.0 / (1.0 + math.exp(-eps)))


def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Upper bound on P[at least v of r guesses correct] if the run is (eps, delta)-DP (Theorem 3)."""
    if not (0 <= v <= r <= m):
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    if eps < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need eps >= 0 and delta in [0, 1], got eps={eps}, delta={delta}")
    if v == 0:
        return 1.0
    p = guess_accuracy(eps)
    tail = float(stats.binom.sf(v - 1, r, p))  # P[Binomial(r, p) >= v]
    slack = 0.0
    if delta > 0:
        # P[v - i <= W < v] for i = 1..v, i.e. the cumulative pmf below v, read downwards
        below = stats.binom.pmf(np.arange(v - 1, -1, -1), r, p).cumsum()
        slack = float(np.max(below / np.arange(1, v + 1)))
    return min(1.0, tail + 2.0 * m * delta * slack)


def eps_lower_bound(m: int, r: int, v: int, delta: float, beta: float = 0.05, tol: float = 1e-6) -> float:
    """Largest eps rejected at level ``beta``: the run is not (eps, delta)-DP, with confidence 1 - beta.

    Rounded down (the bisection keeps its lower end rejected), so the bound never overstates.
    """
    if not 0 < beta < 1:
        raise ValueError(f"beta must be in (0, 1), got {beta}")
    if p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < beta:
        lo, hi = hi, 2.0 * hi
        if hi > EPS_SEARCH_MAX:
            return lo
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if p_value(m, r, v, mid, delta) < beta:
            lo = mid
        else:
            hi = mid
    return lo


def k_grid(m: int) -> list[int]:
    """Candidate guess counts, fixed by m alone (never by the scores): the search the bound pays for."""
    ks = sorted({max(2, min(m, round(f * m))) for f in K_FRACTIONS})
    return [k for k in ks if k <= m] or [m]


def _order(scores: np.ndarray) -> np.ndarray:
    """Indices from the highest score to the lowest; ties kept in canary order, which S does not touch."""
    return np.argsort(-scores, kind="stable")


def guesses(scores: Sequence[float], k: int) -> np.ndarray:
    """+1 ("in") for the ceil(k/2) highest scores, -1 ("out") for the floor(k/2) lowest, 0 elsewhere."""
    s = np.asarray(scores, dtype=float)
    if not 0 <= k <= len(s):
        raise ValueError(f"k={k} must be in [0, m={len(s)}]")
    order = _order(s)
    k_plus = (k + 1) // 2
    k_minus = k - k_plus
    out = np.zeros(len(s), dtype=int)
    out[order[:k_plus]] = 1
    if k_minus:
        out[order[len(s) - k_minus:]] = -1
    return out


def count_correct(scores: Sequence[float], included: Sequence[bool], k: int) -> int:
    """How many of the k guesses of ``guesses(scores, k)`` match the membership."""
    g = guesses(scores, k)
    truth = np.where(np.asarray(included, dtype=bool), 1, -1)
    return int(np.sum(g * truth == 1))


def roc(scores: Sequence[float], included: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) of "in iff score >= t" over every threshold t, starting at (0, 0), ending at (1, 1)."""
    s = np.asarray(scores, dtype=float)
    y = np.asarray(included, dtype=bool)
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        raise ValueError("the ROC needs both included and excluded canaries")
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    tp, fp = np.cumsum(y_sorted), np.cumsum(~y_sorted)
    # one point per distinct threshold: the last position of each run of equal scores
    last = np.r_[np.nonzero(np.diff(s_sorted))[0], len(s) - 1]
    fpr = np.r_[0.0, fp[last] / neg]
    tpr = np.r_[0.0, tp[last] / pos]
    return fpr, tpr


def auroc(scores: Sequence[float], included: Sequence[bool]) -> float:
    """Area under the ROC: P[an included canary outscores an excluded one], ties counted half."""
    y = np.asarray(included, dtype=bool)
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        raise ValueError("AUROC needs both included and excluded canaries")
    ranks = stats.rankdata(np.asarray(scores, dtype=float))
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def tpr_at_fpr(scores: Sequence[float], included: Sequence[bool], fpr_max: float = 0.01) -> float:
    """Highest TPR over thresholds whose FPR is at most ``fpr_max``."""
    fpr, tpr = roc(scores, included)
    return float(tpr[fpr <= fpr_max + 1e-12].max())


@dataclass(frozen=True)
class AuditResult:
    """What one audit measured; ``eps_lower_bound`` holds with confidence ``1 - beta``."""

    m: int
    k: int  # guesses at the best grid point (k_plus "in" + k_minus "out")
    k_plus: int
    k_minus: int
    correct: int
    eps_lower_bound: float
    auroc: float
    tpr_at_fpr_001: float
    delta: float
    beta: float
    k_grid: tuple[int, ...]
    included: int  # canaries that were in the run

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def audit(scores: Sequence[float], included: Sequence[bool], delta: float, beta: float = 0.05,
          ks: Sequence[int] | None = None) -> AuditResult:
    """Best eps lower bound over the guess counts ``ks`` (default ``k_grid(m)``), each tested at beta/len(ks).

    ``scores``: higher = more likely included; ``included``: the secret membership S, used only to
    count correct guesses after the guesses are fixed.
    """
    s = np.asarray(scores, dtype=float)
    y = np.asarray(included, dtype=bool)
    m = len(s)
    if m < 2 or len(y) != m:
        raise ValueError(f"need at least 2 canaries and one membership bit each (got {m} scores, {len(y)} bits)")
    if not np.all(np.isfinite(s)):
        raise ValueError("canary scores must be finite")
    grid = tuple(ks) if ks is not None else tuple(k_grid(m))
    level = beta / len(grid)
    best = (-1.0, grid[0], 0)
    for k in grid:
        v = count_correct(s, y, k)
        bound = eps_lower_bound(m, k, v, delta, level)
        if bound > best[0]:
            best = (bound, k, v)
    bound, k, v = best
    both = 0 < y.sum() < m
    return AuditResult(m=m, k=k, k_plus=(k + 1) // 2, k_minus=k // 2, correct=v, eps_lower_bound=bound,
                       auroc=auroc(s, y) if both else float("nan"),
                       tpr_at_fpr_001=tpr_at_fpr(s, y, 0.01) if both else float("nan"),
                       delta=delta, beta=beta, k_grid=grid, included=int(y.sum()))
