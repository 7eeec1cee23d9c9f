"""Every private mechanism keeps one record's contribution within the bound its accountant assumes,
after float32 rounding, at extreme gradient norms and clipping bounds."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn as nn
from opacus import GradSampleModule

from dpbench.config import resolve
from dpbench.mechanisms import MECHANISMS, get_mechanism
from dpbench.mechanisms.base import TrainContext
from dpbench.models import build_model
from dpbench.persample.norms import FACTOR_MARGIN, bounded_factors, per_sample_norms, round_toward_zero

PRIVATE = [name for name in MECHANISMS.names() if get_mechanism(name).private]
#: Small GED settings, so that its codebook is quick to draw; the bound logic is the same.
PARAMS = {"ged": {"k": 8, "codebook_rows": 4}}
SUBNORMAL = 1e-44  # float32 subnormal entries: squares underflow to 0 in float32
NORMS = [0.0, "subnormal", 1e-3, 1.0, 1e30, 1.4e37]


def _context(name: str, features: int, classes: int, clip: float) -> tuple[object, TrainContext]:
    """A mechanism set up for its first step on the ``linear`` model (features -> classes)."""
    mech = get_mechanism(name)(**PARAMS.get(name, {}))
    cfg = dataclasses.replace(resolve({"mech": name, "dataset": "synthetic", "eps": 3.0, "steps": 4}),
                              clip=clip, batch_size=8, model="linear")
    torch.manual_seed(0)
    model = GradSampleModule(build_model("linear", (features,), classes), batch_first=True, loss_reduction="mean")
    mech.bind(batch_size=cfg.batch_size, clip=clip)
    opt = mech.make_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0,
                              max_grad_norm=clip, expected_batch_size=cfg.batch_size,
                              generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    ctx = TrainContext(cfg=cfg, model=model, optimizer=opt, train_x=torch.randn(4, features, generator=g),
                       train_y=torch.tensor([0, 1, 2, 0]) % classes, criterion=nn.CrossEntropyLoss(), noise_multiplier=1.0,
                       sample_rate=8 / 4, steps=4, physical_batch_size=4, device=torch.device("cpu"),
                       make_generator=lambda purpose, on=None: torch.Generator().manual_seed(len(purpose)),
                       build_model=lambda: build_model("linear", (features,), classes))
    ctx.sample_rate = 0.5
    mech.setup(ctx)
    mech.begin_step(ctx, 0)
    return mech, ctx


def _gradient(shapes: list[torch.Size], norm: float | str, seed: int = 0) -> list[torch.Tensor]:
    """One record's per-parameter gradients (a batch of one) with the given global norm."""
    g = torch.Generator().manual_seed(seed)
    direction = [torch.randn(1, *s, generator=g, dtype=torch.float64) for s in shapes]
    if norm == "subnormal":
        return [(d.sign() * SUBNORMAL).float() for d in direction]
    total = math.sqrt(sum(float(d.pow(2).sum()) for d in direction))
    return [(d * (norm / total)).float() for d in direction]


def _bounds(name: str, mech, ctx: TrainContext, norm_of_record: float) -> tuple[float, float]:
    """(l2 bound, l-inf bound) of one record's contribution, as the mechanism's accountant assumes it."""
    clip = ctx.cfg.clip
    if name == "dpis":
        # make the record certain to be kept (inclusion probability 1), so its term is really added; a zero
        # gradient is never kept, whatever K^
        kept_norm = min(norm_of_record, mech.current_clip) or mech.current_clip
        mech.k_hat = mech.batch_size * kept_norm / mech.candidate_rate
        return mech.term_norm, math.inf
    if name == "ged":
        return float(mech.params["quant_clip"]), math.inf
    if name == "modelmix":
        return clip, clip / math.sqrt(mech.params["p"])
    return clip, math.inf


def _contribution(ctx: TrainContext, grads: list[torch.Tensor]) -> torch.Tensor:
    opt = ctx.optimizer
    for p, g in zip(opt.params, grads):
        p.grad_sample = g.clone()
        p.summed_grad = None
    opt.clip_and_accumulate()
    return torch.cat([p.summed_grad.reshape(-1).double() for p in opt.params])


@pytest.mark.parametrize("name", PRIVATE)
@pytest.mark.parametrize("clip", [1e-12, 1e-8, 1.0, 1e6])
def test_one_record_never_contributes_past_its_bound(name, clip):
    mech, ctx = _context(name, 5, 3, clip)
    shapes = [p.shape for p in ctx.optimizer.params]
    for norm in NORMS:
        grads = _gradient(shapes, norm)
        exact = float(per_sample_norms(grads)[0])
        l2_bound, linf_bound = _bounds(name, mech, ctx, exact)
        contribution = _contribution(ctx, grads)
        assert bool(torch.isfinite(contribution).all()), (name, clip, norm)
        assert float(contribution.norm()) <= l2_bound, (name, clip, norm, float(contribution.norm()) / l2_bound)
        assert float(contribution.abs().max()) <= linf_bound
        if norm == 0.0:
            assert float(contribution.abs().max()) == 0.0


@pytest.mark.parametrize("name", [n for n in PRIVATE if n not in ("dpis",)])
def test_a_large_layer_is_clipped_to_its_bound(name):
    # 4M equal coordinates: a float32 norm of them is 0.18% short, which clipping to it would pass on.
    mech, ctx = _context(name, 2000, 2000, 1.0)
    grads = [torch.full((1, 2000, 2000), 0.1), torch.zeros(1, 2000)]
    assert float(grads[0].norm()) < 0.999 * float(grads[0].double().norm())  # the float32 shortfall
    l2_bound, _ = _bounds(name, mech, ctx, 200.0)
    assert float(_contribution(ctx, grads).norm()) <= l2_bound


def test_norms_are_accurate_where_float32_sums_are_not():
    grads = [torch.full((2, 4_000_000), 0.1), torch.full((2, 3), 1e-30)]
    exact = torch.sqrt(torch.tensor(4_000_000 * 0.01 + 3 * 1e-60, dtype=torch.float64))
    norms = per_sample_norms(grads)
    assert norms.dtype == torch.float64
    torch.testing.assert_close(norms, exact.expand(2), rtol=33 * 2.0 ** -24, atol=0)


def test_rounding_toward_zero_never_rounds_up():
    values = torch.tensor([0.0, 7.1e-46, 1.5e-45, 3e-39, 1.0 / 3.0, 0.1, 1e38, 1e39, 1e300], dtype=torch.float64)
    rounded = round_toward_zero(values, torch.float32)
    assert rounded.dtype == torch.float32
    assert bool((rounded.double() <= values).all())
    # the nearest float32 of 7.1e-46 is the smallest subnormal, 1.4e-45, twice the value: rounded down to 0
    assert float(values[1].float()) > float(values[1]) and float(rounded[1]) == 0.0
    assert float(rounded[7]) == torch.finfo(torch.float32).max  # saturates instead of inf
    torch.testing.assert_close(rounded[4].double(), values[4], rtol=2.0 ** -23, atol=0)


def test_bounded_factors_only_lower_weights_near_the_bound():
    norms = torch.tensor([0.0, 0.5, 1.0, 4.0], dtype=torch.float64)
    weights = torch.tensor([100.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    factors = bounded_factors(weights, norms, bound=1.0, dtype=torch.float32).double()
    assert float(factors[0]) == 100.0 and float(factors[1]) == 1.0  # zero norm; well inside the bound
    assert float(factors[2] * norms[2]) <= 1.0 - FACTOR_MARGIN
    assert float(factors[3] * norms[3]) == pytest.approx(1.0, rel=2 * FACTOR_MARGIN)
    assert float(factors[3] * norms[3]) <= 1.0 - FACTOR_MARGIN
