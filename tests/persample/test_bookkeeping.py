"""The fast per-sample path equals Opacus' reference path: per layer type, per model of the zoo, per mechanism."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math

import pytest
import torch
import torch.nn as nn
from opacus import GradSampleModule
from opacus.layers import DPLSTM

from dpbench.config import resolve
from dpbench.engine import run, train
from dpbench.mechanisms import MECHANISMS, get_mechanism
from dpbench.models import MODELS
from dpbench.persample import BookKeeping, unsupported_layer
from dpbench.persample.norms import bounded_factors, per_sample_norms
from dpbench.step import average_augmentations
from tests.models.test_zoo import _example

PRIVATE = [n for n in MECHANISMS.names(plugins=False) if get_mechanism(n).private]
PARAMS = {"ged": {"k": 8, "codebook_rows": 4}}


class Sequence(nn.Module):
    """A linear layer applied at every position of a sequence, then a mean: a per-sample gradient of rank > 1."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).mean(1)


class Twice(nn.Module):
    """One linear layer called twice in a forward: its per-sample gradient is the sum over both calls."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.fc(torch.tanh(self.fc(x)))))


class Lstm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = DPLSTM(4, 5, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.lstm(x)[0].mean(1))


def _tokens(n: int) -> torch.Tensor:
    x = torch.randint(1, 30, (n, 9))
    x[:, :4] = 7  # the same token four times in every row: its rows must add up
    x[0, -3:] = 0  # padding
    return x


#: One small model per layer type and configuration, with inputs of n rows.
LAYERS = {
    "linear": (lambda: nn.Sequential(nn.Flatten(), nn.Linear(12, 3)), lambda n: torch.randn(n, 3, 4)),
    "linear without bias": (lambda: nn.Sequential(nn.Linear(6, 5, bias=False), nn.Tanh(), nn.Linear(5, 3)),
                            lambda n: torch.randn(n, 6)),
    "linear on sequences": (Sequence, lambda n: torch.randn(n, 7, 5)),
    "linear called twice": (Twice, lambda n: torch.randn(n, 4)),
    "conv2d": (lambda: nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)),
               lambda n: torch.randn(n, 2, 8, 8)),
    "conv2d rectangular, no bias": (lambda: nn.Sequential(nn.Conv2d(3, 4, (3, 2), stride=(1, 2), padding=(0, 1),
                                                                    bias=False), nn.Flatten(), nn.Linear(4 * 5 * 4, 3)),
                                    lambda n: torch.randn(n, 3, 7, 6)),
    "conv2d dilated": (lambda: nn.Sequential(nn.Conv2d(2, 3, 3, dilation=2), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)),
                       lambda n: torch.randn(n, 2, 8, 8)),
    "group norm": (lambda: nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(4 * 36, 3)),
                   lambda n: torch.randn(n, 2, 8, 8)),
    "embedding": (lambda: nn.Sequential(nn.Embedding(30, 4), nn.Flatten(), nn.Linear(36, 3)), _tokens),
    "lstm": (Lstm, lambda n: torch.randn(n, 6, 4)),
}


def _reference_and_fast(model: nn.Module, x: torch.Tensor, y: torch.Tensor, copies: int):
    """Opacus' per-sample gradients and the fast path's, of the same model on the same rows."""
    twin = copy.deepcopy(model)
    reference = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    nn.functional.cross_entropy(reference(x), y).backward()
    average_augmentations(list(model.parameters()), copies)
    expected = [p.grad_sample.detach().clone() for p in model.parameters()]
    fast = BookKeeping(twin, copies=copies)
    nn.functional.cross_entropy(fast(x), y).backward()
    return expected, fast


def _check_equal(expected: list[torch.Tensor], fast: BookKeeping, x: torch.Tensor, y: torch.Tensor,
                 masks: list[torch.Tensor] | None = None) -> None:
    got = fast.per_sample_gradients()
    assert len(got) == len(expected)
    for e, g in zip(expected, got):
        assert g.shape == e.shape
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6 * float(e.abs().max()))
    # the norms and the clipped sum, which on the fast path need not materialise anything
    nn.functional.cross_entropy(fast(x), y).backward()
    if masks is not None:
        expected = [e * m for e, m in zip(expected, masks)]
    ref_norms = per_sample_norms(expected)
    clip = float(ref_norms.median())  # half the rows are clipped
    norms, summed = fast.clipped_sum(lambda n: torch.ones_like(n), clip, masks)
    torch.testing.assert_close(norms, ref_norms, rtol=1e-6, atol=0)
    factors = bounded_factors(torch.ones_like(ref_norms), ref_norms, clip, torch.float32)
    for e, s in zip(expected, summed):
        ref = torch.einsum("i,i...", factors, e)
        torch.testing.assert_close(s, ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max()))


@pytest.mark.parametrize("copies", [1, 2])
@pytest.mark.parametrize("layer", list(LAYERS))
def test_each_layer_type_matches_the_reference(layer, copies):
    torch.manual_seed(0)
    build, inputs = LAYERS[layer]
    x, model = inputs(6 * copies), build()
    y = torch.randint(0, 3, (6 * copies,))
    expected, fast = _reference_and_fast(model, x, y, copies)
    _check_equal(expected, fast, x, y)


@pytest.mark.parametrize("positions", [0, 64], ids=["grouped", "patches"])
@pytest.mark.parametrize("layer", ["conv2d", "conv2d rectangular, no bias", "conv2d dilated", "group norm"])
def test_a_convolution_by_either_kernel_and_in_chunks_of_rows_matches_the_reference(layer, positions, monkeypatch):
    import dpbench.persample.rules as rules

    torch.manual_seed(0)
    build, inputs = LAYERS[layer]
    x, model = inputs(7), build()
    monkeypatch.setattr(rules, "MAX_PATCH_POSITIONS", positions)  # these layers have 16 to 36 output positions
    monkeypatch.setattr(rules, "MAX_GROUPED_CHANNELS", 2 * model[0].in_channels)  # grouped: 2, 2, 2, 1 rows
    y = torch.randint(0, 3, (7,))
    expected, fast = _reference_and_fast(model, x, y, 1)
    _check_equal(expected, fast, x, y)


@pytest.mark.parametrize("layer", list(LAYERS))
def test_masked_norms_and_sums_match_the_masked_reference(layer):
    # random sparsification (rs) zeroes coordinates of every per-sample gradient before its norm
    torch.manual_seed(1)
    build, inputs = LAYERS[layer]
    x, model = inputs(6), build()
    y = torch.randint(0, 3, (6,))
    masks = [(torch.rand(p.shape) < 0.6).float() for p in model.parameters()]
    expected, fast = _reference_and_fast(model, x, y, 1)
    _check_equal(expected, fast, x, y, masks)


@pytest.mark.parametrize("copies", [1, 2])
@pytest.mark.parametrize("name", MODELS.names())
def test_every_model_of_the_zoo_matches_the_reference(name, copies):
    torch.manual_seed(0)
    model, x, _ = _example(name, batch=3 * copies)
    if name == "embbag":
        x[1, :6] = x[1, 0]  # a repeated word
    assert unsupported_layer(model) is None
    y = torch.arange(3 * copies) % 2
    expected, fast = _reference_and_fast(model, x, y, copies)
    _check_equal(expected, fast, x, y)


def _check_written_into_a_buffer(model: nn.Module, x: torch.Tensor, y: torch.Tensor, copies: int) -> None:
    n = len(y) // copies
    fast = BookKeeping(model, copies=copies)
    nn.functional.cross_entropy(fast(x), y).backward()
    own = fast.per_sample_gradients()
    nn.functional.cross_entropy(fast(x), y).backward()
    buffer = torch.full((n, sum(p.numel() for p in model.parameters())), math.nan)
    written = fast.per_sample_gradients(into=buffer)
    assert all(torch.equal(w, o) for w, o in zip(written, own))  # linear layers in place: the same floats
    assert torch.equal(buffer, torch.cat([o.reshape(n, -1) for o in own], dim=1))  # every column, in order
    offsets = [0, *itertools.accumulate(p.numel() for p in model.parameters())][:-1]
    assert [w.data_ptr() for w in written] == [buffer[:, o].data_ptr() for o in offsets]  # views of the buffer


@pytest.mark.parametrize("copies", [1, 2])
@pytest.mark.parametrize("layer", list(LAYERS))
def test_per_sample_gradients_written_into_a_buffer_are_the_same_floats_in_its_columns(layer, copies):
    torch.manual_seed(2)
    build, inputs = LAYERS[layer]
    x, model = inputs(5 * copies), build()
    _check_written_into_a_buffer(model, x, torch.randint(0, 3, (5 * copies,)), copies)


@pytest.mark.parametrize("copies", [1, 2])
@pytest.mark.parametrize("name", MODELS.names())
def test_every_model_of_the_zoo_writes_the_same_floats_into_a_buffer(name, copies):
    torch.manual_seed(2)
    model, x, _ = _example(name, batch=3 * copies)
    _check_written_into_a_buffer(model, x, torch.arange(3 * copies) % 2, copies)


def test_a_buffer_of_the_wrong_shape_is_refused_and_an_empty_chunk_leaves_nothing_to_write():
    fast = BookKeeping(LAYERS["linear"][0]())  # 12 x 3 weights and 3 biases: 39 per example
    nn.functional.cross_entropy(fast(torch.randn(4, 3, 4)), torch.zeros(4, dtype=torch.long)).backward()
    with pytest.raises(ValueError, match=r"row-major \[4, 39\] buffer, got \(4, 40\)"):
        fast.per_sample_gradients(into=torch.zeros(4, 40))
    fast.empty()
    assert [tuple(g.shape) for g in fast.per_sample_gradients(into=torch.zeros(0, 39))] == [(0, 3, 12), (0, 3)]


def test_an_embeddings_padding_row_gets_no_gradient_as_in_autograd():
    # Opacus' rule gives the padding row a per-sample gradient that autograd (and so the update) never has
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(30, 4, padding_idx=0), nn.Flatten(), nn.Linear(36, 3))
    x, y = _tokens(3), torch.tensor([0, 1, 2])
    fast = BookKeeping(copy.deepcopy(model))
    nn.functional.cross_entropy(fast(x), y).backward()
    got = fast.per_sample_gradients()
    for i in range(3):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        for g, p in zip(got, model.parameters()):
            torch.testing.assert_close(g[i], p.grad, rtol=1e-5, atol=1e-7)
    assert float(got[0][:, 0].abs().max()) == 0.0


def test_the_fast_path_computes_no_parameter_gradients_and_leaves_parameters_trainable():
    model = LAYERS["conv2d"][0]()
    fast = BookKeeping(model)
    nn.functional.cross_entropy(fast(torch.randn(4, 2, 8, 8)), torch.zeros(4, dtype=torch.long)).backward()
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert fast.per_sample_gradients()[0].shape == (4, 3, 2, 3, 3)
    with pytest.raises(RuntimeError, match="taken twice"):
        fast.per_sample_gradients()


def test_evaluation_passes_through_without_capturing():
    fast = BookKeeping(LAYERS["linear"][0]())
    with torch.no_grad():
        fast(torch.randn(3, 3, 4))
    with pytest.raises(RuntimeError, match="before a backward"):
        fast.norms()


def test_an_uncovered_layer_is_named_and_the_run_falls_back_to_the_reference(monkeypatch, capsys):
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 3))
    assert "parameter '1.weight'" in unsupported_layer(model)
    with pytest.raises(ValueError, match="LayerNorm|1.weight"):
        BookKeeping(model)
    cfg = dataclasses.replace(resolve({"mech": "dpsgd", "dataset": "synthetic", "eps": 3.0, "steps": 2}),
                              model="linear", batch_size=8)
    from dpbench.data import load_dataset

    mech = get_mechanism("dpsgd")()
    mech.bind(batch_size=8, clip=cfg.clip)
    out = train(cfg, mech, load_dataset("synthetic"), 1.0, 2, torch.device("cpu"), show_progress=False,
                model_factory=lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 4), nn.LayerNorm(4),
                                                    nn.Linear(4, 10)))
    assert out.grad_sample == "reference"
    assert "does not cover" in capsys.readouterr().err


@pytest.mark.parametrize("clip", [1e-12, 1e-8, 1.0, 1e6])
def test_a_record_never_contributes_past_the_clip_on_the_fast_path(clip):
    # a zero linear map: a record's gradient is (1/K - onehot(y)) x^T (plus the bias row), so |x| sets its norm,
    # from subnormal (float32 squares underflow) to 1e37
    model = nn.Linear(6, 3)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    fast = BookKeeping(model)
    for scale in (0.0, 1e-44, 1e-3, 1.0, 1e30, 1e37):
        x = torch.full((1, 6), scale)
        nn.functional.cross_entropy(fast(x), torch.tensor([1])).backward()
        _, summed = fast.clipped_sum(lambda n: torch.ones_like(n), clip)
        contribution = torch.cat([s.double().flatten() for s in summed])
        assert bool(torch.isfinite(contribution).all())
        assert float(contribution.norm()) <= clip, (scale, float(contribution.norm()) / clip)


@pytest.mark.parametrize("name", PRIVATE)
def test_every_mechanism_trains_the_same_on_both_paths(name):
    from dpbench.data import load_dataset

    data = load_dataset("synthetic")
    weights = {}
    for path in ("fast", "reference"):
        cfg = dataclasses.replace(resolve({"mech": name, "dataset": "synthetic", "eps": 3.0, "steps": 6, "seed": 0,
                                           "batch_size": 48, "mech_params": PARAMS.get(name, {})}),
                                  physical_batch_size=24, grad_sample=path)
        mech = get_mechanism(name)(**cfg.mech_params)
        mech.bind(batch_size=cfg.batch_size, clip=cfg.clip)
        out = train(cfg, mech, data, 1.0, 6, torch.device("cpu"), show_progress=False)
        assert out.grad_sample == path
        weights[path] = torch.cat([p.detach().flatten() for p in out.model.parameters()])
    moved = float((weights["reference"] - _initial_weights(cfg)).abs().max())
    assert moved > 1e-3  # the runs trained
    # float rounding only (after one step the paths differ by ~1e-8); a wrong factor or sum moves weights by ~moved.
    # Normalising mechanisms (auto_s: g / (||g|| + 0.01)) amplify rounding over steps, to ~2e-4 x moved after 6.
    torch.testing.assert_close(weights["fast"], weights["reference"], rtol=1e-4, atol=1e-3 * moved)


def _initial_weights(cfg) -> torch.Tensor:  # noqa: ANN001
    from dpbench.models import build_model
    from dpbench.runstate import derive_seed

    torch.manual_seed(derive_seed(cfg.seed, "model"))
    return torch.cat([p.detach().flatten() for p in build_model(cfg.model, (1, 28, 28), 10).parameters()])


@pytest.mark.parametrize("name", ["dpsgd", "dpis"])
def test_eps_and_the_row_do_not_depend_on_the_path(name, tmp_path):
    rows = {}
    for path in ("fast", "reference"):
        cfg = resolve({"mech": name, "dataset": "synthetic", "eps": 3.0, "steps": 6, "seed": 0, "batch_size": 48,
                       "grad_sample": path, "out": str(tmp_path / path / "runs.csv")})
        rows[path] = run(cfg, show_progress=False)
        assert rows[path]["grad_sample"] == path
    for key in ("eps_spent", "eps_rdp", "noise_multiplier", "config_hash"):
        assert rows["fast"][key] == rows["reference"][key], key
    assert "--grad-sample reference" in rows["reference"]["command"]
    assert "--grad-sample" not in rows["fast"]["command"]
    assert math.isclose(rows["fast"]["test_loss"], rows["reference"]["test_loss"], rel_tol=1e-4)


def test_the_gpu_norms_without_data_dependent_branches_equal_the_cpu_ones():
    from dpbench.persample.norms import per_parameter_norms

    g = torch.randn(6, 300)
    g[1] = 1e-25  # float32 squares underflow: redone in float64
    g[2, 5] = float("inf")
    g[3] = 0.0
    other = torch.randn(6, 7)
    branching = per_parameter_norms([g, other], branch_free=False)
    free = per_parameter_norms([g, other], branch_free=True)
    assert torch.equal(branching, free)
    assert math.isclose(float(free[1, 0]), float(torch.tensor(1e-25)) * math.sqrt(300), rel_tol=1e-12)
    assert math.isinf(float(free[2, 0])) and float(free[3, 0]) == 0.0
