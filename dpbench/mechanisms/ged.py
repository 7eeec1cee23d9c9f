"""GED: DP-SGD with gradient encoding and denoising (Nasr, Shokri & Houmansadr 2020, arXiv 2007.11524).

One step (``specs/ged.md`` §1, as the official code does it, with one example per encoded vector):

1. Poisson sample at rate q; per-sample gradients (Opacus), flattened to one d-vector each;
2. encode each (``GEDEncoder``): keep the top-k coordinates by magnitude, clip them to l2 norm C,
   scale by kappa, pick the codebook row most cosine-similar to their magnitudes, and clamp them
   rank by rank under that row; the result has at most k non-zeros and norm at most Q;
3. sum, add i.i.d. noise of scale ``s Q`` (Student-t with nu = 9 by default; Gaussian, Laplace) on
   **all d coordinates**, divide by the expected batch size B;
4. denoise (post-processing, ``KSDenoiser``): the two-sample Kolmogorov-Smirnov distance between the
   noisy update's coordinates and a fresh public noise sample, times lambda, skips the step below
   theta and otherwise multiplies the update by it (capped); then the SGD step.

``noise_multiplier`` is s, the noise scale in units of the sensitivity Q. The codebook is
data-independent (``dpbench.privacy.ged``). **The privacy accounting is our reconstruction**
(specs/ged.md §2: Zhu-Wang subsampled RDP over the codebook rows), not the paper's theorem, which
was not available; the forward-only exact curve and the Gaussian-equivalent z_eq are reported beside it.

Departures from the official code, all on the side of a cleaner guarantee: Poisson sampling instead
of shuffled fixed-size batches, micro-batch size 1 (the CIFAR setting of 2 breaks the sensitivity
set), noise drawn on the device from the run's noise generator, and the diagnostics that the code
computes against the clean gradient exist only with ``--set debug=true`` and never feed training.
With momentum the base optimizer's buffer is used as is (the code's delta-gated buffer is not
reproduced); the recipes use none.
"""

from __future__ import annotations

import functools
import math
import secrets
from typing import Any, Callable, Iterable

import numpy as np
import torch

from dpbench.errors import BadInput
from dpbench.mechanisms import MECHANISMS
from dpbench.mechanisms.base import DPBenchOptimizer, Mechanism, Param, TuneRange, PerSample, TrainContext
from dpbench.privacy.ged import CodebookSpec, GEDAccountant, load_codebook, make_family
from dpbench.privacy.rdp import INTEGER_ORDERS
from dpbench.recipes import Recipe


def float32_below(rows: np.ndarray) -> torch.Tensor:
    """``rows`` as float32, each entry rounded toward 0, so the clamp never exceeds what was accounted."""
    t = torch.from_numpy(np.asarray(rows, dtype=np.float64)).float()
    over = t.double() > torch.from_numpy(np.asarray(rows, dtype=np.float64))
    t[over] = torch.nextafter(t[over], torch.zeros_like(t[over]))
    return t


#: Entries of one block of ``top_k_magnitudes``' 64-bit keys (32 MiB): bounds its extra memory for any model
#: (and measured slightly faster than larger blocks).
TOP_K_BLOCK = 1 << 22

#: Candidates per row that ``top_k_magnitudes`` aims to keep before its sort, as a multiple of k: the
#: threshold comes from a sample of the columns, and 1.25 k is about eight standard deviations above k
#: at k = 14,000 (a row that falls short is keyed whole, so the margin costs speed only).
CANDIDATE_MARGIN = 1.25
#: Every how many columns, on average, one enters the sample that sets the threshold.
THRESHOLD_SAMPLE_EVERY = 16
#: ``top_k_magnitudes`` filters candidates only where d is at least this many times k (below it the
#: filter keeps most of the row and costs more than it saves).
FILTER_FROM = 4

ALL_BITS = np.uint64(0xFFFFFFFF)


@functools.lru_cache(maxsize=8)
def threshold_sample_columns(d: int) -> np.ndarray:
    """A fixed, data-independent sample of about ``d / THRESHOLD_SAMPLE_EVERY`` columns of ``range(d)``.

    Drawn at random rather than strided, so a layout with a period (a linear layer's gradient repeats its
    input's per class) cannot bias the threshold. It changes only which entries are sorted, never the result.
    """
    size = max(1, d // THRESHOLD_SAMPLE_EVERY)
    return np.sort(np.random.default_rng(0).choice(d, size=size, replace=False))


def _smallest_keys_columns(keys: np.ndarray, k: int) -> np.ndarray:
    """Columns held in the low 32 bits of each row's ``k`` smallest keys, in key order."""
    if k < keys.shape[1]:
        keys = np.partition(keys, k - 1, axis=1)[:, :k]
    keys.sort(axis=1)
    return (keys & ALL_BITS).astype(np.int64)


def _keys(magnitude_bits: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """Each entry's 64-bit key: the complement of its magnitude's bits above its column (smaller = kept first)."""
    keys = magnitude_bits.astype(np.uint64)
    np.subtract(ALL_BITS, keys, out=keys)
    keys <<= np.uint64(32)
    keys |= columns.astype(np.uint64, copy=False)
    return keys


def _candidates(magnitude_bits: np.ndarray, threshold: np.ndarray) -> tuple[np.ndarray, ...]:
    """(flat index, row, column, count per row) of the entries at or above their row's threshold, row by row."""
    flat = np.flatnonzero(magnitude_bits >= threshold[:, None])
    rows, columns = np.divmod(flat, magnitude_bits.shape[1])
    return flat, rows, columns, np.bincount(rows, minlength=magnitude_bits.shape[0])


def _top_k_columns(magnitude_bits: np.ndarray, k: int) -> np.ndarray:
    """The columns of each row's k largest magnitudes (by their bits), largest first, ties by column.

    Where d >= FILTER_FROM * k only candidates are keyed and sorted, row by row: in a row whose sample of
    columns has enough non-zeros, the entries at or above the magnitude that about ``CANDIDATE_MARGIN * k``
    entries reach (estimated from the sample); in a sparser row (an embedding's gradient, a saturated
    example's zero or one-class gradient), its non-zeros. Every entry left out is smaller than every
    candidate, so while a row keeps at least k candidates its k smallest keys are the whole row's; a sparse
    row with fewer non-zeros than k is completed by its zeros in column order (their keys' order); a row
    whose sampled threshold kept fewer than k (the sample missed) is keyed whole. The sparse rows are known
    from the sample's non-zeros, before the threshold's partition (slow on many equal values).
    """
    n, d = magnitude_bits.shape
    if d < FILTER_FROM * k:
        return _smallest_keys_columns(_keys(magnitude_bits, np.arange(d, dtype=np.uint64)), k)
    sample = np.take(magnitude_bits, threshold_sample_columns(d), axis=1)
    rank = min(sample.shape[1], math.ceil(CANDIDATE_MARGIN * k * sample.shape[1] / d))
    dense = np.count_nonzero(sample, axis=1) >= rank  # so the sampled threshold is above 0
    threshold = np.ones(n, dtype=magnitude_bits.dtype)  # a sparse row's candidates: its non-zeros
    if dense.any():
        threshold[dense] = np.partition(sample[dense], sample.shape[1] - rank, axis=1)[:, sample.shape[1] - rank]
    flat, rows, columns, counts = _candidates(magnitude_bits, threshold)
    starts = np.cumsum(counts) - counts
    keys = np.full((n, max(int(counts.max()), k)), np.iinfo(np.uint64).max, dtype=np.uint64)  # padding last
    keys[rows, np.arange(flat.size) - starts[rows]] = _keys(magnitude_bits.reshape(-1)[flat], columns)
    for row in np.flatnonzero(~dense & (counts < k)):
        zeros = np.flatnonzero(magnitude_bits[row] == 0)[:k - counts[row]]
        keys[row, counts[row]:k] = _keys(np.zeros(zeros.size, dtype=magnitude_bits.dtype), zeros)
    top = _smallest_keys_columns(keys, k)
    missed = dense & (counts < k)
    if missed.any():
        top[missed] = _smallest_keys_columns(_keys(magnitude_bits[missed], np.arange(d, dtype=np.uint64)), k)
    return top


def top_k_magnitudes(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest ``|x|`` of each row of ``x`` (b x d), largest first, and their columns.

    Equal to ``x.abs().topk(k, dim=1, sorted=True)`` except that tied magnitudes are ordered by column
    (topk leaves their order open). On the CPU a sorted topk with k in the thousands costs about as much
    as the rest of a GED step; here each entry becomes one 64-bit key, the complement of its magnitude's
    bits (non-negative floats order like their bits) above its column, and numpy's vectorised partition
    and sort of those keys gives the columns, whose magnitudes are gathered (results/perf/ged_topk_cpu.md).
    A magnitude's bits are the entry's with the sign bit cleared (exactly what ``abs`` gives), so no b x d
    buffer of magnitudes is made; where d is large next to k only each row's candidates are keyed.
    """
    b, d = x.shape
    if x.device.type != "cpu" or x.dtype != torch.float32 or k == 0 or d >= 1 << 32:
        return x.abs().topk(k, dim=1, sorted=True)
    values = x.detach().contiguous()
    bits = values.numpy().view(np.uint32)
    idx = np.empty((b, k), dtype=np.int64)
    rows = max(1, TOP_K_BLOCK // d)
    for start in range(0, b, rows):
        idx[start:start + rows] = _top_k_columns(bits[start:start + rows] & np.uint32(0x7FFFFFFF), k)
    columns_kept = torch.from_numpy(idx)
    return values.gather(1, columns_kept).abs(), columns_kept


def laid_out_in(pieces: list[torch.Tensor], flat: torch.Tensor) -> bool:
    """Whether ``pieces`` (each ``n x d_j``) are the consecutive column blocks of ``flat`` (``n x sum d_j``), so
    that there is nothing to copy (also when n is 0). Strides of dimensions of size 1 are not compared."""
    if sum(piece.shape[1] for piece in pieces) != flat.shape[1]:
        return False
    if flat.shape[0] == 0:
        return True
    offset = 0
    for piece in pieces:
        rows, columns = piece.shape
        if columns and (piece.data_ptr() != flat.data_ptr() + offset * flat.element_size()
                        or (rows > 1 and piece.stride(0) != flat.stride(0)) or (columns > 1 and piece.stride(1) != 1)
                        or piece.dtype != flat.dtype or piece.device != flat.device):
            return False
        offset += columns
    return True


class GEDEncoder:
    """Per-example encoding of flattened gradients, vectorised over the batch (spec §1.2)."""

    def __init__(self, codebook: torch.Tensor, k: int, clip: float, kappa: float) -> None:
        self.codebook = codebook  # rows x k', sorted decreasing, norm <= Q, float32 rounded down
        self.k = k
        self.clip = clip
        self.kappa = kappa

    def encode(self, grads: torch.Tensor, overwrite: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(encoded ``b x d``, chosen row per example) for per-example gradients ``b x d``.

        ``overwrite``: the encoding is written into ``grads`` itself (a buffer the caller no longer needs),
        which saves a fresh ``b x d`` buffer.
        """
        b, d = grads.shape
        k = min(self.k, d, self.codebook.shape[1])
        if b == 0:
            return torch.zeros_like(grads), torch.zeros(0, dtype=torch.long, device=grads.device)
        mags, idx = top_k_magnitudes(grads, k)  # rank order, largest first
        signs = torch.sign(grads.gather(1, idx))
        out = grads.detach().zero_() if overwrite else torch.zeros_like(grads)
        norms = mags.norm(dim=1, keepdim=True)
        h = mags * (self.clip / norms.clamp(min=self.clip)) * self.kappa
        rows = self.codebook[:, :k].to(h)
        # cos(t_m, |h|); the row norms are all Q (or equal after truncation), so the argmax over m of
        # <t_m, |h|> / ||t_m|| is the cosine's; a zero gradient picks row 0 and encodes to 0
        row_norms = rows.norm(dim=1).clamp(min=1e-30)
        chosen = ((h @ rows.T) / row_norms[None, :]).argmax(dim=1)
        clamped = torch.minimum(h, rows[chosen])
        out.scatter_(1, idx, signs * clamped)
        return out, chosen

    def __call__(self, grads: torch.Tensor, overwrite: bool = False) -> torch.Tensor:
        return self.encode(grads, overwrite)[0]


def ks_statistic(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic ``sup_x |F_a(x) - F_b(x)|`` of two 1-D samples."""
    a_sorted, b_sorted = a.reshape(-1).sort().values, b.reshape(-1).sort().values
    points = torch.cat([a_sorted, b_sorted])
    cdf_a = torch.searchsorted(a_sorted, points, right=True).double() / a_sorted.numel()
    cdf_b = torch.searchsorted(b_sorted, points, right=True).double() / b_sorted.numel()
    return float((cdf_a - cdf_b).abs().max())


class KSDenoiser:
    """GED-code's denoising (spec §1.4): a global step multiplier from the KS distance to pure noise.

    It is given only the released (noisy, averaged) update and a fresh sample of the public noise
    law, so it is post-processing and costs no privacy.
    """

    name = "ks"

    def __init__(self, lam: float = 500.0, theta: float = 0.7, cap: float = 5.0) -> None:
        self.lam, self.theta, self.cap = lam, theta, cap

    def __call__(self, noisy: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
        """(multiplier of the update, delta_hat = lambda * D_KS); the multiplier is 0 for a skipped step."""
        delta_hat = self.lam * ks_statistic(noisy, reference)
        return (0.0 if delta_hat < self.theta else min(delta_hat, self.cap)), delta_hat


class NoDenoiser:
    """Leaves the update as it is (plain noisy SGD on the encoded gradients)."""

    name = "none"

    def __call__(self, noisy: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
        return 1.0, float("nan")


#: Post-processing denoisers by name: each maps (noisy update, fresh public noise) to a multiplier.
DENOISERS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "ks": lambda p: KSDenoiser(p["ks_lambda"], p["ks_theta"], p["ks_cap"]),
    "none": lambda p: NoDenoiser(),
}

#: The MNIST.py learning-rate schedule as multiples of --lr (0.2): epochs 0-10, 11-20, 21-40, 41-60, >60.
MNIST_LR_FACTORS = ((10, 1.0), (20, 0.75), (40, 0.5), (60, 0.25), (math.inf, 0.05))


def lr_factor(schedule: str, epoch: int) -> float:
    """Multiplier of the base learning rate in (0-based) ``epoch``."""
    if schedule == "constant":
        return 1.0
    for last, factor in MNIST_LR_FACTORS:
        if epoch <= last:
            return factor
    return MNIST_LR_FACTORS[-1][1]


@MECHANISMS.register("ged")
class GED(Mechanism):
    """GED (Nasr et al. 2020): top-k codebook encoding, Student-t noise, KS denoising; accounting reconstructed."""

    name = "ged"
    summary = "GED (Nasr et al. 2020): top-k + codebook encoding, Student-t noise on all coordinates, KS denoising"
    accountant = "ged-rdp"
    #: its Zhu-Wang bound has a floor that grows with q: at batches of 4096 or 8192 it cannot reach eps = 1
    tune_constraints = {"batch_size": lambda b: b <= 1024}
    rdp_only_reason = ("its release adds noise of a chosen family to encoded gradients under a codebook bound, "
                       "not a sampled Gaussian; only our RDP reconstruction (Zhu-Wang subsampling) exists")
    caveat = ("GED accountant (our reconstruction, Zhu-Wang subsampled RDP over codebook rows; the paper's "
              "theorem not checked); the forward-only exact eps and the Gaussian-equivalent z_eq are beside it")
    per_sample = PerSample.GRADIENTS  # the top-k encoding needs each whole gradient
    #: Rebuilt by ``setup`` (or from the parameters): never copied into a checkpoint.
    transient = ("encoder", "denoiser", "family", "_accountant", "_clean_sum", "_rows")
    recipes = {
        # Official code srxzr/DPtorch MNIST.py and README: batch 256, 100 epochs, lr 0.2 with its per-epoch
        # schedule (lr_schedule=mnist), C 1, no momentum; the encoding, noise and denoising parameters are
        # the mechanism's defaults (specs/ged.md §3.1). Model: cnn_tanh, since the zoo lacks the authors'
        # 24k-parameter ReLU CNN. FMNIST reuses the MNIST row (not tuned).
        "mnist": Recipe("cnn_tanh", 256, 100, 0.2, "sgd", 0.0, 1.0,
                      "Nasr et al. 2020 official MNIST.py/README (B 256, 100 epochs, lr 0.2 scheduled, C 1)"),
        "fmnist": Recipe("cnn_tanh", 256, 100, 0.2, "sgd", 0.0, 1.0,
                      "Nasr et al. 2020 MNIST settings reused for Fashion-MNIST (not tuned)"),
        "synthetic": Recipe("cnn_tanh", 64, 4, 0.2, "sgd", 0.0, 1.0,
                      "dpbench test recipe, no momentum"),
    }
    param_specs = (
        Param("noise", str, "student_t", "noise family on every coordinate: student_t, gaussian or laplace"),
        Param("nu", float, 9.0, "Student-t degrees of freedom"),
        Param("k", int, 14_000, "coordinates kept per example (top-k by magnitude); the codebook row length"),
        Param("kappa", float, 4.0, "quant multiplier: the clipped top-k part is scaled by kappa before clamping",
              tune=TuneRange(1.0, 16.0)),
        Param("quant_clip", float, 1.0, "Q: l2 norm of every codebook row, the sensitivity"),
        Param("codebook_rows", int, 64, "M: codebook rows (the official recipe draws 1000 near-identical ones)"),
        Param("codebook_seed", int, 0, "seed of the data-independent codebook (public)"),
        Param("denoiser", str, "ks", "post-processing denoiser: ks (GED-code) or none"),
        Param("ks_lambda", float, 500.0, "lambda: delta_hat = lambda * KS distance"),
        Param("ks_theta", float, 0.7, "theta: skip the update when delta_hat < theta"),
        Param("ks_cap", float, 5.0, "largest update multiplier"),
        Param("lr_schedule", str, "mnist", "mnist (MNIST.py's per-epoch factors 1/.75/.5/.25/.05 of --lr) or constant"),
        Param("debug", bool, False, "record diagnostics against the clean gradient (never used by training)"),
    )

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        p = self.params
        self.family = make_family(p["noise"], p["nu"])
        if p["denoiser"] not in DENOISERS:
            raise BadInput(f"--set denoiser={p['denoiser']!r}: expected one of {', '.join(DENOISERS)}")
        if p["lr_schedule"] not in ("mnist", "constant"):
            raise BadInput(f"--set lr_schedule={p['lr_schedule']!r}: expected mnist or constant")
        if not (p["kappa"] > 0 and math.isfinite(p["kappa"])):
            raise BadInput(f"--set kappa={p['kappa']}: must be a positive number")
        for name in ("ks_lambda", "ks_theta", "ks_cap"):
            if not (p[name] >= 0 and math.isfinite(p[name])):
                raise BadInput(f"--set {name}={p[name]}: must be a finite number >= 0")
        self.codebook_spec = CodebookSpec(rows=p["codebook_rows"], k=p["k"], quant_clip=p["quant_clip"],
                                          seed=p["codebook_seed"])
        self._accountant: GEDAccountant | None = None
        self._base_lrs: list[float] = []
        self._steps_per_epoch = 1
        self.encoder: GEDEncoder | None = None
        self.denoiser = DENOISERS[p["denoiser"]](p)
        self.noise_multiplier = 1.0
        self._reference_generator: torch.Generator | None = None
        self._own_noise_generator: torch.Generator | None = None
        #: (multiplier, delta_hat) of every step: functions of released values only.
        self.denoise_history: list[tuple[float, float]] = []
        #: debug mode only: statistics against the clean encoded sum; never used by training.
        self.diagnostics: list[dict[str, float]] = []
        self._clean_sum: torch.Tensor | None = None
        #: The flattened per-sample gradients' buffer, kept from chunk to chunk (see ``per_sample_buffer``).
        self._rows: torch.Tensor | None = None

    # -- accounting ---------------------------------------------------------------------------------
    @property
    def codebook(self) -> np.ndarray:
        return load_codebook(self.codebook_spec)

    @property
    def ged_accountant(self) -> GEDAccountant:
        if self._accountant is None:
            self._accountant = GEDAccountant(self.family, self.codebook, INTEGER_ORDERS)
        return self._accountant

    def rdp(self, noise_multiplier: float, q: float, steps: int) -> tuple[Iterable[float], np.ndarray]:
        return INTEGER_ORDERS, self.ged_accountant.rdp(self.sample_rate(q), noise_multiplier, steps)

    def privacy_extras(self, noise_multiplier: float, q: float, steps: int, delta: float) -> dict[str, Any]:
        """The values the spec asks to show beside ``eps``: forward-only exact eps, z_eq and its eps."""
        out = self.ged_accountant.epsilon(self.sample_rate(q), noise_multiplier, steps, delta)
        out.pop("eps")
        out.pop("eps_classic")
        out["noise_family"] = self.family.describe()
        out["accounting_note"] = self.caveat
        return out

    # -- transform, noise and update ------------------------------------------------------------------
    def setup(self, ctx: TrainContext) -> None:
        if self.params["debug"] and ctx.cfg.secure:
            raise BadInput("--set debug=true is not allowed with --secure (it keeps statistics of the clean gradient)")
        self._reference_generator = ctx.make_generator("ged-denoise-reference")
        self._base_lrs = [float(g["lr"]) for g in ctx.optimizer.param_groups]
        self._steps_per_epoch = max(1, round(1.0 / ctx.sample_rate))
        self.noise_multiplier = ctx.noise_multiplier

    def _encoder(self, clip: float, device: torch.device) -> GEDEncoder:
        if self.encoder is None or self.encoder.clip != clip:
            self.encoder = GEDEncoder(float32_below(self.codebook).to(device), self.params["k"], clip,
                                      self.params["kappa"])
        return self.encoder

    @staticmethod
    def _split(flat: torch.Tensor, shapes: list[torch.Size]) -> list[torch.Tensor]:
        return [piece.view(shape).clone() for piece, shape in zip(flat.split([math.prod(s) for s in shapes]), shapes)]

    def per_sample_buffer(self, rows: int, width: int, like: torch.Tensor) -> torch.Tensor:
        """The first ``rows`` rows of a buffer kept from chunk to chunk (replaced only by a wider or longer one).

        Fresh memory of a b x d size costs page faults on every touch (about 0.1 s per 160 MB on the CPU, as
        much as computing the per-sample gradients into memory already mapped); the encoding leaves nothing
        in it that a later chunk reads.
        """
        buffer = self._rows
        if buffer is None or buffer.shape[0] < rows or buffer.shape[1] != width or buffer.dtype != like.dtype \
                or buffer.device != like.device:
            buffer = self._rows = torch.empty((rows, width), dtype=like.dtype, device=like.device)
        return buffer[:rows]

    def transform(self, grads: list[torch.Tensor], clip: float) -> list[torch.Tensor]:
        """Encode each example's flattened gradient (spec §1.2) and sum: one example per encoded vector."""
        shapes = [g.shape[1:] for g in grads]
        # one row per example; reshape(len(g), -1) would be ambiguous for an empty batch
        pieces = [g.reshape(len(g), math.prod(shape)) for g, shape in zip(grads, shapes)]
        flat = self.per_sample_buffer(len(grads[0]), sum(p.shape[1] for p in pieces), grads[0])
        if not laid_out_in(pieces, flat):  # the fast path wrote them there already
            torch.cat(pieces, dim=1, out=flat)
        return self._split(self._encoder(clip, flat.device)(flat, overwrite=True).sum(dim=0), shapes)

    def _noise_generator(self, release: DPBenchOptimizer) -> torch.Generator:
        if release.generator is not None:
            return release.generator
        if self._own_noise_generator is None:  # Opacus' default is the global RNG; ours is always a dedicated one
            self._own_noise_generator = torch.Generator(device=release.params[0].device).manual_seed(secrets.randbits(63))
        return self._own_noise_generator

    def noise(self, summed: list[torch.Tensor], release: DPBenchOptimizer) -> list[torch.Tensor]:
        """The family's noise of scale s Q on ALL d coordinates, not only the encoded ones."""
        clean = torch.cat([t.reshape(-1) for t in summed])
        if self.params["debug"]:
            self._clean_sum = clean.detach().clone()
        noise = self.family.sample((clean.numel(),), release.noise_multiplier * self.params["quant_clip"],
                                   self._noise_generator(release), dtype=clean.dtype)
        return self._split(clean + noise, [t.shape for t in summed])

    def update(self, released: list[torch.Tensor], release: DPBenchOptimizer) -> None:
        """Denoise (post-processing): scale the mean noisy update by the KS multiplier, then the base step."""
        grads = release.mean_of(released)  # / B: the released average
        noisy = torch.cat([g.reshape(-1) for g in grads])
        generator = self._reference_generator or self._noise_generator(release)
        reference = self.family.sample((noisy.numel(),), release.noise_multiplier * self.params["quant_clip"],
                                       generator, dtype=noisy.dtype) / release.expected_batch_size
        multiplier, delta_hat = self.denoiser(noisy.detach(), reference)
        self.denoise_history.append((multiplier, delta_hat))
        for g in grads:
            g.mul_(multiplier)
        if self.params["debug"] and self._clean_sum is not None:
            clean = self._clean_sum / release.expected_batch_size
            cos = float(torch.nn.functional.cosine_similarity(clean, noisy, dim=0))
            self.diagnostics.append({"cos_clean_noisy": cos, "clean_norm": float(clean.norm()),
                                     "multiplier": multiplier, "delta_hat": delta_hat})
            self._clean_sum = None
        release.original_optimizer.step()

    def begin_step(self, ctx: TrainContext, step: int) -> None:
        factor = lr_factor(self.params["lr_schedule"], step // self._steps_per_epoch)
        for group, base in zip(ctx.optimizer.param_groups, self._base_lrs):
            group["lr"] = base * factor

    def sensitivity(self, clip: float) -> float:
        """Q: every encoded vector lies under a codebook row of norm at most Q, whatever C is."""
        return float(self.params["quant_clip"])

    def noise_std(self, noise_multiplier: float, clip: float) -> float:
        return noise_multiplier * self.sensitivity(clip) * self.family.std()

    def canary_contribution(self, direction: list[torch.Tensor], clip: float) -> list[torch.Tensor]:
        """A worst case of the accountant: the worst codebook row itself, by rank, on the top-k of ``direction``.

        It lies in the sensitivity set (k non-zeros, magnitudes ``t_m`` by rank, norm Q); ``clip`` plays
        no part, because the encoded sensitivity is Q whatever C is.
        """
        flat = torch.cat([d.reshape(-1) for d in direction])
        k = min(self.params["k"], flat.numel())
        scale = self.noise_multiplier
        per_row = self.ged_accountant.row_log_moments(scale if scale > 0 else 1.0)
        worst = int(np.argmax(per_row.sum(axis=1)))  # rows are near-identical; any is a valid worst case
        row = float32_below(self.codebook[worst, :k]).to(flat)
        top = flat.abs().topk(k).indices
        signs = torch.where(flat[top] >= 0, 1.0, -1.0).to(flat.dtype)
        out = torch.zeros_like(flat)
        out[top] = signs * row
        return [piece.view_as(d) for piece, d in zip(out.split([d.numel() for d in direction]), direction)]
