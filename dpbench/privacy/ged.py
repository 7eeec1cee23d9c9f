"""Accountant of GED (Nasr, Shokri & Houmansadr 2020, arXiv 2007.11524): our reconstruction.

**The paper's privacy theorem was not available; this is the reconstruction of ``specs/ged.md`` §2,
not the authors' accountant.** One step releases ``sum_i e_i + xi`` where every encoded vector ``e_i``
lies in the sensitivity set (at most k non-zeros, sorted magnitudes under a codebook row ``t_m`` by
rank) and ``xi`` is i.i.d. noise from a symmetric location family on all d coordinates. For a family
whose per-coordinate divergence grows with ``|shift|`` (checked numerically for each table built
here), the differing record's worst case puts ``t_m`` itself on k coordinates, so with

    M_l(a) = integral of phi(x - a)^l phi(x)^(1 - l) dx,     L_l(m) = sum_r log M_l(t_{m,r} / s),

the unsampled mechanism has ``(l - 1) RDP_l = max_m L_l(m)``. Poisson subsampling at rate q:

* reported (``eps``): Zhu & Wang, "Poisson Subsampled Renyi Differential Privacy", ICML 2019,
  Theorem 9, valid for any base mechanism and both directions of the divergence;
* secondary (``forward``): the exact forward divergence, the binomial expansion of
  ``E_P0[((1 - q) + q P1/P0)^a]``; for Gaussian noise this is the sampled-Gaussian RDP itself
  (Mironov, Talwar & Zhang 2019 show it is the worst direction), so the Gaussian family reports
  the smaller of the two curves.

Curves are defined at integer orders only. ``M_l`` is in closed form for the Gaussian and the
Laplace; for the Student-t it is a quadrature (on ``x = sqrt(nu) tan(theta)``, which maps the heavy
tails to a finite interval), tabulated over the shift and interpolated. Every table measures its own
quadrature and interpolation error and inflates its values by more than that, so the RDP errs upward.

The codebook (``specs/ged.md`` §1.5) is data-independent: rows of sorted absolute draws from an
exponentiated Weibull with the official code's fitted parameters, from a seeded generator, cached
under ``$DPBENCH_CACHE/ged`` with their seed and parameters.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import ClassVar, Sequence

import numpy as np
import torch
from scipy.special import gammaln, logsumexp

from dpbench.storage import atomic_write, cache_dir, cache_remedy, reading_data_file
from dpbench.errors import BadInput
from dpbench.privacy.rdp import INTEGER_ORDERS, eps_classic, eps_opacus, sgm_rdp

# -- the codebook ------------------------------------------------------------------------------------

#: Bumped whenever the generation recipe changes, so stale cache files are never reused.
CODEBOOK_VERSION = 1
#: The same for the Student-t moment tables.
TABLE_VERSION = 1


@dataclass(frozen=True)
class CodebookSpec:
    """Everything a codebook is a function of (its cache key)."""

    rows: int = 64
    k: int = 14_000
    quant_clip: float = 1.0
    seed: int = 0
    # scipy.stats.exponweib(a, c, loc, scale): the fit in the official code's commented-out generator
    a: float = 1.5064
    c: float = 0.7476
    loc: float = 0.007482
    scale: float = 0.003689
    draws: int = 200_000
    kept: int = 50_000
    version: int = CODEBOOK_VERSION

    def __post_init__(self) -> None:
        if self.rows < 1:
            raise BadInput(f"--set codebook_rows={self.rows}: must be >= 1")
        if not 1 <= self.k <= self.kept <= self.draws:
            raise BadInput(f"--set k={self.k}: must be in [1, {self.kept}] (the codebook's row length)")
        if not (self.quant_clip > 0 and math.isfinite(self.quant_clip)):
            raise BadInput(f"--set quant_clip={self.quant_clip}: must be a positive number")

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def generate_codebook(spec: CodebookSpec) -> np.ndarray:
    """``rows x k`` float64: each row sorted decreasing, truncated to k, then normalised to l2 norm Q."""
    from scipy.stats import exponweib

    rng = np.random.default_rng(spec.seed)
    out = np.empty((spec.rows, spec.k))
    for m in range(spec.rows):
        draws = np.abs(exponweib.rvs(spec.a, spec.c, loc=spec.loc, scale=spec.scale, size=spec.draws,
                                     random_state=rng))
        top = -np.sort(-np.partition(draws, spec.draws - spec.kept)[spec.draws - spec.kept:])
        row = top[: spec.k]  # truncate before normalising (spec §1.5: the §2.5 check assumes this order)
        out[m] = row * (spec.quant_clip / np.linalg.norm(row))
    return out


@lru_cache(maxsize=8)
def load_codebook(spec: CodebookSpec) -> np.ndarray:
    """The codebook of ``spec``, from ``$DPBENCH_CACHE/ged/`` or generated and stored there."""
    folder = cache_dir() / "ged"
    path = folder / f"codebook-{spec.key()}.npz"
    if path.exists():
        with reading_data_file(path, cache_remedy(path)), np.load(path) as f:
            if json.loads(str(f["spec"])) == asdict(spec):
                return f["rows"].astype(np.float64)
    rows = generate_codebook(spec)
    _save_npz(path, rows=rows, spec=json.dumps(asdict(spec), sort_keys=True))
    return rows


# -- noise families ----------------------------------------------------------------------------------

class NoiseFamily:
    """A symmetric location-scale family; everything below is for the standard member (scale 1)."""

    name: ClassVar[str] = ""

    def sample(self, shape: Sequence[int], scale: float, generator: torch.Generator,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """i.i.d. draws at ``scale`` on ``generator``'s device, from that generator only."""
        raise NotImplementedError

    def log_pdf(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def fisher_information(self) -> float:
        """Fisher information of the location parameter at scale 1."""
        raise NotImplementedError

    def std(self) -> float:
        """Standard deviation at scale 1 (inf where the variance is not finite)."""
        raise NotImplementedError

    def log_moments(self, shifts: np.ndarray, max_order: int) -> np.ndarray:
        """``log M_l(a)`` for l = 0..max_order (rows) and each standardised shift ``a >= 0`` (columns).

        Guaranteed not below the true value (up to float rounding of a closed form).
        """
        raise NotImplementedError

    def row_log_moments(self, shifts: np.ndarray, max_order: int) -> np.ndarray:
        """``sum_r log M_l(a_{m,r})`` for each row m of ``shifts`` (rows x (max_order + 1))."""
        lm = self.log_moments(shifts.reshape(-1), max_order)
        return lm.reshape(max_order + 1, *shifts.shape).sum(axis=2).T

    def z_eq(self) -> float:
        """Gaussian-equivalent noise multiplier at scale 1 (spec §2.4): ``1/sqrt(I)``."""
        return 1.0 / math.sqrt(self.fisher_information())

    def describe(self) -> str:
        return self.name


class Gaussian(NoiseFamily):
    name = "gaussian"

    def sample(self, shape, scale, generator, dtype=torch.float32):
        return torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=dtype) * scale

    def log_pdf(self, x):
        return -0.5 * np.square(x) - 0.5 * math.log(2 * math.pi)

    def fisher_information(self):
        return 1.0

    def std(self):
        return 1.0

    def log_moments(self, shifts, max_order):
        ls = np.arange(max_order + 1, dtype=float)[:, None]
        return ls * (ls - 1) / 2 * np.square(np.asarray(shifts, dtype=float))[None, :]


class Laplace(NoiseFamily):
    name = "laplace"

    def sample(self, shape, scale, generator, dtype=torch.float32):
        def expo() -> torch.Tensor:
            return torch.empty(tuple(shape), device=generator.device, dtype=dtype).exponential_(generator=generator)
        return (expo() - expo()) * scale

    def log_pdf(self, x):
        return -np.abs(x) - math.log(2.0)

    def fisher_information(self):
        return 1.0

    def std(self):
        return math.sqrt(2.0)  # the difference of two unit exponentials

    def log_moments(self, shifts, max_order):
        # M_l(a) = l/(2l-1) e^{(l-1)a} + (l-1)/(2l-1) e^{-la}, l >= 1 (direct integration of e^{-l|x-a|+(l-1)|x|}/2)
        a = np.asarray(shifts, dtype=float)[None, :]
        ls = np.arange(max_order + 1, dtype=float)[:, None]
        out = np.zeros((max_order + 1, a.shape[1]))
        hi = ls[2:]
        out[2:] = np.logaddexp(np.log(hi / (2 * hi - 1)) + (hi - 1) * a, np.log((hi - 1) / (2 * hi - 1)) - hi * a)
        return np.maximum(out, 0.0)  # Renyi divergences are >= 0; rounding below 0 is rounding


@dataclass
class _Table:
    grid: np.ndarray  # shifts, increasing, grid[0] = 0
    ratio: np.ndarray  # (max_order + 1) x len(grid): log M_l(a) / a^2 (the a -> 0 limit at a = 0)
    inflate: np.ndarray  # (max_order + 1) x intervals: multiply interpolated values by this (>= 1)
    interp_err: np.ndarray  # (max_order + 1) x intervals: measured relative error at each midpoint
    quad_err: np.ndarray  # per order: largest relative change from N to 2N quadrature points


class StudentT(NoiseFamily):
    """Student-t with ``nu`` degrees of freedom: bounded per-coordinate privacy loss, finite M_l."""

    name = "student_t"
    #: Shifts beyond this (in units of the scale) get an infinite RDP: never a too-small one.
    MAX_SHIFT: ClassVar[float] = 20.0
    #: Quadrature points on theta; the table is built with this and twice this, and compared.
    QUAD_POINTS: ClassVar[int] = 1000

    def __init__(self, nu: float = 9.0) -> None:
        if not (nu > 0 and math.isfinite(nu)):
            raise BadInput(f"--set nu={nu}: must be a positive number")
        self.nu = float(nu)

    def describe(self):
        return f"student_t(nu={self.nu:g})"

    def sample(self, shape, scale, generator, dtype=torch.float32):
        z = torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=torch.float64)
        chi2 = 2.0 * _standard_gamma(self.nu / 2, tuple(shape), generator)
        return (z / torch.sqrt(chi2 / self.nu) * scale).to(dtype)

    def log_pdf(self, x):
        nu = self.nu
        return (gammaln((nu + 1) / 2) - gammaln(nu / 2) - 0.5 * math.log(nu * math.pi)
                - (nu + 1) / 2 * np.log1p(np.square(x) / nu))

    def fisher_information(self):
        return (self.nu + 1) / (self.nu + 3)

    def std(self):
        return math.sqrt(self.nu / (self.nu - 2)) if self.nu > 2 else math.inf

    def _quadrature(self, shifts: np.ndarray, max_order: int, points: int) -> np.ndarray:
        """``log M_l(a)``, l = 0..max_order, by the midpoint rule on theta with ``x = sqrt(nu) tan(theta)``.

        ``phi(x) dx`` is proportional to ``cos(theta)^(nu - 1) d theta``, a smooth integrand on a finite
        interval; the log privacy loss ``log phi(x - a) - log phi(x)`` is bounded, so every order is finite.
        Dividing by the rule's own integral of phi makes ``M_l(0) = 1`` exactly.
        """
        nu = self.nu
        theta = -np.pi / 2 + (np.arange(points) + 0.5) * (np.pi / points)
        x = math.sqrt(nu) * np.tan(theta)
        log_base = (nu - 1) * np.log(np.cos(theta))
        log_norm = logsumexp(log_base)
        ls = np.arange(max_order + 1, dtype=float)
        out = np.empty((max_order + 1, len(shifts)))
        for j, a in enumerate(shifts):
            loss = -(nu + 1) / 2 * (np.log1p(np.square(x - a) / nu) - np.log1p(np.square(x) / nu))
            out[:, j] = logsumexp(log_base[None, :] + ls[:, None] * loss[None, :], axis=1) - log_norm
        return out

    @staticmethod
    def _grid(top: float) -> np.ndarray:
        # dense near 0, where the codebook's shifts sit at useful noise scales; geometric beyond 1
        fine = np.concatenate([np.linspace(0.0, 0.25, 101), np.linspace(0.25, 1.0, 76)[1:]])
        fine = fine[fine <= top]
        if top <= 1.0:
            return fine
        coarse = np.geomspace(1.0, top, int(math.ceil(math.log(top) / math.log(1.04))) + 1)[1:]
        return np.concatenate([fine, coarse])

    def _table(self, max_order: int) -> _Table:
        return _student_table(self.nu, max_order, self.QUAD_POINTS, self.MAX_SHIFT)

    def row_log_moments(self, shifts, max_order):
        # The interpolant is linear in a on each grid interval j: a^2 g(a) = A_j a^2 + B_j a^3 there, so a
        # row needs only its sums of a^2 and a^3 per interval; the same values as log_moments, far faster.
        if shifts.size and shifts.max() > self.MAX_SHIFT:
            out = np.full((shifts.shape[0], max_order + 1), np.inf)
            out[:, :2] = 0.0
            return out
        table = self._table(max_order)
        grid, n = table.grid, len(table.grid) - 1
        slope = np.diff(table.ratio, axis=1) / np.diff(grid)[None, :]  # B_j
        offset = table.ratio[:, :-1] - slope * grid[None, :-1]  # A_j
        interval = np.clip(np.searchsorted(grid, shifts, side="right") - 1, 0, n - 1)
        out = np.empty((shifts.shape[0], max_order + 1))
        for m in range(shifts.shape[0]):
            s2 = np.bincount(interval[m], weights=np.square(shifts[m]), minlength=n)
            s3 = np.bincount(interval[m], weights=shifts[m] ** 3, minlength=n)
            out[m] = ((offset * s2[None, :] + slope * s3[None, :]) * table.inflate).sum(axis=1)
        out[:, :2] = 0.0
        return out

    def build_table(self, max_order: int) -> _Table:
        grid = self._grid(self.MAX_SHIFT)
        mids = 0.5 * (grid[1:] + grid[:-1])
        both = np.concatenate([grid, mids])
        coarse = self._quadrature(both, max_order, self.QUAD_POINTS)
        fine = self._quadrature(both, max_order, 2 * self.QUAD_POINTS)
        ls = np.arange(max_order + 1, dtype=float)
        limit = ls * (ls - 1) / 2 * self.fisher_information()  # log M_l(a) / a^2 as a -> 0
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio_all = fine / np.square(both)[None, :]
        ratio_all[:, 0] = limit
        n = len(grid)
        ratio, ratio_mid = ratio_all[:, :n], ratio_all[:, n:]
        values = fine[:, :n]
        if np.any(np.diff(values[2:], axis=1) < -1e-12):
            # the worst case |v| = t_m (spec §2.2) needs M_l to grow with the shift
            raise RuntimeError(f"log M_l(a) of {self.describe()} is not increasing in the shift")
        interp_mid = 0.5 * (ratio[:, 1:] + ratio[:, :-1])
        interp_err = np.zeros_like(interp_mid)
        quad_err = np.zeros_like(fine)
        with np.errstate(divide="ignore", invalid="ignore"):
            # orders 0 and 1 are identically 0 (no error); a = 0 is exact by construction
            interp_err[2:] = np.abs(interp_mid[2:] - ratio_mid[2:]) / ratio_mid[2:]
            quad_err[2:, 1:] = np.abs(fine[2:, 1:] - coarse[2:, 1:]) / np.abs(fine[2:, 1:])
        interp_err = np.nan_to_num(interp_err, nan=np.inf)
        quad_err = np.nan_to_num(quad_err, nan=np.inf)
        # Per interval: the error measured at its midpoint and its neighbours' (the error of linear
        # interpolation peaks near the midpoint), doubled; plus the quadrature's worst disagreement
        # between N and 2N points, and a floor for float rounding over 1e5 summed terms.
        local = np.maximum(interp_err, np.maximum(np.pad(interp_err, ((0, 0), (1, 0)))[:, :-1],
                                                  np.pad(interp_err, ((0, 0), (0, 1)))[:, 1:]))
        quad = quad_err.max(axis=1, keepdims=True)
        inflate = 1.0 + 2.0 * (local + quad) + 1e-9
        inflate[:2] = 1.0
        return _Table(grid=grid, ratio=ratio, inflate=inflate, interp_err=interp_err, quad_err=quad[:, 0])

    def log_moments(self, shifts, max_order):
        a = np.asarray(shifts, dtype=float)
        if a.size and a.max() > self.MAX_SHIFT:
            out = np.full((max_order + 1, a.size), np.inf)
            out[:2] = 0.0
            return out
        table = self._table(max_order)
        out = np.zeros((max_order + 1, a.size))
        sq = np.square(a)
        interval = np.clip(np.searchsorted(table.grid, a, side="right") - 1, 0, len(table.grid) - 2)
        for l in range(2, max_order + 1):
            out[l] = np.interp(a, table.grid, table.ratio[l]) * sq * table.inflate[l, interval]
        return out


@lru_cache(maxsize=8)
def _student_table(nu: float, max_order: int, points: int, max_shift: float) -> _Table:
    """The Student-t table, from ``$DPBENCH_CACHE/ged/`` or built (a few seconds) and stored there."""
    key = {"nu": nu, "max_order": max_order, "points": points, "max_shift": max_shift, "version": TABLE_VERSION}
    folder = cache_dir() / "ged"
    path = folder / f"student-t-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]}.npz"
    names = ("grid", "ratio", "inflate", "interp_err", "quad_err")
    if path.exists():
        with np.load(path) as f:
            if json.loads(str(f["key"])) == key:
                return _Table(**{n: f[n] for n in names})
    table = StudentT(nu).build_table(max_order)
    _save_npz(path, key=json.dumps(key, sort_keys=True), **{n: getattr(table, n) for n in names})
    return table


def _save_npz(path, **arrays) -> None:  # noqa: ANN001
    """Write atomically: a concurrent reader sees the old file or the whole new one."""
    atomic_write(path, lambda fh: np.savez(fh, **arrays))


def _standard_gamma(alpha: float, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Gamma(alpha, 1) draws from ``generator`` only (Marsaglia & Tsang 2000), float64 on its device.

    ``torch.distributions`` cannot take a generator; this rejection sampler draws its normals and
    uniforms from the given one, so the noise stream is reproducible and separate from the rest.
    """
    device = generator.device
    boost = alpha < 1.0
    a = alpha + 1.0 if boost else alpha
    d = a - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    n = math.prod(shape)
    out = torch.empty(n, dtype=torch.float64, device=device)
    todo = torch.arange(n, device=device)
    while todo.numel():
        x = torch.randn(todo.numel(), generator=generator, device=device, dtype=torch.float64)
        u = torch.rand(todo.numel(), generator=generator, device=device, dtype=torch.float64)
        v = (1.0 + c * x) ** 3
        ok = (v > 0) & (torch.log(u) < 0.5 * x * x + d - d * v + d * torch.log(v.clamp(min=1e-300)))
        out[todo[ok]] = d * v[ok]
        todo = todo[~ok]
    if boost:
        u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
        out = out * u.pow(1.0 / alpha)
    return out.view(shape)


def make_family(name: str, nu: float = 9.0) -> NoiseFamily:
    """The noise family called ``name`` (``student_t``, ``gaussian`` or ``laplace``)."""
    if name == "student_t":
        return StudentT(nu)
    if name == "gaussian":
        return Gaussian()
    if name == "laplace":
        return Laplace()
    raise BadInput(f"--set noise={name!r}: expected student_t, gaussian or laplace")


# -- the accountant ----------------------------------------------------------------------------------

def _log_binom(n: int, k: np.ndarray) -> np.ndarray:
    return gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1)


@dataclass
class GEDAccountant:
    """RDP of T Poisson-subsampled GED steps at integer orders; ``scale`` is s in units of Q."""

    family: NoiseFamily
    codebook: np.ndarray  # rows x k, each row of norm Q
    orders: Sequence[int] = INTEGER_ORDERS
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.orders = tuple(int(a) for a in self.orders)
        if any(a < 2 for a in self.orders):
            raise ValueError("the GED accountant is defined at integer orders >= 2")
        self.max_order = max(self.orders)
        norms = np.linalg.norm(self.codebook, axis=1)
        self.quant_clip = float(norms.max())
        # shifts in units of Q, so that the noise scale is a multiplier like sigma in DP-SGD
        self._unit_rows = self.codebook / self.quant_clip

    def row_log_moments(self, scale: float) -> np.ndarray:
        """``L_l(m) = sum_r log M_l(t_{m,r}/s)``: rows x (max_order + 1), per codebook row m."""
        key = float(scale)
        if key not in self._cache:
            if len(self._cache) > 256:
                self._cache.clear()
            self._cache[key] = self.family.row_log_moments(self._unit_rows / scale, self.max_order)
        return self._cache[key]

    def unsampled_rdp(self, scale: float) -> np.ndarray:
        """Per-step RDP without subsampling at ``self.orders``: ``max_m L_l(m) / (l - 1)``."""
        big = self.row_log_moments(scale).max(axis=0)
        return np.array([big[a] / (a - 1) for a in self.orders])

    def rdp_zhu_wang(self, q: float, scale: float, steps: int) -> np.ndarray:
        """Zhu & Wang 2019, Theorem 9, times ``steps``: the reported curve."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"sample rate {q} outside [0, 1]")
        if scale <= 0:
            return np.full(len(self.orders), np.inf)
        if q == 0.0:
            return np.zeros(len(self.orders))
        big = self.row_log_moments(scale).max(axis=0)  # (l - 1) eps(l), worst row per order
        if q == 1.0:
            return steps * np.array([big[a] / (a - 1) for a in self.orders])
        lq, l1q = math.log(q), math.log1p(-q)
        out = np.empty(len(self.orders))
        for i, a in enumerate(self.orders):
            terms = [(a - 1) * l1q + math.log1p((a - 1) * q),
                     float(_log_binom(a, np.array(2.0))) + 2 * lq + (a - 2) * l1q + big[2]]
            if a >= 3:
                ls = np.arange(3, a + 1)
                terms.extend(math.log(3.0) + _log_binom(a, ls) + ls * lq + (a - ls) * l1q + big[ls])
            out[i] = logsumexp(terms) / (a - 1)
        return steps * out

    def rdp_forward(self, q: float, scale: float, steps: int) -> np.ndarray:
        """Exact RDP of ``D(mixture || base)`` (one direction only), worst row per order, times ``steps``."""
        if scale <= 0:
            return np.full(len(self.orders), np.inf)
        if q == 0.0:
            return np.zeros(len(self.orders))
        per_row = self.row_log_moments(scale)
        out = np.empty(len(self.orders))
        for i, a in enumerate(self.orders):
            ls = np.arange(a + 1)
            base = _log_binom(a, ls) + ls * math.log(q)
            if q < 1.0:
                base = base + (a - ls) * math.log1p(-q)
            else:
                base = np.where(ls == a, base, -np.inf)
            out[i] = logsumexp(base[None, :] + per_row[:, : a + 1], axis=1).max() / (a - 1)
        return steps * out

    def rdp(self, q: float, scale: float, steps: int) -> np.ndarray:
        """The curve that ``eps`` reports: Zhu-Wang; for Gaussian noise also the exact SGM, whichever is lower."""
        zw = self.rdp_zhu_wang(q, scale, steps)
        if isinstance(self.family, Gaussian):
            return np.minimum(zw, self.rdp_forward(q, scale, steps))
        return zw

    def z_eq(self, scale: float) -> float:
        """Gaussian-equivalent noise multiplier (spec §2.4), in units of the sensitivity Q."""
        return scale * self.family.z_eq()

    def epsilon(self, q: float, scale: float, steps: int, delta: float) -> dict[str, float]:
        """Every eps this accountant knows, both conversions (design.md: ``eps`` is Opacus')."""
        zw = self.rdp(q, scale, steps)
        fw = self.rdp_forward(q, scale, steps)
        z = self.z_eq(scale)
        gauss = sgm_rdp(q, z, steps, self.orders)
        return {
            "eps": eps_opacus(self.orders, zw, delta)[0],
            "eps_classic": eps_classic(self.orders, zw, delta)[0],
            "eps_forward": eps_opacus(self.orders, fw, delta)[0],
            "eps_forward_classic": eps_classic(self.orders, fw, delta)[0],
            "z_eq": z,
            "eps_gaussian_eq": eps_opacus(self.orders, gauss, delta)[0],
            "eps_gaussian_eq_classic": eps_classic(self.orders, gauss, delta)[0],
        }
