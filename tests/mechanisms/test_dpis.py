"""DPIS-core (specs/dpis.md §1.3, §3.1(b), §3.2): the importance sampler, its estimator, its noise, end to end."""

from __future__ import annotations

import csv
import json
import math
import zlib
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from opacus import GradSampleModule
from typer.testing import CliRunner

from dpbench.cli import app
from dpbench.config import resolve
from dpbench.data import load_dataset
from dpbench.engine import train
from dpbench.mechanisms import get_mechanism
from dpbench.mechanisms.base import TrainContext
from dpbench.mechanisms.dpis import MIN_CLIP_FRACTION, DPIS, inclusion_probabilities

N, FEATURES, CLASSES, BATCH, CLIP = 24, 40, 25, 6, 1.0


def make_problem(seed: int = 0, noise: float = 0.0, clip: float = CLIP, purposes: list[str] | None = None,
                 **params) -> tuple[DPIS, TrainContext]:
    """A linear model without bias on N records, one of which (x = 0) has a zero gradient.

    ``purposes``, when given, collects the name of every generator the mechanism asks the run for.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, FEATURES, generator=g) * torch.linspace(0.05, 2.0, N)[:, None]  # spread-out norms
    x[3] = 0.0
    y = torch.randint(0, CLASSES, (N,), generator=g)
    torch.manual_seed(seed)
    model = GradSampleModule(nn.Linear(FEATURES, CLASSES, bias=False), batch_first=True, loss_reduction="mean")
    params.setdefault("adaptive_clip", False)  # the step at a fixed C; adaptive clipping has its own tests
    mech = get_mechanism("dpis")(**params)
    optimizer = mech.make_optimizer(torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=noise,
                                    max_grad_norm=clip, expected_batch_size=BATCH,
                                    generator=torch.Generator().manual_seed(seed + 1))
    cfg = resolve(dict(mech="dpis", dataset="synthetic", eps=1.0, batch_size=BATCH, clip=clip, steps=1))

    def make_generator(purpose: str) -> torch.Generator:
        if purposes is not None:
            purposes.append(purpose)
        return torch.Generator().manual_seed(zlib.crc32(f"{seed}/{purpose}".encode()))

    ctx = TrainContext(cfg=cfg, model=model, optimizer=optimizer, train_x=x, train_y=y, criterion=nn.CrossEntropyLoss(),
                       noise_multiplier=noise, sample_rate=BATCH / N, steps=1, physical_batch_size=8,
                       device=torch.device("cpu"), make_generator=make_generator)
    mech.setup(ctx)
    return mech, ctx


def per_sample_clipped(ctx: TrainContext, clip: float = CLIP) -> torch.Tensor:
    """(N, d) clipped per-sample gradients, straight from autograd, one record at a time."""
    rows = []
    module = ctx.model._module
    ctx.model.disable_hooks()  # plain autograd, independent of Opacus' per-sample machinery
    for i in range(N):
        module.zero_grad()
        loss = ctx.criterion(module(ctx.train_x[i:i + 1]), ctx.train_y[i:i + 1])
        (grad,) = torch.autograd.grad(loss, [module.weight])
        rows.append(grad.flatten() * min(1.0, clip / max(float(grad.norm()), 1e-30)))
    ctx.model.enable_hooks()
    module.zero_grad(set_to_none=True)
    return torch.stack(rows)


def estimate(ctx: TrainContext, candidates: torch.Tensor) -> torch.Tensor:
    """One optimizer step's gradient estimate p.grad for a candidate set, as the loop computes it."""
    opt = ctx.optimizer
    if len(candidates):
        ctx.criterion(ctx.model(ctx.train_x[candidates]), ctx.train_y[candidates]).backward()
    else:  # the loop's empty-batch path
        for p in opt.params:
            p.grad_sample = torch.zeros((0, *p.shape))
    opt.step()  # the release and the update (lr 0): p.grad holds the estimate
    out = torch.cat([p.grad.flatten().clone() for p in opt.params])
    opt.zero_grad(set_to_none=True)
    return out


def test_every_inclusion_probability_is_at_most_q_cap():
    mech, ctx = make_problem(r_hat=0.3)
    rates = mech.rates(BATCH / N)
    floor = mech.floor(CLIP, BATCH)
    norms = torch.cat([torch.rand(1000) * CLIP, torch.full((10,), CLIP), torch.zeros(3)])
    for k_hat in (floor, 1.5 * floor, 40 * floor):
        overall = rates.candidate_rate * inclusion_probabilities(norms, k_hat, BATCH, rates.candidate_rate)
        assert float(overall.max()) <= rates.q_cap * (1 + 1e-6)
        assert torch.all(overall[-3:] == 0)
    assert float((rates.candidate_rate * inclusion_probabilities(norms, floor, BATCH, rates.candidate_rate)).max()) \
        == pytest.approx(rates.q_cap)


def test_released_normaliser_is_floored_and_matches_the_norm_sum():
    # Full pass with a negligible sigma_K: K~ is the exact sum of clipped norms; the floor applies on top.
    mech, ctx = make_problem(candidate_rate=1, sigma_k=1e-9, r_hat=0.5)
    mech.begin_step(ctx, 0)
    expected = float(per_sample_clipped(ctx).norm(dim=1).sum())
    (entry,) = mech.trace
    assert entry["k_tilde"] == pytest.approx(expected, rel=1e-5)
    assert entry["k_hat"] == max(entry["k_tilde"], mech.floor(CLIP, BATCH)) == mech.k_hat
    # A huge sigma_K often releases K~ far below the floor (even negative): K^ never goes below it.
    mech, ctx = make_problem(sigma_k=1e6)
    for step in range(20):
        mech.begin_step(ctx, step)
    assert min(t["k_tilde"] for t in mech.trace) < mech.floor(CLIP, BATCH)
    assert all(t["k_hat"] >= mech.floor(CLIP, BATCH) for t in mech.trace)
    assert all(p.grad_sample is None and p.grad is None for p in ctx.optimizer.params)  # the norm pass cleans up


def test_every_kept_term_has_norm_k_hat_over_b():
    mech, ctx = make_problem(candidate_rate=1, sigma_k=math.inf)
    norms = per_sample_clipped(ctx).norm(dim=1)
    for i in (0, 5, 23):
        mech.k_hat = BATCH * float(norms[i])  # probability exactly 1 for this candidate
        grad = estimate(ctx, torch.tensor([i]))
        assert mech.drawn_per_step[-1] == 1
        assert float(grad.norm()) * N == pytest.approx(mech.k_hat / BATCH, rel=1e-5)


@pytest.mark.parametrize("params,k_hat_factor", [
    (dict(sigma_k=math.inf, r_hat=0.5), 1.0),  # two-stage, floor binds
    (dict(sigma_k=math.inf, candidate_rate=0.9, q_cap=0.5), 1.7),  # two-stage, K^ above the floor
    (dict(sigma_k=math.inf, candidate_rate=1, r_hat=0.8), 1.0),  # exact full pass
])
def test_noiseless_estimate_is_unbiased_for_the_mean_clipped_gradient(params, k_hat_factor):
    mech, ctx = make_problem(**params)
    rates = mech.rates(BATCH / N)
    clipped = per_sample_clipped(ctx)
    target = clipped.sum(0) / N
    k_hat = k_hat_factor * mech.floor(CLIP, BATCH)
    sampler = mech.make_sampler(N, BATCH / N, 1500, torch.Generator().manual_seed(7))
    total = torch.zeros_like(target)
    trials = 0
    for indices in sampler:
        mech.begin_step(ctx, trials)
        mech.k_hat = k_hat
        total += estimate(ctx, torch.as_tensor(indices, dtype=torch.long))
        trials += 1
    mean = total / trials
    # Exact variance of one estimate: each record enters independently w.p. pi_i = B n_i / K^ with weight 1/pi_i.
    pi = (BATCH * clipped.norm(dim=1) / k_hat).clamp(max=1.0)
    assert float(pi.max()) <= rates.q_cap * (1 + 1e-6)
    live = pi > 0
    var = (clipped[live] ** 2 * ((1 - pi[live]) / pi[live])[:, None]).sum(0) / N**2
    z = (mean - target) / (var / trials).sqrt().clamp(min=1e-12)
    assert float(z.abs().max()) < 5.0, float(z.abs().max())  # d = 1000 coordinates: P(max |z| > 5) ~ 6e-4
    assert not live[3] and torch.isfinite(mean).all()  # the zero-gradient record is never drawn
    drawn = torch.tensor(mech.drawn_per_step, dtype=torch.float64)
    assert float(drawn.mean()) == pytest.approx(float(pi.sum()), rel=0.1)


def test_noise_scale_is_sigma_g_k_hat_over_b_whatever_the_batch():
    # Same generator, same K^, different data and sizes: the noise draws must coincide. Recover each noise as
    # N * grad minus the kept terms by re-running the step without noise on the same draw.
    reference = None
    for candidates in (torch.arange(0, 12), torch.arange(12, 24), torch.tensor([3]), torch.tensor([], dtype=torch.long)):
        mech, ctx = make_problem(sigma_k=math.inf, candidate_rate=1, noise=2.5)
        mech.k_hat = 3.0 * mech.floor(CLIP, BATCH)
        noisy = estimate(ctx, candidates) * N
        mech, ctx = make_problem(sigma_k=math.inf, candidate_rate=1, noise=0.0)
        mech.k_hat = 3.0 * mech.floor(CLIP, BATCH)
        noise = noisy - estimate(ctx, candidates) * N
        if reference is None:
            reference = noise
            sigma = 2.5 * mech.k_hat / BATCH
            assert float(noise.std()) == pytest.approx(sigma, rel=0.1)  # 1000 coordinates
        torch.testing.assert_close(noise, reference, rtol=1e-4, atol=1e-4)


def test_empty_candidate_set_and_empty_draw_release_only_noise():
    mech, ctx = make_problem(sigma_k=math.inf, noise=1.0)
    mech.k_hat = mech.floor(CLIP, BATCH)
    grad = estimate(ctx, torch.tensor([], dtype=torch.long))
    assert torch.isfinite(grad).all() and float(grad.abs().sum()) > 0 and mech.drawn_per_step[-1] == 0
    mech_quiet, ctx_quiet = make_problem(sigma_k=math.inf, noise=0.0)
    mech_quiet.k_hat = 1e12  # every probability is ~0: candidates, but nothing drawn
    assert float(estimate(ctx_quiet, torch.arange(N)).abs().sum()) == 0.0
    assert mech_quiet.drawn_per_step[-1] == 0
    # Only the zero-gradient record as candidate: never drawn, never divided by.
    mech_quiet.k_hat = mech_quiet.floor(CLIP, BATCH)
    assert float(estimate(ctx_quiet, torch.tensor([3, 3, 3])).abs().sum()) == 0.0


def test_overall_inclusion_rate_is_the_accountants_sample_rate_including_the_candidate_stage():
    # Two records with disjoint features (so each kept one is visible in its own columns of W), all others zero.
    mech, ctx = make_problem(sigma_k=math.inf, candidate_rate=0.8, q_cap=0.4)
    g = torch.Generator().manual_seed(11)
    ctx.train_x.zero_()
    ctx.train_x[0, :20] = 3.0 * torch.randn(20, generator=g)  # clipped: n = C, the accountant's worst case
    ctx.train_x[1, 20:] = 0.12 * torch.randn(20, generator=g)  # n < C
    norms = per_sample_clipped(ctx).norm(dim=1)
    assert float(norms[0]) == pytest.approx(CLIP) and 0.2 < float(norms[1]) < 0.8 * CLIP
    q = BATCH / N
    q_cap = mech.sample_rate(q)
    assert q_cap == pytest.approx(0.4)
    steps = 3000
    kept = torch.zeros(2)
    for step, indices in enumerate(mech.make_sampler(N, q, steps, torch.Generator().manual_seed(5))):
        mech.begin_step(ctx, step)  # sigma_K = inf: K^ is the floor, where a clipped record's rate is exactly q_cap
        grad = estimate(ctx, torch.as_tensor(indices, dtype=torch.long)).view(CLASSES, FEATURES)
        kept += torch.tensor([float(grad[:, :20].abs().sum() > 0), float(grad[:, 20:].abs().sum() > 0)])
    for freq, rate in zip(kept / steps, (q_cap, q_cap * float(norms[1]) / CLIP)):
        assert abs(float(freq) - rate) < 5 * math.sqrt(rate * (1 - rate) / steps), (float(freq), rate)


def test_with_cap_q_and_every_record_clipped_a_step_is_exactly_dpsgd():
    # sigma_K = inf and q_cap = candidate_rate = q: K^ = N C, each clipped candidate is kept w.p. 1 with a term of
    # norm N C / B, noise sigma N C / B, divided by N; DP-SGD on the same batch and noise draw gives the same update.
    clip, noise, batch = 0.01, 1.3, torch.tensor([0, 3, 5, 11, 17, 23])
    mech, ctx = make_problem(noise=noise, clip=clip, sigma_k=math.inf, q_cap=BATCH / N, candidate_rate=BATCH / N)
    norms = per_sample_clipped(ctx, clip).norm(dim=1)
    assert torch.allclose(norms[norms > 0], torch.tensor(clip)) and float(norms[3]) == 0.0
    mech.begin_step(ctx, 0)
    assert mech.k_hat == pytest.approx(N * clip)
    dpis_grad = estimate(ctx, batch)
    assert mech.drawn_per_step[-1] == len(batch) - 1  # all but the zero-gradient record
    _, ctx2 = make_problem(noise=noise, clip=clip, sigma_k=math.inf)  # same initial model
    dpsgd = get_mechanism("dpsgd")().make_optimizer(torch.optim.SGD(ctx2.model.parameters(), lr=0.0),
                                                    noise_multiplier=noise, max_grad_norm=clip,
                                                    expected_batch_size=BATCH, generator=torch.Generator().manual_seed(1))
    ctx2.criterion(ctx2.model(ctx2.train_x[batch]), ctx2.train_y[batch]).backward()
    dpsgd.step()  # lr 0: p.grad holds DP-SGD's released mean
    torch.testing.assert_close(dpis_grad, torch.cat([p.grad.flatten() for p in dpsgd.params]), rtol=1e-4, atol=1e-7)


def test_canary_is_a_kept_record_of_clipped_norm_c():
    # The audit's worst case: n' = C, weighted like a kept record (norm K^/B of the current step), divided by N.
    mech, ctx = make_problem(sigma_k=math.inf, q_cap=0.5, candidate_rate=0.5)
    opt = ctx.optimizer
    clipped = per_sample_clipped(ctx)
    i = int(clipped.norm(dim=1).argmax())
    assert float(clipped[i].norm()) == pytest.approx(CLIP)
    direction = [clipped[i].view(CLASSES, FEATURES) * 7.0]  # any scale: only the direction counts
    mech.k_hat = 3.0 * mech.floor(CLIP, BATCH)
    contribution = mech.canary_contribution(direction, CLIP)
    assert float(contribution[0].norm()) == pytest.approx(mech.k_hat / BATCH, rel=1e-5)
    mech.k_hat = mech.floor(CLIP, BATCH)  # a record with n = C is now kept w.p. q_cap / candidate_rate = 1
    real = estimate(ctx, torch.tensor([i]))
    assert mech.drawn_per_step[-1] == 1
    opt.canary = lambda: mech.canary_contribution(direction, CLIP)
    torch.testing.assert_close(estimate(ctx, torch.tensor([], dtype=torch.long)), real, rtol=1e-5, atol=1e-7)


def test_all_randomness_comes_from_the_runs_generators():
    # With --secure those generators are seeded from OS entropy; the global RNG is seeded from --seed, so the
    # draw, the normaliser sample and its noise must never touch it.
    purposes: list[str] = []
    mech, ctx = make_problem(noise=1.0, purposes=purposes, sigma_k=2.0, candidate_rate=0.9, norm_rate=0.5)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    for step in range(3):
        mech.begin_step(ctx, step)
        estimate(ctx, torch.arange(N))
    assert torch.equal(torch.get_rng_state(), state)
    assert sorted(purposes) == ["dpis-draw", "dpis-normaliser-noise", "dpis-normaliser-sample"]
    assert all(t["k_tilde"] is not None for t in mech.trace) and sum(mech.drawn_per_step) > 0


def test_adaptive_clip_follows_the_released_sum_within_a_factor_two():
    mech, ctx = make_problem(candidate_rate=1, sigma_k=1e-9, r_hat=0.5, adaptive_clip=True)
    for step in range(4):
        mech.begin_step(ctx, step)
    q_cap = mech.rates(BATCH / N).q_cap
    for before, after in zip(mech.trace, mech.trace[1:]):
        wanted = before["k_tilde"] * q_cap / BATCH
        assert after["clip"] == pytest.approx(min(max(wanted, before["clip"] / 2), before["clip"] * 2))
        assert mech.current_clip == mech.trace[-1]["clip"]  # the step clips at C_t
    assert mech.state_dict()["_clip"] == mech._clip  # C_{t+1} is in the checkpoint


@pytest.mark.parametrize("normalise", [True, False])
def test_normalised_step_rescales_the_estimate_by_base_clip_over_current_clip(normalise):
    # After C has moved, the step's estimate is --clip / C_t (or 1, with normalise_step off) times the one
    # the same draw gives with the scale undone.
    mech, ctx = make_problem(candidate_rate=1, sigma_k=1e-9, r_hat=0.5, adaptive_clip=True, normalise_step=normalise)
    for step in range(3):
        mech.begin_step(ctx, step)
    clip_t = mech.trace[-1]["clip"]
    assert clip_t != pytest.approx(CLIP)  # the problem's norms do move C
    assert mech.step_scale == (CLIP / clip_t if normalise else 1.0)
    mech.k_hat = 2.0 * mech.floor(clip_t, BATCH)
    got = estimate(ctx, torch.arange(N))
    assert mech.drawn_per_step[-1] > 0
    # Rerun the same draw with the scale undone: the two differ by exactly step_scale.
    scale = mech.step_scale
    mech2, ctx2 = make_problem(candidate_rate=1, sigma_k=1e-9, r_hat=0.5, adaptive_clip=True, normalise_step=normalise)
    for step in range(3):
        mech2.begin_step(ctx2, step)
    mech2.k_hat = mech.k_hat
    mech2.step_scale = 1.0
    plain = estimate(ctx2, torch.arange(N))
    assert torch.allclose(got, scale * plain, rtol=1e-5, atol=1e-9)


def test_adaptive_clip_stops_at_its_floor_when_every_gradient_is_zero():
    mech, ctx = make_problem(candidate_rate=1, sigma_k=1e-9, adaptive_clip=True)
    ctx.train_x.zero_()  # a bias-free linear model: every gradient is exactly 0, so K~ is (almost) 0
    for step in range(60):
        mech.begin_step(ctx, step)
    clips = [t["clip"] for t in mech.trace]
    assert clips[1] == CLIP / 2 and min(clips) == MIN_CLIP_FRACTION * CLIP == clips[-1]
    assert math.isfinite(mech.step_scale) and mech.step_scale == 1 / MIN_CLIP_FRACTION


def test_kept_terms_of_underflowing_gradients_still_have_norm_k_hat_over_b():
    # Gradients near 1e-25 have float32 squares of 0: a float32 norm would be 0 (never drawn) or, in part,
    # too small, and the weight K^/(B n_i) would then push the term past its sensitivity K^/B.
    mech, ctx = make_problem(candidate_rate=1, sigma_k=math.inf)
    ctx.train_x.mul_(1e-25)
    norms = per_sample_clipped(ctx).double().norm(dim=1)
    assert 0 < float(norms[0]) < 1e-20
    for i in (0, 23):
        mech.k_hat = BATCH * float(norms[i])  # probability exactly 1 for this candidate
        grad = estimate(ctx, torch.tensor([i]))
        assert mech.drawn_per_step[-1] == 1
        assert float(grad.double().norm()) * N == pytest.approx(mech.k_hat / BATCH, rel=1e-4)


def test_training_loop_on_synthetic_keeps_k_hat_above_the_floor():
    data = load_dataset("synthetic")
    cfg = resolve(dict(mech="dpis", dataset="synthetic", eps=4.0, steps=6))
    mech = get_mechanism("dpis")()
    out = train(cfg, mech, data, 1.5, 6, torch.device("cpu"), show_progress=False)
    assert len(mech.trace) == 6 and len(mech.drawn_per_step) == 6
    floor = mech.floor(cfg.clip, cfg.batch_size)
    assert all(t["k_tilde"] is not None and t["k_hat"] >= floor for t in mech.trace)
    assert all(n < 4 * cfg.batch_size for n in mech.drawn_per_step)
    assert math.isfinite(out.test_loss)


runner = CliRunner()


def test_cli_run_records_the_dpis_accountant():
    res = runner.invoke(app, ["run", "--mech", "dpis", "--eps", "2", "--dataset", "synthetic", "--steps", "4", "--quiet"])
    assert res.exit_code == 0, res.output
    (row,) = list(csv.DictReader(open("results/runs.csv")))
    assert row["accountant"] == "dpis-rdp" and row["mech"] == "dpis"
    assert float(row["eps_spent"]) <= float(row["eps_target"]) == 2.0
    assert row["eps_rdp"] != "" and float(row["eps_rdp"]) < float(row["eps_spent"])  # plain SGM at q under-reports
    # its release is two sampled Gaussians, so PLD and PRV account it too, below its RDP
    assert 0 < float(row["eps_pld"]) < float(row["eps_spent"]) and 0 < float(row["eps_prv"]) < float(row["eps_spent"])
    assert float(row["sample_rate"]) == pytest.approx(64 / 512)  # q = B/N for every mechanism
    assert float(row["release_rate"]) == pytest.approx(min(4 * 64 / 512, (64 / 512) / 0.5))  # q_cap
    record = json.loads(Path("results/runs", row["run_id"] + ".json").read_text())
    assert record["privacy"]["accountant"] == "dpis-rdp"


def test_cli_run_rejects_q_cap_above_candidate_rate_before_training():
    res = runner.invoke(app, ["run", "--mech", "dpis", "--eps", "2", "--dataset", "synthetic", "--steps", "2", "--quiet",
                              "--set", "q_cap=0.9", "--set", "candidate_rate=0.5"])
    assert res.exit_code == 2 and "candidate_rate" in res.output
    assert not Path("results/runs.csv").exists()


def test_ls_shows_the_reconstruction_caveat():
    res = runner.invoke(app, ["ls", "mechanisms", "--pattern", "dpis"])
    assert res.exit_code == 0 and "dpis-rdp" in res.output and "reconstruction" in res.output


def test_account_json_gives_q_and_the_release_rate_apart():
    res = runner.invoke(app, ["account", "--mech", "dpis", "--eps", "3", "--json"])
    out = json.loads(res.stdout)
    assert out["sample_rate"] == pytest.approx(512 / 60000)
    assert out["release_rate"] == pytest.approx(min(4 * 512 / 60000, (512 / 60000) / 0.5))
