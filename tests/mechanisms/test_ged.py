"""GED: the encoder's sensitivity set, noise on every coordinate, the KS denoiser as post-processing, CLI."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from opacus import GradSampleModule
from scipy import stats
from typer.testing import CliRunner

from dpbench.cli import app
from dpbench.errors import BadInput
from dpbench.mechanisms import get_mechanism
from dpbench.mechanisms import ged
from dpbench.mechanisms.ged import GED, GEDEncoder, KSDenoiser, float32_below, ks_statistic, lr_factor, top_k_magnitudes
from dpbench.privacy.ged import CodebookSpec, generate_codebook

K, D = 40, 300


@pytest.fixture(scope="module")
def codebook() -> np.ndarray:
    return generate_codebook(CodebookSpec(rows=6, k=K, seed=2))


def heavy_grads(b: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = 10.0 ** torch.empty(b, 1).uniform_(-4, 2, generator=g)  # norms far below and above C
    return torch.distributions.StudentT(2.0).sample((b, d)) * scale


# -- the encoder ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("b,d,k,block", [(7, 300, 40, 1 << 22), (7, 300, 40, 900), (5, 30, 30, 64), (3, 8, 1, 8),
                                         (0, 10, 4, 64), (4, 10, 0, 64)])
def test_top_k_magnitudes_equal_torch_topk(monkeypatch, b, d, k, block):
    monkeypatch.setattr(ged, "TOP_K_BLOCK", block)  # several blocks, the last one short, where block < b * d
    x = heavy_grads(b, d, 3)
    mags, cols = top_k_magnitudes(x, k)
    expected = x.abs().topk(k, dim=1, sorted=True)
    assert mags.dtype == torch.float32 and cols.dtype == torch.int64
    assert torch.equal(mags, expected.values) and torch.equal(cols, expected.indices)


def test_top_k_magnitudes_order_ties_by_column_and_keep_other_dtypes_on_topk():
    x = torch.tensor([[1.0, -2.0, 0.5, 2.0, -1.0, 0.0], [0.0, -0.0, 3.0, 0.0, 0.0, 0.0]])
    mags, cols = top_k_magnitudes(x, 4)
    assert mags.tolist() == [[2.0, 2.0, 1.0, 1.0], [3.0, 0.0, 0.0, 0.0]]
    assert cols.tolist() == [[1, 3, 0, 4], [2, 0, 1, 3]]
    double = heavy_grads(3, 50, 4).double()
    expected = double.abs().topk(10, dim=1, sorted=True)
    mags, cols = top_k_magnitudes(double, 10)
    assert mags.dtype == torch.float64 and torch.equal(mags, expected.values) and torch.equal(cols, expected.indices)


def linear_layer_grads(b: int, classes: int, features: int, seed: int) -> torch.Tensor:
    """Per-example gradients shaped like a linear layer's: each class row repeats the features (a period)."""
    g = torch.Generator().manual_seed(seed)
    backprops = torch.randn(b, classes, generator=g)
    inputs = torch.randn(b, features, generator=g).abs().half().float()  # float16 features: many ties
    return torch.cat([(backprops[:, :, None] * inputs[:, None, :]).reshape(b, -1), backprops], dim=1)


def sparse_grads(b: int, d: int, nonzero: int, seed: int, zero_row: bool = False) -> torch.Tensor:
    """Rows with at most ``nonzero`` non-zero entries (an embedding's gradient); the first all zeros if asked."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(b, d)
    columns = torch.rand(b, d, generator=g).argsort(dim=1)[:, :nonzero]
    x.scatter_(1, columns, torch.randn(b, nonzero, generator=g))
    if zero_row:
        x[0] = 0.0
    return x


def saturated_linear_grads(b: int, classes: int, features: int, seed: int) -> torch.Tensor:
    """``linear_layer_grads`` of a saturated softmax: every third example's gradient is 0, every other third's
    has one class left (``features + 1`` non-zeros), as after a large step size."""
    x = linear_layer_grads(b, classes, features, seed).reshape(b, -1)
    weights, biases = x[:, :classes * features].reshape(b, classes, features), x[:, classes * features:]
    for row in range(b):
        kept = {0: [], 1: [row % classes]}.get(row % 3, range(classes))
        for c in set(range(classes)) - set(kept):
            weights[row, c] = 0.0
            biases[row, c] = 0.0
    return x


def keyed_shapes(monkeypatch) -> list[tuple[int, int]]:
    """(rows, keys per row) of every set of keys that ``top_k_magnitudes`` partitions and sorts."""
    shapes: list[tuple[int, int]] = []
    original = ged._smallest_keys_columns

    def spy(keys: np.ndarray, k: int) -> np.ndarray:
        shapes.append(keys.shape)
        return original(keys, k)

    monkeypatch.setattr(ged, "_smallest_keys_columns", spy)
    return shapes


def by_column(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference with ties in column order: a stable descending sort of each whole row."""
    ordered = x.abs().sort(dim=1, descending=True, stable=True)
    return ordered.values[:, :k], ordered.indices[:, :k]


@pytest.mark.parametrize("x,k", [(linear_layer_grads(9, 10, 4800, 7), 4000),
                                 (linear_layer_grads(3, 10, 480, 8), 1),
                                 (heavy_grads(5, 40000, 11), 5000),
                                 (sparse_grads(6, 20000, 3000, 10), 1000),
                                 (sparse_grads(6, 20000, 3000, 10, zero_row=True), 1000),
                                 (sparse_grads(6, 20000, 1100, 13), 1000),
                                 (sparse_grads(6, 2000, 30, 9), 100),
                                 (saturated_linear_grads(12, 10, 4800, 14), 4000)])
def test_top_k_magnitudes_filtered_by_a_threshold_equal_a_sort_of_the_whole_row(monkeypatch, x, k):
    # d >= FILTER_FROM * k: only candidates are sorted, the entries at or above a sampled threshold (sizes where
    # the sample's estimate is within a few standard deviations) or, in a row of fewer than ~1.25 k non-zeros,
    # its non-zeros (with the first zeros where they are fewer than k: an all-zero row too), never a whole row
    shapes = keyed_shapes(monkeypatch)
    mags, cols = top_k_magnitudes(x, k)
    assert torch.equal(mags, x.abs().topk(k, dim=1, sorted=True).values)
    expected = by_column(x, k)
    assert torch.equal(mags, expected[0]) and torch.equal(cols, expected[1])
    assert shapes and all(width < x.shape[1] for _, width in shapes)


@pytest.mark.parametrize("margin", [0.3, 0.9])
def test_top_k_magnitudes_key_a_whole_row_when_its_threshold_kept_fewer_than_k(monkeypatch, margin):
    monkeypatch.setattr(ged, "CANDIDATE_MARGIN", margin)  # below 1: rows keep fewer than k candidates
    monkeypatch.setattr(ged, "TOP_K_BLOCK", 4 * 4810)  # blocks of 4 rows of 4,810 columns
    x = torch.cat([linear_layer_grads(40, 10, 480, 12), saturated_linear_grads(8, 10, 480, 15)])
    shapes = keyed_shapes(monkeypatch)
    mags, cols = top_k_magnitudes(x, 400)
    whole = [rows for rows, width in shapes if width == x.shape[1]]
    assert whole, "no row fell short of k, so that path was not tested"
    if margin == 0.9:
        assert min(whole) < 4  # only the rows that fell short, not their block
    expected = by_column(x, 400)
    assert torch.equal(mags, expected[0]) and torch.equal(cols, expected[1])


def test_the_threshold_sample_is_fixed_and_spread_over_the_row():
    columns = ged.threshold_sample_columns(155_530)
    assert np.array_equal(columns, ged.threshold_sample_columns.__wrapped__(155_530))  # data-independent
    assert len(columns) == 155_530 // ged.THRESHOLD_SAMPLE_EVERY and np.all(np.diff(columns) > 0)
    # not one residue of a period: a linear layer's row repeats every 15,552 columns
    assert len(np.unique(columns % 16)) == 16 and len(np.unique(columns % 15_552)) > 5_000


def test_encoder_is_the_same_with_torch_topk(monkeypatch, codebook):
    enc = GEDEncoder(float32_below(codebook), K, clip=1.0, kappa=4.0)
    grads = heavy_grads(32, D, 5)
    fast, fast_rows = enc.encode(grads)
    monkeypatch.setattr(ged, "top_k_magnitudes", lambda x, k: x.abs().topk(k, dim=1, sorted=True))
    reference, reference_rows = enc.encode(grads)
    assert torch.equal(fast, reference) and torch.equal(fast_rows, reference_rows)


def test_encoder_writing_into_its_input_encodes_the_same(codebook):
    enc = GEDEncoder(float32_below(codebook), K, clip=1.0, kappa=4.0)
    grads = heavy_grads(32, D, 6)
    reference, reference_rows = enc.encode(grads)
    buffer = grads.clone()
    out, rows = enc.encode(buffer, overwrite=True)
    assert torch.equal(out, reference) and torch.equal(rows, reference_rows)
    assert out.data_ptr() == buffer.data_ptr()  # no second b x d buffer
    assert torch.equal(enc(grads.clone(), overwrite=True), reference)
    empty, empty_rows = enc.encode(torch.zeros(0, D), overwrite=True)
    assert empty.shape == (0, D) and empty_rows.shape == (0,)


def test_transform_reuses_one_buffer_between_chunks_and_encodes_each_as_a_fresh_concatenation():
    mech = GED(k=K, codebook_rows=6, codebook_seed=2)
    shapes = ((10, 29), (10,))  # a linear layer's weight and bias: d = 300
    first = None
    for b, seed in ((32, 1), (8, 2), (0, 3), (32, 4), (48, 5)):
        flat = heavy_grads(b, D, seed)
        grads = [piece.reshape(b, *shape) for piece, shape in zip(flat.split([290, 10], dim=1), shapes)]
        summed = mech.transform([g.clone() for g in grads], clip=1.0)
        expected = mech.encoder(flat.clone()).sum(dim=0)
        assert [t.shape for t in summed] == [torch.Size(s) for s in shapes]
        assert torch.equal(torch.cat([t.reshape(-1) for t in summed]), expected)
        first = mech._rows.data_ptr() if first is None else first
        assert (mech._rows.data_ptr() == first) == (b <= 32)  # a larger chunk than any before: a new buffer
    assert mech._rows.shape == (48, D) and "_rows" in GED.transient  # never written into a checkpoint


def test_ged_trains_the_same_whether_the_fast_path_writes_into_its_buffer_or_not(monkeypatch):
    import dataclasses

    from dpbench.config import resolve
    from dpbench.data import load_dataset
    from dpbench.engine import train
    from dpbench.persample.bookkeeping import BookKeeping

    cfg = dataclasses.replace(resolve({"mech": "ged", "dataset": "synthetic", "eps": 3.0, "steps": 4, "seed": 0,
                                       "batch_size": 48, "mech_params": {"k": 8, "codebook_rows": 4}}),
                              physical_batch_size=24, grad_sample="fast")
    in_place = []
    laid_out_in = ged.laid_out_in
    monkeypatch.setattr(ged, "laid_out_in", lambda pieces, flat: in_place.append(laid_out_in(pieces, flat))
                        or in_place[-1])

    def trained() -> torch.Tensor:
        mech = GED(**cfg.mech_params)
        mech.bind(batch_size=cfg.batch_size, clip=cfg.clip)
        out = train(cfg, mech, load_dataset("synthetic"), 1.0, 4, torch.device("cpu"), show_progress=False)
        assert out.grad_sample == "fast" and any(m > 0 for m, _ in mech.denoise_history)  # steps were taken
        return torch.cat([p.detach().flatten() for p in out.model.parameters()])

    written = trained()
    assert in_place and all(in_place)  # every chunk's gradients were written where the encoding reads them
    own = BookKeeping.per_sample_gradients
    monkeypatch.setattr(BookKeeping, "per_sample_gradients", lambda self, into=None: own(self))
    in_place.clear()
    copied = trained()
    assert in_place and not any(in_place)  # tensors of their own, concatenated into the buffer
    assert torch.equal(written, copied)


def test_encoded_vectors_lie_in_the_sensitivity_set(codebook):
    torch.manual_seed(0)
    enc = GEDEncoder(float32_below(codebook), K, clip=1.0, kappa=4.0)
    grads = heavy_grads(64, D, 1)
    grads[0] = 0.0
    out, chosen = enc.encode(grads)
    rows = torch.from_numpy(codebook)
    for e, g, m in zip(out, grads, chosen):
        assert int((e != 0).sum()) <= K
        assert float(e.double().norm()) <= 1.0
        mags = e.abs().double().sort(descending=True).values[:K]
        assert torch.all(mags <= rows[m])  # rank-wise under the chosen row (float64 values, no rounding up)
        support = e != 0
        assert torch.all(torch.sign(e[support]) == torch.sign(g[support]))
        if support.any():
            assert set(support.nonzero().flatten().tolist()) <= set(g.abs().topk(K).indices.tolist())
    assert torch.all(out[0] == 0)


def test_encoder_is_per_example_and_picks_the_most_cosine_similar_row(codebook):
    enc = GEDEncoder(float32_below(codebook), K, clip=1.0, kappa=4.0)
    grads = heavy_grads(16, D, 2)
    batch, chosen = enc.encode(grads)
    rows = float32_below(codebook)
    for i in range(16):  # one example at a time gives the same rows: nothing mixes across the batch
        single, c = enc.encode(grads[i:i + 1])
        assert torch.equal(single[0], batch[i]) and int(c) == int(chosen[i])
        mags = grads[i].abs().topk(K).values
        h = mags * (1.0 / max(float(mags.norm()), 1.0)) * 4.0
        cos = torch.nn.functional.cosine_similarity(h[None, :], rows, dim=1)
        assert int(cos.argmax()) == int(chosen[i])


def test_large_gradients_are_mostly_clamped_to_the_row(codebook):
    enc = GEDEncoder(float32_below(codebook), K, clip=1.0, kappa=4.0)
    g = torch.randn(1, D) * 100
    e, m = enc.encode(g)
    mags = e.abs().sort(descending=True).values[0, :K]
    frac = float((mags == float32_below(codebook)[m[0]]).float().mean())
    assert frac > 0.5  # kappa C = 4 > Q = 1: "signs of the top-k with the row's magnitudes"


def test_canary_is_the_worst_row_on_the_directions_top_k():
    mech = get_mechanism("ged")(k=K, codebook_rows=3)
    direction = [torch.randn(10, 20), torch.randn(100)]
    contrib = mech.canary_contribution(direction, clip=0.1)
    flat = torch.cat([c.reshape(-1) for c in contrib])
    dflat = torch.cat([d.reshape(-1) for d in direction])
    assert int((flat != 0).sum()) == K and float(flat.double().norm()) <= 1.0 + 1e-6
    assert float(flat.double().norm()) > 1.0 - 1e-5
    top = dflat.abs().topk(K).indices
    assert torch.all(torch.sign(flat[top]) == torch.sign(dflat[top]))
    mags = flat.abs().double().sort(descending=True).values[:K]
    assert any(torch.all(mags <= torch.from_numpy(r)) for r in mech.codebook)


# -- the denoiser ---------------------------------------------------------------------------------------

def test_ks_statistic_matches_scipy():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3000, generator=g), torch.randn(2000, generator=g) * 1.3 + 0.1
    assert ks_statistic(a, b) == pytest.approx(stats.ks_2samp(a.numpy(), b.numpy()).statistic, abs=1e-12)


def test_ks_denoiser_skips_pure_noise_and_caps_signal():
    den = KSDenoiser(lam=500.0, theta=0.7, cap=5.0)
    x = torch.randn(1000)
    assert den(x, x.clone()) == (0.0, 0.0)  # identical to pure noise: skipped
    mult, delta_hat = den(x + 10.0, x)
    assert mult == 5.0 and delta_hat == pytest.approx(500.0)
    mult, delta_hat = KSDenoiser(lam=10.0, theta=0.7, cap=5.0)(x + 0.5, x)
    assert 0.7 <= mult < 5.0 and mult == delta_hat


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(20, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _one_step(mech, x, y, seed=0):
    torch.manual_seed(0)
    model = GradSampleModule(_Tiny())
    opt = mech.make_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
                              expected_batch_size=len(y), generator=torch.Generator().manual_seed(seed))
    mech._reference_generator = torch.Generator().manual_seed(seed + 1)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    return [p.detach().clone() for p in model.parameters()], mech


def test_denoiser_never_reads_the_clean_gradient():
    x, y = torch.randn(16, 20), torch.randint(0, 3, (16,))
    released = {}

    class Poisoned(GED):
        def update(self, noisy, release):  # noqa: ANN001
            released["sum"] = torch.cat([t.reshape(-1) for t in noisy]).clone()
            for p in release.params:  # anything that reads the clean gradient from here on reads NaN
                p.summed_grad = torch.full_like(p.summed_grad, float("nan"))
                p.grad_sample = torch.full_like(p.grad_sample, float("nan"))
            super().update(noisy, release)

    class Recording(KSDenoiser):
        def __call__(self, noisy, reference):
            released["denoiser_input"] = noisy.clone()
            return super().__call__(noisy, reference)

    plain, opt_plain = _one_step(get_mechanism("ged")(k=50, codebook_rows=2), x, y)
    poisoned_mech = Poisoned(k=50, codebook_rows=2)
    poisoned_mech.denoiser = Recording()
    poisoned, _ = _one_step(poisoned_mech, x, y)
    assert all(torch.isfinite(p).all() for p in poisoned)
    assert all(torch.equal(a, b) for a, b in zip(plain, poisoned))
    # the denoiser's input is exactly the released average (noisy sum / B), nothing else
    torch.testing.assert_close(released["denoiser_input"], released["sum"] / 16)
    assert opt_plain.denoise_history and not opt_plain.diagnostics  # no clean-gradient statistics outside debug


def test_debug_diagnostics_do_not_change_training():
    x, y = torch.randn(16, 20), torch.randint(0, 3, (16,))
    plain, _ = _one_step(get_mechanism("ged")(k=50, codebook_rows=2), x, y)
    debug, opt = _one_step(get_mechanism("ged")(k=50, codebook_rows=2, debug=True), x, y)
    assert all(torch.equal(a, b) for a, b in zip(plain, debug))
    assert len(opt.diagnostics) == 1 and "cos_clean_noisy" in opt.diagnostics[0]


@pytest.mark.parametrize("noise", ["student_t", "gaussian", "laplace"])
def test_noise_lands_on_every_coordinate(noise):
    mech = get_mechanism("ged")(k=5, codebook_rows=2, noise=noise, denoiser="none")
    model = GradSampleModule(_Tiny())
    opt = mech.make_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=2.0, max_grad_norm=1.0,
                              expected_batch_size=8, generator=torch.Generator().manual_seed(3))
    for p in opt.params:  # an empty batch: the release is pure noise
        p.grad_sample = torch.zeros((0, *p.shape))
    opt.pre_step()  # the release: p.grad holds the noisy sum (the update would divide it by B)
    released = torch.cat([p.grad.reshape(-1) for p in opt.params])
    assert torch.all(released != 0) and released.numel() == sum(p.numel() for p in opt.params)
    assert float(released.std()) == pytest.approx({"student_t": 2 * (9 / 7) ** 0.5, "gaussian": 2.0,
                                                   "laplace": 2 * 2 ** 0.5}[noise], rel=0.25)


def test_lr_schedule_follows_the_official_mnist_epochs():
    assert [lr_factor("mnist", e) for e in (0, 10, 11, 20, 21, 40, 41, 60, 61, 99)] == \
        [1.0, 1.0, 0.75, 0.75, 0.5, 0.5, 0.25, 0.25, 0.05, 0.05]
    assert lr_factor("constant", 80) == 1.0


def test_bad_parameters_exit_with_bad_input():
    with pytest.raises(BadInput, match="denoiser"):
        get_mechanism("ged")(denoiser="rank")
    with pytest.raises(BadInput, match="did you mean"):
        get_mechanism("ged")(kapa=4.0)


# -- end to end -----------------------------------------------------------------------------------------

def test_ged_end_to_end_through_the_cli():
    runner = CliRunner()
    res = runner.invoke(app, ["run", "--mech", "ged", "--dataset", "synthetic", "--steps", "3", "--eps", "3",
                              "--quiet", "--set", "codebook_rows=4"])
    assert res.exit_code == 0, res.output
    (row,) = list(csv.DictReader(open("results/runs.csv")))
    assert row["mech"] == "ged" and row["accountant"] == "ged-rdp" and float(row["eps_spent"]) <= 3.0
    assert json.loads(row["mech_params"])["codebook_rows"] == 4
    res = runner.invoke(app, ["account", "--mech", "ged", "--dataset", "synthetic", "--steps", "3", "--eps", "3",
                              "--set", "codebook_rows=4", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["accountant"] == "ged-rdp" and out["eps"] <= 3.0 and out["eps_rdp"] is not None
    assert out["noise_multiplier"] == pytest.approx(float(row["noise_multiplier"]))
