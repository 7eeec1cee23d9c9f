"""Per-sample scaling (auto_s, psac, psasc): weights pinned, sensitivity bound, update, accounting, CLI."""

from __future__ import annotations

import csv
import dataclasses
import json
import math

import pytest
import torch
import torch.nn as nn
from opacus import GradSampleModule
from typer.testing import CliRunner

from dpbench.cli import app
from dpbench.config import resolve
from dpbench.data import load_dataset
from dpbench.engine import train
from dpbench.errors import BadInput
from dpbench.mechanisms import get_mechanism
from dpbench.mechanisms import scaling
from dpbench.mechanisms.scaling import (SENSITIVITY_GRID, WEIGHTS, auto_s_weight, check_sensitivity,
                                        clip_weight, max_scaled_norm, psac_weight)
from dpbench.privacy import account, calibrate

DATA = load_dataset("synthetic")
X = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731


# -- the weight functions, pinned -------------------------------------------------------------

def test_auto_s_weight_values():
    w = auto_s_weight(X(0.0, 0.99, 1.0, 9.99), clip=1.0, gamma=0.01)
    torch.testing.assert_close(w, X(100.0, 1.0, 1 / 1.01, 0.1))
    torch.testing.assert_close(auto_s_weight(X(0.5), clip=3.0, gamma=0.5), X(3.0))


def test_psac_weight_values():
    # r = 0.01: w(0) = C; at x = 0.01 r/(x+r) = 1/2; at x = 1 r/(x+r) = 1/101; the peak sits at sqrt(r) - r.
    w = psac_weight(X(0.0, 0.01, 0.09, 1.0), clip=1.0, r=0.01)
    torch.testing.assert_close(w, X(1.0, 1 / 0.51, 1 / 0.19, 101 / 102))
    torch.testing.assert_close(psac_weight(X(0.3), clip=2.0, r=0.1), X(2.0 / (0.3 + 0.1 / 0.4)))


def test_psac_is_not_the_operator_precedence_misreading():
    # ``x + 0.01/x + 0.01`` (a published bug) gives w(0.01) = 1/1.02 and w -> 0 as x -> 0.
    x = X(0.01, 1e-6)
    w = psac_weight(x, clip=1.0, r=0.01)
    wrong = 1.0 / (x + 0.01 / x + 0.01)
    assert float(w[0]) == pytest.approx(1 / 0.51) and float(wrong[0]) == pytest.approx(1 / 1.02)
    assert float(w[1]) == pytest.approx(1.0, rel=1e-3) and float(wrong[1]) < 1e-3


def test_clip_weight_is_dpsgd_clipping():
    torch.testing.assert_close(clip_weight(X(0.0, 0.5, 2.0), clip=1.0), X(1.0, 1.0, 0.5))


def test_weights_scale_linearly_in_c():
    x = torch.logspace(-4, 3, 50, dtype=torch.float64)
    for name, params in (("auto_s", {"gamma": 0.01}), ("psac", {"r": 0.1})):
        torch.testing.assert_close(WEIGHTS[name](x, 2.5, params), 2.5 * WEIGHTS[name](x, 1.0, params))


# -- shapes the spec states --------------------------------------------------------------------

def test_auto_s_weight_is_monotone_and_amplifies_tiny_gradients():
    x = torch.logspace(-8, 6, 1000, dtype=torch.float64)
    w = auto_s_weight(x, 1.0, 0.01)
    assert bool((w[1:] < w[:-1]).all())
    assert float(w[0]) == pytest.approx(100.0, rel=1e-5)  # C / gamma


@pytest.mark.parametrize("r", [0.01, 0.1, 0.5])
def test_psac_weight_is_non_monotone_with_its_peak_at_sqrt_r_minus_r(r):
    x = torch.linspace(0, 3, 300_001, dtype=torch.float64)
    w = psac_weight(x, 1.0, r)
    peak = math.sqrt(r) - r
    assert float(x[int(w.argmax())]) == pytest.approx(peak, abs=1e-4)
    assert float(w[0]) == pytest.approx(1.0)  # tiny gradients keep their raw size, not C/r
    before, after = w[x <= peak], w[x >= peak]
    assert bool((before[1:] >= before[:-1]).all()) and bool((after[1:] <= after[:-1]).all())
    assert float(w.max()) > float(w[0]) and float(w[-1]) < float(w[0])


@pytest.mark.parametrize("name,params", [("auto_s", {"gamma": 0.01}), ("psac", {"r": 0.01}), ("psac", {"r": 0.5})])
def test_scaled_norm_rises_monotonically_towards_c(name, params):
    x = torch.logspace(-8, 6, 1000, dtype=torch.float64)
    scaled = x * WEIGHTS[name](x, 1.0, params)
    assert bool((scaled[1:] > scaled[:-1]).all()) and float(scaled[-1]) < 1.0


# -- the privacy condition sup x w(x) <= C --------------------------------------------------------

@pytest.mark.parametrize("clip", [0.1, 1.0, 3.0])
@pytest.mark.parametrize("name,params", [("auto_s", {"gamma": 0.01}), ("auto_s", {"gamma": 2.0}),
                                         ("psac", {"r": 0.01}), ("psac", {"r": 0.1}), ("psac", {"r": 4.0}),
                                         ("clip", {})])
def test_sensitivity_is_at_most_c_and_approached(name, params, clip):
    sup = max_scaled_norm(WEIGHTS[name], clip, params)
    assert sup <= clip * (1 + 1e-12)
    assert sup >= clip * (1 - 1e-4)  # the bound is tight: noise sigma*C is not wasted
    assert float(SENSITIVITY_GRID[0]) == 0.0 and float(SENSITIVITY_GRID[-1]) >= 1e100
    assert float(SENSITIVITY_GRID[1]) == pytest.approx(1e-8) and float(SENSITIVITY_GRID[-3]) == pytest.approx(1e6)


def test_a_weight_exceeding_c_is_refused(monkeypatch):
    monkeypatch.setitem(WEIGHTS, "double", lambda x, c, p: 2 * c / (x + 0.01))
    monkeypatch.setitem(WEIGHTS, "nan_at_zero", lambda x, c, p: c / x)  # Auto-V: infinite at x = 0
    for name in ("double", "nan_at_zero"):
        with pytest.raises(BadInput, match="exceeds C"):
            check_sensitivity(name, 1.0, {})
    with pytest.raises(BadInput, match="exceeds C"):
        get_mechanism("psasc")(weight="double")


def test_bad_parameters_are_refused():
    with pytest.raises(BadInput, match="did you mean 'psac'"):
        get_mechanism("psasc")(weight="psca")
    with pytest.raises(BadInput, match="r=0"):
        get_mechanism("psac")(r=0.0)
    with pytest.raises(BadInput, match="gamma"):
        get_mechanism("auto_s")(gamma=-1.0)
    with pytest.raises(BadInput, match="beta"):
        get_mechanism("psasc")(beta=1.0)
    # inf parses as a float from --set: gamma = inf would zero every gradient, r = inf gives NaN weights.
    for name, key, value in (("auto_s", "gamma", 0.0), ("auto_s", "gamma", math.inf), ("psac", "r", math.inf),
                             ("psac", "r", math.nan), ("psasc", "gamma", math.inf), ("psasc", "r", -0.1)):
        with pytest.raises(BadInput, match=f"{key}="):
            get_mechanism(name)(**{key: value})


@pytest.mark.parametrize("name,params", [("auto_s", {"gamma": 1e-35}), ("auto_s", {"gamma": 1e-40}),
                                         ("auto_s", {"gamma": 1e-45}), ("psac", {"r": 1e-300}), ("psac", {"r": 1e300}),
                                         ("psasc", {"weight": "auto_s", "gamma": 1e-40, "beta": 0.0})])
def test_extreme_accepted_parameters_keep_every_contribution_finite_and_within_c(name, params):
    # Accepted because sup x w(x) <= C in float64. In float32 these weights overflow or hit 0/0 (a NaN in
    # the release would reveal that some sample's gradient was exactly zero), and the tiny sample's norm
    # underflows to 0, which gave it weight C/gamma: 7e4 C for gamma = 1e-35.
    mech = get_mechanism(name)(**params)
    torch.manual_seed(0)
    model = GradSampleModule(nn.Linear(3, 2, bias=False), loss_reduction="mean")
    opt = mech.make_optimizer(torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=0.0, max_grad_norm=1.0,
                              expected_batch_size=3, generator=torch.Generator().manual_seed(0))
    x, y = torch.tensor([[0.0, 0.0, 0.0], [1e-30, 0.0, 0.0], [1.0, 2.0, 3.0]]), torch.tensor([0, 1, 1])
    per_sample = _per_sample_grads(model._module, x, y)
    assert float(per_sample[0].norm()) == 0.0 and 0.0 < float(per_sample[1].double().norm()) < 1e-29
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.pre_step()
    summed = torch.cat([p.summed_grad.flatten() for p in opt.params])
    assert bool(torch.isfinite(summed).all())
    # The zero-gradient sample adds nothing and the other two at most C each; float64 is the reference.
    assert float(summed.norm()) <= 2 * (1 + 1e-6)
    expected = sum(WEIGHTS[mech.weight_name](g.double().norm(), 1.0, mech.params) * g.double() for g in per_sample)
    torch.testing.assert_close(summed.double(), expected, rtol=1e-5, atol=1e-6)


# -- the optimizer ---------------------------------------------------------------------------------

def _per_sample_grads(model: nn.Module, x, y) -> list[torch.Tensor]:
    out = []
    for i in range(len(y)):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        out.append(torch.cat([p.grad.flatten() for p in model.parameters()]).clone())
    return out


def _step(mech, x, y, noise=0.0, clip=1.0, gen_seed=0, lr=0.0, base=torch.optim.SGD):
    torch.manual_seed(0)
    model = GradSampleModule(nn.Linear(3, 2), loss_reduction="mean")
    opt = mech.make_optimizer(base(model.parameters(), lr=lr), noise_multiplier=noise,
                              max_grad_norm=clip, expected_batch_size=len(y),
                              generator=torch.Generator().manual_seed(gen_seed))
    return model, opt


@pytest.mark.parametrize("name", ["auto_s", "psac", "psasc"])
def test_summed_gradient_is_the_weighted_sum_of_per_sample_gradients(name):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, generator=g) * torch.tensor([[1e-3], [1e-1], [1.0], [10.0], [1e3]])
    y = torch.tensor([0, 1, 0, 1, 1])
    mech = get_mechanism(name)(**({"beta": 0.0} if name == "psasc" else {}))
    model, opt = _step(mech, x, y, clip=0.7)
    per_sample = _per_sample_grads(model._module, x, y)
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()  # lr 0: the release and its mean in p.grad, the model unchanged
    summed = torch.cat([p.summed_grad.flatten() for p in opt.params])
    norms = torch.stack([gi.norm() for gi in per_sample])
    expected = sum(mech.weight(n, 0.7) * gi for n, gi in zip(norms, per_sample))
    torch.testing.assert_close(summed, expected, rtol=1e-5, atol=1e-7)
    for n in norms:  # each sample's contribution stays within C
        assert float(n * mech.weight(n, 0.7)) <= 0.7 * (1 + 1e-6)
    torch.testing.assert_close(torch.cat([p.grad.flatten() for p in opt.params]), expected / 5, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["auto_s", "psac", "psasc"])
def test_noise_is_sigma_c_whatever_the_batch(name):
    noise = []
    for scale in (1e-3, 1e3):  # tiny and huge gradients: the noise std must not follow them
        x, y = torch.randn(4, 3, generator=torch.Generator().manual_seed(2)) * scale, torch.tensor([0, 1, 1, 0])
        model, opt = _step(get_mechanism(name)(**({"beta": 0.0} if name == "psasc" else {})), x, y,
                           noise=1.3, clip=0.5, gen_seed=9)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()  # lr 0: p.grad holds the released mean
        noise.append(torch.cat([(p.grad * 4 - p.summed_grad.view_as(p)).flatten() for p in opt.params]))
    torch.testing.assert_close(noise[0], noise[1])
    reference = torch.normal(0.0, 1.3 * 0.5, (8,), generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(noise[0], reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("base", [torch.optim.SGD, torch.optim.Adam])
def test_psasc_momentum_is_an_ema_of_the_privatised_gradient(base):
    # With noise, u_1 != u_2; the EMA must average the released (noisy) u_t, not the pre-noise sums.
    # Under Adam too (IMDb's recipe): the EMA once sat in Adam's state, which Adam then took as initialised.
    x, y = torch.randn(4, 3, generator=torch.Generator().manual_seed(3)), torch.tensor([0, 1, 1, 0])
    grads = {}
    for beta in (0.0, 0.9):
        # lr 0: the same parameters each step, and the same noise stream for both betas
        model, opt = _step(get_mechanism("psasc")(beta=beta), x, y, noise=1.0, gen_seed=4, base=base)
        seen = []
        for _ in range(2):
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            seen.append(torch.cat([p.grad.flatten() for p in opt.params]))
            opt.zero_grad(set_to_none=True)
        grads[beta] = seen
    u1, u2 = grads[0.0]
    assert not torch.allclose(u1, u2)
    torch.testing.assert_close(grads[0.9][0], 0.1 * u1)  # v_1 = (1 - beta) u_1, from v_0 = 0
    torch.testing.assert_close(grads[0.9][1], 0.9 * 0.1 * u1 + 0.1 * u2)  # v_2 = beta v_1 + (1 - beta) u_2


# -- accounting: the scaling family is DP-SGD's sampled Gaussian ----------------------------------

def test_eps_and_calibration_equal_dpsgd():
    dpsgd = get_mechanism("dpsgd")()
    for name, params in (("auto_s", {}), ("psac", {}), ("psasc", {}), ("psasc", {"beta": 0.5})):
        mech = get_mechanism(name)(**params)
        assert mech.accountant == "sgm-rdp" and mech.rdp_only_reason is None  # so eps_prv and eps_pld are DP-SGD's too
        for sigma, q, steps in ((1.0, 0.01, 1000), (0.7, 0.1, 50), (2.5, 512 / 60000, 1171)):
            ours = account(mech, sigma, q, steps, 1e-5, with_others=False)
            ref = account(dpsgd, sigma, q, steps, 1e-5, with_others=False)
            assert ours.eps == ref.eps and ours.eps_classic == ref.eps_classic and ours.alpha == ref.alpha
    assert calibrate(get_mechanism("psasc")(), 3.0, 0.01, 500, 1e-5) == calibrate(dpsgd, 3.0, 0.01, 500, 1e-5)


# -- through the shared loop -----------------------------------------------------------------------

def _params_after(mech_name: str, steps: int = 4, **mech_params) -> torch.Tensor:
    c = dataclasses.replace(resolve({"mech": mech_name, "dataset": "synthetic", "eps": 3.0, "steps": steps}),
                            momentum=0.0, clip=1.0, lr=0.5)
    out = train(c, get_mechanism(mech_name)(**mech_params), DATA, 1.0, steps, torch.device("cpu"),
                show_progress=False)
    return torch.cat([p.detach().flatten() for p in out.model.parameters()])


def test_psasc_differs_from_psac_only_by_the_momentum():
    torch.testing.assert_close(_params_after("psasc", beta=0.0), _params_after("psac"), rtol=0, atol=0)
    assert not torch.equal(_params_after("psasc"), _params_after("psac"))


def test_psasc_with_the_clip_weight_and_no_momentum_is_dpsgd():
    # Opacus' clip factor is C/(x + 1e-6); ours is exactly C/x, hence the tolerance.
    torch.testing.assert_close(_params_after("psasc", weight="clip", beta=0.0), _params_after("dpsgd"),
                               rtol=1e-4, atol=1e-5)


def test_caveat_labels_psasc_as_a_reconstruction():
    assert "abstract-level reconstruction" in get_mechanism("psasc").caveat
    assert "unverified" in get_mechanism("psasc").caveat
    assert get_mechanism("psac").caveat is None and get_mechanism("auto_s").caveat is None
    assert scaling.PSASC.__doc__ and "abstract-level reconstruction" in scaling.PSASC.__doc__


def test_psasc_end_to_end_through_the_cli():
    runner = CliRunner()
    quick = ["--dataset", "synthetic", "--steps", "4", "--eps", "2", "--quiet"]
    res = runner.invoke(app, ["run", "--mech", "psasc", *quick, "--set", "beta=0.8"])
    assert res.exit_code == 0, res.output
    assert runner.invoke(app, ["run", "--mech", "dpsgd", *quick]).exit_code == 0
    psasc, dpsgd = list(csv.DictReader(open("results/runs.csv")))
    assert psasc["mech"] == "psasc" and psasc["accountant"] == "sgm-rdp"
    assert float(psasc["eps_spent"]) <= 2.0 and 0.0 <= float(psasc["test_acc"]) <= 1.0
    assert psasc["eps_spent"] == dpsgd["eps_spent"] and psasc["noise_multiplier"] == dpsgd["noise_multiplier"]
    assert json.loads(psasc["mech_params"]) == {"weight": "psac", "r": 0.1, "gamma": 0.01, "beta": 0.8}
    assert "--set beta=0.8" in psasc["command"]
    listing = runner.invoke(app, ["ls", "mechanisms"], env={"COLUMNS": "250"})
    assert listing.exit_code == 0 and "abstract-level" in listing.output
    bad = runner.invoke(app, ["run", "--mech", "psasc", *quick, "--set", "weight=psca"])
    assert bad.exit_code == 2 and "psac" in bad.output
