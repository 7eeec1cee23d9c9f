"""ModelMix: clipping, gap rule, mixing, secrecy of the mixing weights, and a run end to end."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from opacus import GradSampleModule
from typer.testing import CliRunner

import dpbench.mechanisms.modelmix as modelmix_module
from dpbench.checkpoint import Checkpointer
from dpbench.cli import app
from dpbench.config import resolve
from dpbench.data import load_dataset
from dpbench.engine import train
from dpbench.runstate import make_generator
from dpbench.errors import BadInput
from dpbench.mechanisms import get_mechanism
from dpbench.mechanisms.base import TrainContext
from dpbench.mechanisms.modelmix import ModelMix, StateMixer, mix, push_apart
from dpbench.models import build_model

runner = CliRunner()
CPU = torch.device("cpu")


def states(n: int = 2000, equal: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    current = torch.randn(n, dtype=torch.float64, generator=g)
    previous = current + 0.02 * torch.randn(n, dtype=torch.float64, generator=g)
    previous[:equal] = current[:equal]
    return current, previous


def test_push_apart_makes_every_gap_at_least_tau_and_moves_only_close_pairs():
    current, previous = states()
    tau = 0.015
    a, b = push_apart(current, previous, tau)
    assert ((a - b).abs() >= tau).all()
    far = (current - previous).abs() >= tau * 1.001
    assert far.any() and (~far).any()
    assert torch.equal(a[far], current[far]) and torch.equal(b[far], previous[far])
    torch.testing.assert_close((a + b) / 2, (current + previous) / 2)  # symmetric push
    assert ((a - b)[~far].abs() <= tau * 1.001).all()  # the code's rule: new gap is tau, not old + tau
    moved = (current != previous) & ~far
    assert torch.equal(torch.sign(a - b)[moved], torch.sign(current - previous)[moved])
    assert (a[:200] > b[:200]).all()  # sign(0) = +1: equal coordinates are separated too


def test_mixed_point_lies_between_the_pushed_states_with_fresh_uniform_weights():
    current, previous = states()
    a, b = push_apart(current, previous, 0.015)
    g = torch.Generator().manual_seed(1)
    m1, m2 = mix(a, b, g), mix(a, b, g)
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    for m in (m1, m2):
        assert ((m >= lo - 1e-12) & (m <= hi + 1e-12)).all()
    t1, t2 = (m1 - b) / (a - b), (m2 - b) / (a - b)
    assert 0.45 < float(t1.mean()) < 0.55 and float(t1.min()) < 0.01 and float(t1.max()) > 0.99
    assert float((t1 - t2).abs().mean()) > 0.2  # a second draw is fresh


def tiny_optimizer(p: int = 4, clip: float = 1.0, lr: float = 0.1, batch: int = 5):
    model = GradSampleModule(nn.Linear(6, 3), batch_first=True, loss_reduction="mean")
    mech = ModelMix(p=p, gamma=0.5)
    opt = mech.make_optimizer(torch.optim.SGD(model.parameters(), lr=lr), noise_multiplier=0.0,
                              max_grad_norm=clip, expected_batch_size=batch, generator=None)
    x = 10 * torch.randn(batch, 6, generator=torch.Generator().manual_seed(2))
    y = torch.arange(batch) % 3
    nn.functional.cross_entropy(model(x), y).backward()
    return model, opt


def expected_clipped_sum(model: GradSampleModule, p: int, clip: float) -> list[torch.Tensor]:
    samples = [q.grad_sample.clone() for q in model.parameters()]
    norms = torch.stack([s.flatten(1).norm(dim=1) for s in samples], dim=1).norm(dim=1)
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    bound = clip / math.sqrt(p)
    per_sample = [(s * factor.view(-1, *[1] * (s.dim() - 1))).clamp(-bound, bound) for s in samples]
    flat = torch.cat([s.flatten(1) for s in per_sample], dim=1)
    assert (flat.norm(dim=1) <= clip * (1 + 1e-6)).all() and (flat.abs() <= bound + 1e-7).all()
    assert (flat.abs() >= bound - 1e-6).any()  # the l-infinity step is active in this example
    return [s.sum(0) for s in per_sample]


def test_clipping_is_l2_then_l_infinity():
    model, opt = tiny_optimizer(p=4, clip=1.0)
    expected = expected_clipped_sum(model, p=4, clip=1.0)
    opt.clip_and_accumulate()
    for q, e in zip(opt.params, expected):
        torch.testing.assert_close(q.summed_grad, e)


def test_step_is_the_noisy_gradient_from_the_mixed_point(monkeypatch):
    model, opt = tiny_optimizer(p=4, clip=1.0, lr=0.1)
    current = [q.detach().clone() for q in opt.params]
    previous = [c + 0.01 * torch.randn_like(c) for c in current]
    previous[1][0] = current[1][0]  # one equal coordinate
    mixer = StateMixer([t.clone() for t in previous], torch.Generator().manual_seed(3))
    mixer.gamma = 0.5  # tau = 0.05 with lr 0.1: every pair here is closer than tau
    opt.mechanism.mixer = mixer
    drawn: list[torch.Tensor] = []
    original = modelmix_module.draw_mixing_weights
    monkeypatch.setattr(modelmix_module, "draw_mixing_weights", lambda like, g: drawn.append(original(like, g)) or drawn[-1])
    opt.step()
    assert len(drawn) == len(current)
    for q, cur, prev, alpha in zip(opt.params, current, previous, drawn):
        a, b = push_apart(cur.double(), prev.double(), 0.05)
        assert ((a - b).abs() >= 0.05).all()
        expected = torch.lerp(b, a, alpha) - 0.1 * q.grad.double()  # q.grad: (clipped sum + noise) / B
        torch.testing.assert_close(q.detach().double(), expected, rtol=0, atol=1e-6)
    for stored, cur in zip(mixer.previous, current):
        assert torch.equal(stored, cur)  # the stored previous state is the un-pushed w_{k-1}


def test_the_step_releases_the_noise_and_uniform_width_the_accountant_charges(monkeypatch):
    """In units of lr * C / B, the step's Gaussian has std z and its uniform a width >= rho of ``phases``."""
    z, clip, batch, lr, gamma, p = 3.0, 0.5, 7, 0.2, 0.3, 400
    model = GradSampleModule(nn.Linear(200, 50), batch_first=True, loss_reduction="mean")
    mech = ModelMix(p=p, gamma=gamma, gamma_decay=1.0)
    mech.bind(batch_size=batch, clip=clip)
    opt = mech.make_optimizer(torch.optim.SGD(model.parameters(), lr=lr), noise_multiplier=z, max_grad_norm=clip,
                              expected_batch_size=batch, generator=torch.Generator().manual_seed(5))
    x = torch.randn(5, 200, generator=torch.Generator().manual_seed(6))  # 5 records drawn, B = 7 expected
    nn.functional.cross_entropy(model(x), torch.arange(5) % 50).backward()
    clipped_sum = expected_clipped_sum(model, p=p, clip=clip)
    current = [q.detach().clone() for q in opt.params]
    previous = [c + 0.01 * torch.randn(c.shape, generator=torch.Generator().manual_seed(7)) for c in current]
    mech.mixer = StateMixer([t.clone() for t in previous], torch.Generator().manual_seed(8))
    mech.begin_step(TrainContext(cfg=None, model=model, optimizer=opt, train_x=x, train_y=x, criterion=None,
                                 noise_multiplier=z, sample_rate=0.1, steps=10, physical_batch_size=5, device=CPU,
                                 make_generator=None), 0)
    drawn: list[torch.Tensor] = []
    original = modelmix_module.draw_mixing_weights
    monkeypatch.setattr(modelmix_module, "draw_mixing_weights", lambda like, g: drawn.append(original(like, g)) or drawn[-1])
    opt.step()
    unit = lr * clip / batch  # one unit of the accountant's normalised release
    noise = torch.cat([(q.grad * batch - s).flatten() for q, s in zip(opt.params, clipped_sum)])
    assert float(noise.std()) / clip == pytest.approx(z, rel=0.03)  # N(0, z^2 C^2) on the sum, then / B
    widths = []
    for q, cur, prev, alpha in zip(opt.params, current, previous, drawn):
        # the push is symmetric about the midpoint, so the release gives back the interval it was mixed on:
        # m - (cur + prev)/2 = (alpha - 1/2) * (a - b)
        mix_point = q.detach().double() + lr * q.grad.double()  # the release minus the noisy step
        away = (alpha - 0.5).abs() > 0.1
        widths.append(((mix_point - (cur.double() + prev.double()) / 2) / (alpha - 0.5))[away].abs())
    (_, accounted_rho), _ = mech.phases(10)
    assert accounted_rho == pytest.approx(gamma * batch / clip)
    widths_in_units = torch.cat(widths) / unit
    assert float(widths_in_units.min()) >= accounted_rho * (1 - 1e-3)
    assert float(widths_in_units.min()) <= accounted_rho * 1.01  # the close pairs were pushed to exactly tau


def synthetic_ctx(monkeypatch=None, model_factory=None, **options) -> tuple[ModelMix, TrainContext]:
    cfg = resolve({"mech": "modelmix", "dataset": "synthetic", "eps": 2.0, "steps": 4, **options})
    data = load_dataset("synthetic")
    mech = get_mechanism("modelmix")(**cfg.mech_params)
    torch.manual_seed(0)
    module = model_factory() if model_factory else build_model(cfg.model, data.input_shape, data.num_classes)
    model = GradSampleModule(module, batch_first=True, loss_reduction="mean")
    opt = mech.make_optimizer(torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum),
                              noise_multiplier=0.0, max_grad_norm=cfg.clip, expected_batch_size=cfg.batch_size,
                              generator=None)
    ctx = TrainContext(cfg=cfg, model=model, optimizer=opt, train_x=data.train_x, train_y=data.train_y,
                       criterion=nn.CrossEntropyLoss(), noise_multiplier=0.0, sample_rate=cfg.sample_rate(512),
                       steps=4, physical_batch_size=64, device=CPU,
                       make_generator=lambda purpose: make_generator(cfg.seed, purpose, CPU, cfg.secure),
                       build_model=model_factory or (lambda: build_model(cfg.model, data.input_shape, data.num_classes)))
    return mech, ctx


def test_two_independent_initialisations():
    mech, ctx = synthetic_ctx()
    mech.setup(ctx)
    params = [p.detach() for p in ctx.model.parameters()]
    assert len(mech.mixer.previous) == len(params)
    for prev, cur in zip(mech.mixer.previous, params):
        assert prev.shape == cur.shape and not (prev == cur).any()
    again, ctx2 = synthetic_ctx()
    again.setup(ctx2)
    assert all(torch.equal(a, b) for a, b in zip(mech.mixer.previous, again.mixer.previous))
    other, ctx3 = synthetic_ctx(seed=1)
    other.setup(ctx3)
    assert not torch.equal(mech.mixer.previous[0], other.mixer.previous[0])


def test_every_parameter_is_mixed_normalisation_layers_too(monkeypatch):
    def factory() -> nn.Module:
        return nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))

    mech, ctx = synthetic_ctx(model_factory=factory, lr=0.1, mech_params={"gamma": 0.02})
    mech.setup(ctx)
    mech.begin_step(ctx, 0)  # gamma 0.02, lr 0.1: tau = 0.002
    norm_weight = ctx.model._module[1].weight
    assert len(mech.mixer.previous) == len(list(ctx.model.parameters())) == 6
    assert torch.equal(norm_weight.detach(), torch.ones(4))  # both initialisations equal: gap 0
    ctx.criterion(ctx.model(ctx.train_x[:8]), ctx.train_y[:8]).backward()
    ctx.optimizer.step()
    shift = norm_weight.detach() + 0.1 * norm_weight.grad - 1.0  # the mix point minus the unmixed state
    assert (shift.abs() <= 0.001 + 1e-6).all() and (shift.abs() > 0).all()


def test_gamma_schedule_is_the_accounted_one(monkeypatch):
    gammas: list[float] = []
    original = StateMixer.update
    monkeypatch.setattr(StateMixer, "update", lambda self, params, lrs: gammas.append(self.gamma) or original(self, params, lrs))
    cfg = resolve({"mech": "modelmix", "dataset": "synthetic", "eps": 2.0, "steps": 5, "mech_params": {"gamma": 0.1}})
    mech = get_mechanism("modelmix")(**cfg.mech_params)
    mech.bind(batch_size=cfg.batch_size, clip=cfg.clip)
    train(cfg, mech, load_dataset("synthetic"), 1.0, 5, CPU, show_progress=False)
    (n1, rho1), (n2, rho2) = mech.phases(5)
    assert gammas == [0.1] * n1 + [0.05] * n2
    assert rho1 == pytest.approx(0.1 * cfg.batch_size / cfg.clip) and rho2 == pytest.approx(rho1 / 2)


def test_mixing_weights_are_fresh_and_absent_from_state_and_checkpoints(monkeypatch, tmp_path):
    drawn: list[torch.Tensor] = []
    original = modelmix_module.draw_mixing_weights
    monkeypatch.setattr(modelmix_module, "draw_mixing_weights", lambda like, g: drawn.append(original(like, g)) or drawn[-1])
    cfg = resolve({"mech": "modelmix", "dataset": "synthetic", "eps": 2.0, "steps": 3, "secure": True})
    mech = get_mechanism("modelmix")(**cfg.mech_params)
    mech.bind(batch_size=cfg.batch_size, clip=cfg.clip)
    ckpt = Checkpointer(tmp_path / "ckpt.pt", every_s=0.0, secure=True)
    outcome = train(cfg, mech, load_dataset("synthetic"), 1.0, 3, CPU, show_progress=False, checkpointer=ckpt)
    n_params = len(list(outcome.model.parameters()))
    assert len(drawn) == 3 * n_params
    first = drawn[0]
    assert not torch.equal(first, drawn[n_params]) and not torch.equal(first, drawn[2 * n_params])
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert "generators" not in saved and set(saved["mechanism"]) == {"previous"}

    def tensors(obj):
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, dict):
            for v in obj.values():
                yield from tensors(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                yield from tensors(v)

    kept = list(tensors(saved)) + list(tensors(mech.state_dict())) + list(tensors(outcome.model.state_dict()))
    kept += list(tensors(vars(mech.mixer))) + [t for t in vars(mech).values() if isinstance(t, torch.Tensor)]
    for alpha in drawn:
        for t in kept:
            assert not (t.shape == alpha.shape and torch.allclose(t.double(), alpha)), "a mixing weight was kept"


def test_setup_refuses_momentum_and_adam():
    for options in ({"momentum": 0.9}, {"optimizer": "adam"}):
        mech, ctx = synthetic_ctx(**options)
        with pytest.raises(BadInput, match="plain SGD"):
            mech.setup(ctx)


def test_canary_is_p_coordinates_at_c_over_sqrt_p():
    mech = ModelMix(p=9)
    direction = [torch.randn(4, 5, generator=torch.Generator().manual_seed(4)), torch.randn(7)]
    canary = mech.canary_contribution(direction, clip=3.0)
    flat = torch.cat([c.reshape(-1) for c in canary])
    assert [c.shape for c in canary] == [d.shape for d in direction]
    assert int((flat != 0).sum()) == 9 and float(flat.abs().max()) == pytest.approx(1.0)
    assert float(flat.norm()) == pytest.approx(3.0)


def rows(path: str = "results/runs.csv") -> list[dict]:
    return list(csv.DictReader(open(path))) if Path(path).exists() else []


def test_run_end_to_end_through_the_cli(monkeypatch):
    drawn: list[torch.Tensor] = []
    original = modelmix_module.draw_mixing_weights
    monkeypatch.setattr(modelmix_module, "draw_mixing_weights", lambda like, g: drawn.append(original(like, g)) or drawn[-1])
    res = runner.invoke(app, ["run", "--mech", "modelmix", "--dataset", "synthetic", "--eps", "2", "--steps", "6",
                              "--set", "gamma=0.2", "--secure", "--quiet"])
    assert res.exit_code == 0, res.output
    (row,) = rows()
    assert row["mech"] == "modelmix" and row["accountant"] == "modelmix-rdp" and row["eps_prv"] == ""
    assert float(row["eps_spent"]) <= 2.0 <= float(row["eps_classic"])
    assert float(row["eps_rdp"]) > 2 * float(row["eps_spent"])  # what the mixing is credited with
    assert json.loads(row["mech_params"]) == {"gamma": 0.2, "gamma_decay": 0.5, "p": 100}
    assert float(row["momentum"]) == 0.0 and int(row["steps"]) == 6 and row["secure"] == "True"
    assert 0.0 <= float(row["test_acc"]) <= 1.0
    record_text = Path("results/runs", row["run_id"] + ".json").read_text()
    csv_text = Path("results/runs.csv").read_text()
    assert drawn and "mixing" not in record_text
    for value in torch.cat([d.reshape(-1) for d in drawn])[:200].tolist():
        assert repr(value)[:10] not in record_text and repr(value)[:10] not in csv_text
    # the account command gives the same eps for the noise the run used
    res = runner.invoke(app, ["account", "--mech", "modelmix", "--dataset", "synthetic", "--steps", "6",
                              "--sigma", row["noise_multiplier"], "--set", "gamma=0.2", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["eps"] == pytest.approx(float(row["eps_spent"]), rel=1e-9)


def test_run_with_momentum_exits_2_and_writes_nothing():
    res = runner.invoke(app, ["run", "--mech", "modelmix", "--dataset", "synthetic", "--eps", "2", "--steps", "2",
                              "--momentum", "0.9", "--quiet"])
    assert res.exit_code == 2 and "momentum" in res.output
    assert rows() == []


def test_every_benchmark_pair_gives_modelmix_a_recipe_it_accepts():
    """Tuning keeps a recipe's optimizer: an Adam recipe (IMDb's) would fail every ModelMix trial."""
    import tomllib

    from dpbench.recipes import recipe_for

    specs = sorted((Path(__file__).parents[2] / "benchmarks" / "benchmark").glob("*.toml"))
    assert specs
    for spec in specs:
        grid = tomllib.loads(spec.read_text())["grid"]
        if "modelmix" not in grid["mech"]:
            continue
        for dataset in grid["dataset"]:
            for model in grid["model"]:
                assert recipe_for(dataset, "modelmix", model).optimizer == "sgd", (spec.name, dataset, model)
